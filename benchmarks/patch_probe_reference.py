#!/usr/bin/env python3
"""How much of the patch-level nodule probe is learnable from the pixels at all: the probe's
own patch tasks, split and bootstrap, scored on five hand-made local features beside the
raw-pixel baseline.

    python benchmarks/patch_probe_reference.py --data-root data/demo/processed \
        --split-manifest data/demo/processed/_splits/val25_seed0.json [--size 64] [--max-slices 384]

`dinox eval probe`'s pixel baseline is a linear probe on the normalised pixels of a patch
cell; a nodule of a few pixels lands anywhere in the cell, so a linear read-out of raw
pixels cannot find it, and a low pixel figure alone does not say whether the task can be
learnt. This scores the same patches (planned by the probe's own code with the same seed)
on features a local blob detector would use, per patch cell of the lung-window input at
`--size` px: the centre slice's mean, max and std; the max of the negative Laplacian of
Gaussian (sigma 1 px: bright blobs of ~3 px); and the max of |centre - mean of the two
neighbour slices| (a nodule ends within a few slices, a vessel runs on). The probe is the
same standardised logistic regression with its C sweep. A trained network's patch tokens
that carry nodules should get near this figure; ones that carry only intensity and
position stay with the pixels.

Diagnosis only: not a baseline of `dinox eval probe`, whose verdict compares the
checkpoint with the untrained network and the pixels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dinox.config import resolve
from dinox.data.dataset import CTSliceDataset
from dinox.data.layout import INDEX_FILE
from dinox.eval import probe as P

FEATURES = ("mean", "max", "std", "blob (LoG sigma 1)", "z-contrast")


def cell_features(x: np.ndarray, patch: int) -> np.ndarray:
    """(grid*grid, 5) hand features of every patch cell of one (3, S, S) lung-window input."""
    from scipy import ndimage

    centre = x[1]
    blob = -ndimage.gaussian_laplace(centre, 1.0)
    z_contrast = np.abs(centre - 0.5 * (x[0] + x[2]))
    grid = centre.shape[0] // patch

    def cells(a: np.ndarray) -> np.ndarray:
        return a.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)

    c = cells(centre)
    return np.stack([c.mean(1), c.max(1), c.std(1), cells(blob).max(1), cells(z_contrast).max(1)], 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--split-manifest", type=Path)
    p.add_argument("--size", type=int, default=64, help="probe input size (the tiny recipe trains at 64)")
    p.add_argument("--config", default="vit-tiny", help="the preset whose patch size and input normalisation to use")
    p.add_argument("--max-slices", type=int, default=384)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = resolve({"config": args.config}, hardware_preset="cpu").cfg
    patch = cfg.model.vit_patch
    root = args.data_root
    labels = P.load_labels(root)
    dataset = CTSliceDataset(root, "all", None, root / INDEX_FILE)
    index_patient = {r["series_id"]: r["patient_id"] for r in dataset.records}
    split = P.choose_split(labels, index_patient, manifest=args.split_manifest, root=root, seed=args.seed)
    data = P.ProbeData(slices=P.select_slices(dataset, labels, split, args.max_slices, args.seed))
    # no networks: plans the patches exactly as the probe does and fills the pixel baseline
    P.embed({}, dataset, data, labels, cfg, device=torch.device("cpu"), size=args.size, seed=args.seed)
    hand = np.zeros((len(data.patches), len(FEATURES)), np.float32)
    by_slice: dict[int, list[int]] = {}
    for row, q in enumerate(data.patches):
        by_slice.setdefault(q.slice_pos, []).append(row)
    for pos, rows in by_slice.items():
        x = P.model_input(dataset[data.slices[pos].index][None], cfg, args.size)[0].numpy()
        feats = cell_features(x, patch)
        hand[rows] = feats[[data.patches[r].cell for r in rows]]
    data.features["hand"] = {"tokens": hand}
    tasks, _ = P.build_tasks(data)
    out = {"size": args.size, "grid": args.size // patch, "features": list(FEATURES), "tasks": {}}
    for task in tasks:
        if task.level != "patch":
            continue
        entry = P.run_task(data, task, ["hand", "pixels"], n_boot=args.bootstrap, seed=args.seed)
        y = task.y
        single = {name: round(float(P.auroc(hand[task.rows][:, k], y)), 3) for k, name in enumerate(FEATURES)}
        out["tasks"][task.name] = {"hand_features": {"auroc": entry["auroc"], "ci95": entry["ci95"]},
                                   "pixels": {"auroc": entry["baselines"]["pixels"]["auroc"],
                                              "ci95": entry["baselines"]["pixels"]["ci95"]},
                                   "single_feature_auroc_all_samples": single,
                                   "n_train": entry["n_train"], "n_test": entry["n_test"]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
