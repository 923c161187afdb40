"""Forward+backward time of dinox's ViT against transformers' Dinov2Model of the same shape,
on the same batch, threads and weights, as a ratio (dinox / transformers; < 1: dinox faster).

    .venv/bin/python benchmarks/bench_hf.py                                  # small, a few seconds
    .venv/bin/python benchmarks/bench_hf.py --dim 384 --depth 12 --heads 6 --patch 14 --img-size 224 \\
        --batch-size 16 --device cuda --bf16

The transformers model is built with random weights and imported into dinox
(``dinox.model.weights``), so both compute the same function (checked before timing). No
registers: Dinov2Model has none. Both run in train mode without dropout / drop path, with
PyTorch's scaled-dot-product attention (transformers' "sdpa"), and backward from the same
scalar over all output tokens.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dinox.model.vit import ViTArch, VisionTransformer
from dinox.model.weights import load_pretrained


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--swiglu", action="store_true")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (both models)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    from transformers import Dinov2Config, Dinov2Model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = Dinov2Config(hidden_size=args.dim, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                          patch_size=args.patch, image_size=args.img_size, mlp_ratio=4,
                          use_swiglu_ffn=args.swiglu, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = Dinov2Model(config)
    arch = ViTArch(patch_size=args.patch, embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                   mlp_hidden_dim=4 * args.dim, swiglu=args.swiglu, num_registers=0)
    ours = VisionTransformer(arch, img_size=args.img_size)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        load_pretrained(folder, ours)
    hf, ours = hf.to(device).train(), ours.to(device).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    with torch.no_grad():
        a = hf(pixel_values=x).last_hidden_state
        o = ours(x)
        b = torch.cat([o["cls"][:, None], o["registers"], o["patches"]], dim=1)
    print(f"same function: max |dinox - transformers| = {float((a - b).abs().max()):.2e}")

    def step_hf():
        with amp:
            loss = hf(pixel_values=x).last_hidden_state.float().square().mean()
        loss.backward()
        hf.zero_grad(set_to_none=True)

    def step_ours():
        with amp:
            o = ours(x)
            loss = torch.cat([o["cls"][:, None], o["patches"]], dim=1).float().square().mean()
        loss.backward()
        ours.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step_hf(), step_ours()
    # alternate the two step by step, so that load from elsewhere on the machine hits both
    # alike; the ratio is the median of the per-pair ratios
    t_hf, t_ours = [], []
    for _ in range(args.steps):
        t_hf.append(_timed(step_hf, device))
        t_ours.append(_timed(step_ours, device))
    m_hf, m_ours = statistics.median(t_hf), statistics.median(t_ours)
    ratio = statistics.median(o / h for o, h in zip(t_ours, t_hf))
    print(f"shape: patch {args.patch}, dim {args.dim}, depth {args.depth}, heads {args.heads}, "
          f"{'SwiGLU' if args.swiglu else 'GELU'}, {args.img_size} px, batch {args.batch_size}, "
          f"{args.threads} threads, {device}{', bf16' if args.bf16 else ''}")
    print(f"forward+backward median: dinox {m_ours * 1e3:.1f} ms, transformers Dinov2Model {m_hf * 1e3:.1f} ms "
          f"(min {min(t_ours) * 1e3:.1f} / {min(t_hf) * 1e3:.1f} ms, {args.steps} steps each)")
    print(f"ratio dinox / transformers = {ratio:.3f} (median of per-step ratios)")


if __name__ == "__main__":
    main()
