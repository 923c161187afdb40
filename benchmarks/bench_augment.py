"""Throughput of CTAugment (samples/s) on CPU and, when available, CUDA.

    .venv/bin/python benchmarks/bench_augment.py [--batch 64] [--input 256] [--iters 5]

Each case turns a (B, 3, S, S) int16 HU batch into its views; GPU timings bracket the
work with torch.cuda.synchronize(); the figure is batch size over the median batch time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinox.data.augment import AugmentConfig, CTAugment

CASES = {
    "2 global @224": AugmentConfig(global_size=224),
    "2 global @64": AugmentConfig(global_size=64),
    "2 global @224 + 8 local @96": AugmentConfig(global_size=224, n_local=8, local_size=96),
    "2 global @224 + 8 local @96, blur+noise": AugmentConfig(
        global_size=224, n_local=8, local_size=96, blur_p=0.5, noise_std=0.02
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg: AugmentConfig, stacks: torch.Tensor, iters: int, warmup: int = 2) -> float:
    """Samples/s from the median batch time (robust to other jobs sharing the machine)."""
    augment = CTAugment(cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        augment(stacks, gen)
    times = []
    for _ in range(iters):
        _sync(stacks.device)
        start = time.perf_counter()
        augment(stacks, gen)
        _sync(stacks.device)
        times.append(time.perf_counter() - start)
    return stacks.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    stacks = (torch.rand(args.batch, 3, args.input, args.input, generator=torch.Generator().manual_seed(0))
              * 2000 - 1024).to(torch.int16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch}, input {args.input}px int16")
    for device in devices:
        x = stacks.to(device)
        iters = args.iters if device.type == "cpu" else args.iters * 10
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for case, cfg in CASES.items():
            print(f"{name:>24s}  {case:<42s} {bench(cfg, x, iters):10.1f} samples/s")


if __name__ == "__main__":
    main()
