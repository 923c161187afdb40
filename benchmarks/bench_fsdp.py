#!/usr/bin/env python3
"""FSDP2 against DDP: step time and peak device memory per rank, beside the memory plan.

    python benchmarks/bench_fsdp.py --config vit-large --nproc 4 --batch-size 16 --steps 20
    python benchmarks/bench_fsdp.py --config vit-giant --nproc 8 --batch-size 16 --modes fsdp

For each mode it synthesises a small processed root once, runs `dinox train` under
`torchrun --standalone` for `--steps` optimizer steps with --grad-checkpoint --amp (no
checkpoints, no evaluation), and reports the median step time after the first steps, the
peak allocated memory (mem_peak_gb of metrics.jsonl, rank 0), and the plan's per-rank
estimate (`--dry-run --json` with the same flags). Results are appended to
benchmarks/results/bench_fsdp.jsonl. Needs GPUs: on CPU it measures nothing useful
(no device memory is reported).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_fsdp.jsonl"


def prepared_root(work: Path, size: int) -> Path:
    root = work / f"data_{size}"
    if not (root / "processed" / "_index" / "index.csv").exists():
        dinox = [sys.executable, "-m", "dinox.cli"]
        subprocess.run([*dinox, "synth", "--out", str(root / "dicom"), "--patients", "24", "--slices", "24",
                        "--size", str(size)], check=True)
        subprocess.run([*dinox, "prep", "--input", str(root / "dicom"), "--output", str(root / "processed"),
                        "--val-fraction", "0.1"], check=True)
    return root / "processed"


def flags(args, mode: str, root: Path, out: Path) -> list[str]:
    return ["--config", args.config, "--parallel", mode, "--batch-size", str(args.batch_size),
            "--accumulation-steps", "1", "--grad-checkpoint", "--amp", "--max-steps", str(args.steps),
            "--data-root", str(root), "--split-manifest", str(root / "_splits" / "val10_seed0.json"),
            "--out", str(out), "--ckpt-every", str(10 * args.steps), "--monitor-every", "0", "--eval-every", "0",
            "--log-interval", "5", "--num-workers", "4", *args.extra]


def plan(args, mode: str, root: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "dinox.cli", "train", *flags(args, mode, root, out), "--dry-run", "--json",
           "--world-size", str(args.nproc)]
    row = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return row["memory_estimate_gb"]


def run(args, mode: str, root: Path) -> dict:
    out = Path(args.work) / f"runs_{mode}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(REPO / "scripts" / "phase5_big_run.py"), *flags(args, mode, root, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = {"config": args.config, "mode": mode, "nproc": args.nproc, "batch_size": args.batch_size,
              "steps": args.steps, "exit": proc.returncode, "plan_gb": plan(args, mode, root, out)}
    if proc.returncode != 0:
        result["error"] = proc.stderr[-800:]
        return result
    run_dir = sorted(p for p in out.iterdir() if p.is_dir())[-1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    times = [b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:])][2:]
    result.update(step_s=statistics.median(times) if times else None,
                  peak_gb=max((r.get("mem_peak_gb", 0.0) for r in rows), default=None),
                  samples_per_s=rows[-1].get("samples_per_s"))
    return result


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vit-large")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp"])
    p.add_argument("--work", default="data/bench_fsdp")
    args = p.parse_args(argv)
    args.extra = extra
    root = prepared_root(Path(args.work), args.size)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        result = run(args, mode, root)
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
