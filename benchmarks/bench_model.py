"""Forward+backward time of the student (backbone, optionally + DINO head) and the
parameter count of every preset.

    .venv/bin/python benchmarks/bench_model.py                    # vit-tiny, 64 px, B 32, CPU
    .venv/bin/python benchmarks/bench_model.py --arch vit-large --img-size 224 --device cuda

Each step runs both global views through the model as one batch of 2 x B images (as the
trainer does), then backward of a scalar built from every output.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinox.model.head import DINOHead
from dinox.model.presets import PRESETS, resolve_arch
from dinox.model.vit import VisionTransformer, count_parameters


def preset_counts(img_size: int = 224, out_dim: int = 65536) -> None:
    print(f"parameters at img_size {img_size} (head: out_dim {out_dim}, hidden 2048, bottleneck 256)")
    for name, arch in PRESETS.items():
        with torch.device("meta"):
            backbone = VisionTransformer(arch, img_size=img_size)
            head = DINOHead(arch.embed_dim, out_dim)
        print(f"  {name:10s} backbone {count_parameters(backbone):>15,}   "
              f"head {count_parameters(head):>12,}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args: argparse.Namespace, grad_checkpoint: bool, with_head: bool) -> list[float]:
    device = torch.device(args.device)
    arch = resolve_arch(args.arch)
    torch.manual_seed(0)
    model = VisionTransformer(arch, img_size=args.img_size, drop_path_rate=0.1,
                              grad_checkpoint=grad_checkpoint).to(device).train()
    head = DINOHead(arch.embed_dim, args.out_dim).to(device) if with_head else None
    views = torch.randn(2 * args.batch_size, 3, args.img_size, args.img_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        with amp:
            out = model(views)
            loss = out["patches"].float().square().mean() + out["cls"].float().square().mean()
            if head is not None:
                loss = loss + head(out["cls"]).float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if head is not None:
            head.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit-tiny", choices=list(PRESETS))
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="images per global view")
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    preset_counts()
    print(f"\n{args.arch} {args.img_size} px, 2 global views x batch {args.batch_size}, "
          f"device {args.device}, threads {torch.get_num_threads()}, bf16 {args.bf16}")
    images = 2 * args.batch_size
    for with_head in (False, True):
        for ckpt in (False, True):
            t = time_steps(args, grad_checkpoint=ckpt, with_head=with_head)
            med = statistics.median(t)
            label = ("backbone+head" if with_head else "backbone") + (" ckpt" if ckpt else "")
            print(f"  {label:20s} fwd+bwd median {med * 1e3:8.1f} ms  "
                  f"(min {min(t) * 1e3:.1f})  {images / med:8.1f} img/s")


if __name__ == "__main__":
    main()
