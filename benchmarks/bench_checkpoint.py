"""Checkpoint save / verify / load time and size for a ViT-Tiny-sized training state, and
an estimate by measured bytes/s for ViT-Large and ViT-Giant.

    python benchmarks/bench_checkpoint.py [--dir /path/on/the/checkpoint/disk] [--repeats 3]

The training state is modelled as 5 float32 copies of the parameters (student, teacher,
Gram teacher, AdamW exp_avg and exp_avg_sq). Loads right after a save come partly from
the page cache; on a cold cache expect the disk's read speed instead.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dinox.run.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, verify_checkpoint

MODELS = {"vit-tiny": 5.7e6, "vit-large": 304e6, "vit-giant": 1.1e9}
COPIES = 5


def make_state(params: int) -> dict:
    """A trainer-shaped state of `params` parameters split into ~4 MB tensors."""
    chunk = 1 << 20
    sizes = [chunk] * (params // chunk) + ([params % chunk] if params % chunk else [])

    def weights():
        return {f"backbone.blocks.{i}.w": torch.randn(n) for i, n in enumerate(sizes)}

    return {
        "format": "dinox-checkpoint", "format_version": 1, "step": 100,
        "student": weights(), "teacher": weights(), "gram_teacher": weights(),
        "optimizer": {"state": {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn(n),
                                    "exp_avg_sq": torch.rand(n)} for i, n in enumerate(sizes)},
                      "param_groups": [{"lr": 1e-3, "params": list(range(len(sizes)))}]},
        "dino_loss": {"center": torch.zeros(1, 65536)},
        "config": {"model": {"name": "vit-tiny"}},
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: tmp)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = int(MODELS["vit-tiny"])
    state = make_state(params)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run_dir = Path(tmp)
        plain = run_dir / "plain.pth"
        t_plain = [timed(lambda: torch.save(state, plain)) for _ in range(args.repeats)]
        t_save, t_verify, t_load, t_mmap = [], [], [], []
        size = 0
        for i in range(args.repeats):
            path = checkpoint_path(run_dir, i)
            t_save.append(timed(lambda: save_checkpoint(path, state)))
            size = path.stat().st_size
            t_verify.append(timed(lambda: verify_checkpoint(path)))
            t_load.append(timed(lambda: load_checkpoint(path)))
            t_mmap.append(timed(lambda: load_checkpoint(path, verify=False, mmap=True)))

    med = statistics.median
    rates = {"save": size / med(t_save), "verify": size / med(t_verify), "load": size / med(t_load)}
    print(f"state: vit-tiny {params / 1e6:.1f}M params x {COPIES} float32 copies, file {size / 1e6:.1f} MB "
          f"(median of {args.repeats})")
    print(f"  torch.save, plain (no fsync/hash): {med(t_plain):.3f} s")
    print(f"  save_checkpoint (atomic+fsync+sha256): {med(t_save):.3f} s  {rates['save'] / 1e6:.0f} MB/s")
    print(f"  verify_checkpoint (sha256 of file):    {med(t_verify):.3f} s  {rates['verify'] / 1e6:.0f} MB/s")
    print(f"  load_checkpoint (verify + load):       {med(t_load):.3f} s  {rates['load'] / 1e6:.0f} MB/s")
    print(f"  load_checkpoint(verify=False, mmap):   {med(t_mmap):.3f} s")
    print("estimate at these rates (file = params x 5 x 4 bytes):")
    for name in ("vit-large", "vit-giant"):
        nbytes = MODELS[name] * COPIES * 4
        print(f"  {name:9s} {MODELS[name] / 1e6:6.0f}M params  {nbytes / 1e9:5.1f} GB  "
              f"save {nbytes / rates['save']:6.1f} s  verify {nbytes / rates['verify']:6.1f} s  "
              f"load {nbytes / rates['load']:6.1f} s")


if __name__ == "__main__":
    main()
