"""Milliseconds per forward + backward of `F.scaled_dot_product_attention` on the CPU, its
flash kernel against its math path, in bf16 and fp32, at the sequence lengths dinox trains
(3 heads of 64, the tiny ViT's; the batch shrinks as the sequence grows so that every row
holds about the same number of tokens).

    .venv/bin/python benchmarks/bench_attention.py

Results on 2 cores of a Xeon with AMX, torch 2.13.0 (2026-12-05); ms per call, math / flash:

| tokens (batch) | bf16 flash | bf16 math | math / flash | fp32 flash | fp32 math | math / flash |
|---|---|---|---|---|---|---|
| 17 (256): a 32 px local crop, patch 8 | 31.6 | 7.0 | 0.22 | 4.9 | 8.7 | 1.78 |
| 65 (64): a 64 px global crop, patch 8 | 25.4 | 9.2 | 0.36 | 7.3 | 11.3 | 1.56 |
| 145 (32): 96 px, patch 8 | 25.0 | 17.0 | 0.68 | 12.0 | 16.5 | 1.37 |
| 257 (16): 224 px, patch 14 | 17.4 | 26.2 | 1.51 | 14.1 | 25.4 | 1.80 |
| 1025 (4): 448 px, patch 14 | 33.5 | 125.1 | 3.74 | 43.8 | 117.1 | 2.67 |

In bf16 the CPU flash kernel is slower than the math path up to ~150 tokens, the demo's
sequences. A whole demo step (vit-tiny, 64 px, 4 locals, batch 32, bf16 autocast) took 0.45 s
with the math path forced against 0.57 s with PyTorch's choice (21 % less), and 0.72 against
0.69 s in fp32 (4 % more); the profiler put 35 % of a bf16 step in the flash kernel's
backward. dinox leaves the choice to PyTorch: the crossover is a property of this CPU and
this torch build, measured on one machine, and the gain is confined to short-sequence bf16
runs on the CPU (not the GPU runs the big presets are for).

The two-block demo step (no locals, batch 32, bf16 autocast; 2026-12-05, the same host,
interleaved rounds): 0.207 s with PyTorch's choice, 0.195 s with the math path forced, and
0.181 s with the attention alone computed in fp32 (q, k, v upcast, autocast off around the
call: 13 % less). Not adopted either: the demo's retrieval at 1.5x its steps rose by ~3 hits
of 480 (docs/recipes.md, "What the demo's budget costs"), so 13 % more steps would not move
a bar, and the gain rests on this build's bf16 kernel.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = ((17, 256), (65, 64), (145, 32), (257, 16), (1025, 4))


def time_backend(backend: SDPBackend, q, k, v, repeats: int) -> float:
    with sdpa_kernel(backend):
        for i in range(repeats + 3):
            if i == 3:   # kernels and allocator warm
                start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward")
    for tokens, batch in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(batch, args.heads, tokens, args.head_dim, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            flash = time_backend(SDPBackend.FLASH_ATTENTION, q, k, v, args.repeats)
            math_path = time_backend(SDPBackend.MATH, q, k, v, args.repeats)
            print(f"{tokens:5d} tokens x {batch:3d}  {str(dtype)[6:]:8s}  flash {flash:7.2f}  math {math_path:7.2f}"
                  f"  math / flash {math_path / flash:.2f}")


if __name__ == "__main__":
    main()
