"""Shared fixtures for the trainer tests: a tiny processed root and a tiny, fast model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_MODEL = [
    "--config", "vit-tiny", "--vit-depth", "2", "--vit-dim", "64", "--vit-heads", "2", "--vit-mlp", "128",
    "--img-size", "32", "--local-crops", "0", "--out-dim", "64", "--head-hidden", "64",
    "--head-bottleneck", "32", "--device", "cpu", "--monitor-every", "0", "--eval-every", "0",
    "--log-interval", "0", "--warmup-steps", "2", "--freeze-last-layer-steps", "1",
]


@pytest.fixture(scope="session")
def processed_root(tmp_path_factory) -> Path:
    from dinox.data.ingest import prepare
    from dinox.data.synth import generate_dataset

    base = tmp_path_factory.mktemp("ct")
    generate_dataset(base / "dicom", patients=6, slices=8, size=48, seed=3)
    prepare([base / "dicom"], base / "processed", val_fraction=0.34, progress=False)
    return base / "processed"


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    manifest = next((root / "_splits").glob("*.json"))
    return ["train", *TINY_MODEL, "--data-root", str(root), "--split-manifest", str(manifest),
            "--out", str(out), *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]
