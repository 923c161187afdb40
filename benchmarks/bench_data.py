"""Throughput of the data layer: synth, prep and the slice dataset.

    .venv/bin/python benchmarks/bench_data.py [--patients 20 --slices 64 --size 256]

synth runs pinned to one CPU core; prep runs with 1 and with 2 workers; the dataset is
read at random, in-process and through a DataLoader with one worker.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dinox.data.dataset import CTSliceDataset, pad_collate  # noqa: E402
from dinox.data.ingest import prepare  # noqa: E402
from dinox.data.synth import generate_dataset  # noqa: E402


def bench_synth(out: Path, patients: int, slices: int, size: int) -> float:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    try:
        start = time.perf_counter()
        generate_dataset(out, patients, slices, size, seed=0)
        return time.perf_counter() - start
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)


def bench_prep(src: Path, out: Path, workers: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare([src], out, workers=workers, progress=False)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    prepare([src], out, workers=workers, progress=False)
    return fresh, time.perf_counter() - start


def bench_dataset(root: Path, n: int) -> tuple[float, float]:
    ds = CTSliceDataset(root, split="all")
    order = np.random.default_rng(0).integers(0, len(ds), n)
    for i in order[:256]:
        ds[i]
    start = time.perf_counter()
    for i in order:
        ds[int(i)]
    in_process = n / (time.perf_counter() - start)

    sampler = torch.utils.data.SubsetRandomSampler(order.tolist(), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=64, sampler=sampler, num_workers=1, collate_fn=pad_collate,
                        persistent_workers=False)
    start = time.perf_counter()
    seen = sum(batch.shape[0] for batch in loader)
    return in_process, seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dinox-bench-"))
    try:
        dicom, processed = work / "dicom", work / "processed"
        shutil.rmtree(dicom, ignore_errors=True)
        t = bench_synth(dicom, args.patients, args.slices, args.size)
        n_files = args.patients * args.slices
        print(f"synth  {args.patients} x {args.slices} x {args.size}px, one core: {t:6.1f} s "
              f"({t / args.patients:.2f} s/patient, {n_files / t:.0f} slices/s)")
        for workers in (1, 2):
            fresh, rerun = bench_prep(dicom, processed, workers)
            print(f"prep   {n_files} files, {workers} worker(s): {fresh:6.1f} s "
                  f"({n_files / fresh:.0f} files/s); re-run (all done) {rerun:.1f} s")
        in_process, loader = bench_dataset(processed, args.samples)
        print(f"dataset random (3,{args.size},{args.size}) samples: {in_process:,.0f} samples/s in-process, "
              f"{loader:,.0f} samples/s through a DataLoader with 1 worker (batch 64)")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
