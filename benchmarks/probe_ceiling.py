#!/usr/bin/env python3
"""How high can any read-out of the probe's input go on the patch task? A supervised ceiling.

    python benchmarks/probe_ceiling.py --checkpoint data/demo/runs/RUN/checkpoint_final_*.pth \
        --data-root data/demo/processed --split-manifest data/demo/processed/_splits/val25_seed0.json \
        --extra-roots data/probe_power/chest_s1{0,1,2}_480x12x96/processed --seeds 0 1 2 --tag demo

`dinox eval probe` asks whether frozen features, read by a linear probe fitted on the
training patients, separate nodule patches from other lung patches. Its acceptance bar
(issue 13) is a lead over the untrained network and the raw-pixel probe larger than the
paired 95 % interval over the test patients. This check asks what that bar allows on a
given test side: it rebuilds the probe's own slices, patch cells, split and bootstrap
resamples (the same functions and seed, so the figures line up with probe_step*.json), then
trains a small convolutional network *with the labels* on each patch cell's pixels and a
margin of context, and scores it on the same test patches with the same resamples.

- `cnn` trains on the probe's training side only (the labels a probe has);
- `cnn_more_labels` adds every patient of `--extra-roots` (labelled phantoms no test
  patient is in) to its training side, so that the label count stops being the limit.
- with `--vit`: `vit_frozen` (and `vit_frozen_more_labels`) trains the checkpoint's own
  network, from its step-0 weights, *with the labels* (a linear head on each labelled
  patch token of the whole slice, as the probe feeds it), then freezes it and runs the
  probe's linear read-out on its patch tokens. It asks whether this network's patch tokens
  can hold a linearly readable nodule at all, whatever the objective: if they cannot clear
  the bar even when trained for it, no self-supervised recipe of this network can.

`--task slice_nodule` asks the same of the slice task: the class token read by the probe,
against the untrained network's and the pixels' (no CNN and no hand features, which read
patch cells), with `--vit` training the network's class token with the slice labels.

A supervised network on the pixels is an upper bound for what a frozen encoder plus a
linear probe can reach on these patches (up to what more context could add). If even its
lead over the pixel probe sits inside the interval, no frozen features can meet the bar on
that test side, and a failure there says nothing about the recipe.

One JSON line per run goes to benchmarks/results/probe_ceiling.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinox.data.dataset import CTSliceDataset
from dinox.data.layout import default_manifest
from dinox.eval.load import load_for_inference
from dinox.eval.probe import (BOOTSTRAP, ProbeData, build_tasks, embed, fit_probe, model_input, probe_inputs,
                              probe_size, task_matrix, untrained_backbone)
from dinox.eval.stats import auroc, bootstrap_weights, percentile_interval

RESULTS = Path(__file__).resolve().parent / "results" / "probe_ceiling.jsonl"
TASKS = ("patch_nodule", "slice_nodule")


def probe_data(root: Path, manifest: Path | None, cfg, networks: dict, size: int, seed: int):
    """The probe's ProbeData of one processed root (as `probe_backbone` builds it, at its
    defaults) and its dataset."""
    labels, dataset, _, data = probe_inputs(cfg, root, split_manifest=manifest, seed=seed)
    embed(networks, dataset, data, labels, cfg, device=torch.device("cpu"), size=size, seed=seed)
    return data, dataset


def windows(data: ProbeData, dataset: CTSliceDataset, rows: np.ndarray, cfg, size: int, margin: int) -> torch.Tensor:
    """(len(rows), 3, patch + 2 margin, patch + 2 margin): each patch cell's input pixels with
    `margin` pixels of context on every side (replicate padding at the image border)."""
    patch = cfg.model.vit_patch
    grid = size // patch
    by_slice: dict[int, list[int]] = {}
    for k, r in enumerate(rows):
        by_slice.setdefault(data.patches[r].slice_pos, []).append(k)
    out = torch.zeros(len(rows), 3, patch + 2 * margin, patch + 2 * margin)
    for pos, ks in by_slice.items():
        x = model_input(dataset[data.slices[pos].index][None], cfg, size)
        x = F.pad(x, (margin,) * 4, mode="replicate")[0]
        for k in ks:
            cell = data.patches[rows[k]].cell
            r0, c0 = (cell // grid) * patch, (cell % grid) * patch
            out[k] = x[:, r0:r0 + patch + 2 * margin, c0:c0 + patch + 2 * margin]
    return out


class CellNet(nn.Module):
    """A small CNN over one cell and its context: enough to learn a local blob detector."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x):
        f = self.features(x)
        return self.head(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1)).squeeze(1)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a square window (the labels do not depend on them)."""
    x = torch.rot90(x, k % 4, (2, 3))
    return x.flip(3) if k >= 4 else x


def train_cnn(x: torch.Tensor, y: np.ndarray, seed: int, epochs: int, batch: int = 256) -> CellNet:
    torch.manual_seed(seed)
    net = CellNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    yt = torch.as_tensor(y, dtype=torch.float32)
    pos_weight = (1 - yt).sum() / yt.sum().clamp(min=1)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            k = int(torch.randint(8, (1,), generator=gen))
            loss = F.binary_cross_entropy_with_logits(net(dihedral(x[idx], k)), yt[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def cnn_scores(net: CellNet, x: torch.Tensor) -> np.ndarray:
    """Logits averaged over the 8 dihedral copies (test-time augmentation)."""
    return torch.stack([net(dihedral(x, k)) for k in range(8)]).mean(0).numpy()


def slice_batch(data: ProbeData, dataset: CTSliceDataset, task, cfg, size: int):
    """The probe's input of every slice that holds one of the task's samples, (S, 3, size,
    size), and per sample its slice in that tensor and its cell (-1 for a slice task: the
    class token)."""
    if task.level == "slice":
        pos_of, cell_of = [int(r) for r in task.rows], [-1] * len(task.rows)
    else:
        pos_of = [data.patches[r].slice_pos for r in task.rows]
        cell_of = [data.patches[r].cell for r in task.rows]
    positions = sorted(set(pos_of))
    slot = {p: i for i, p in enumerate(positions)}
    x = torch.cat([model_input(dataset[data.slices[p].index][None], cfg, size) for p in positions])
    return x, torch.tensor([slot[p] for p in pos_of]), torch.tensor(cell_of)


def sample_features(out: dict, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Each sample's feature from a backbone's output: the class token of slice b where the
    cell is -1, else patch token c of slice b."""
    return out["cls"][b] if bool((c < 0).all()) else out["patches"][b, c]


def train_vit(cfg, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, y: np.ndarray, seed: int, epochs: int,
              grid: int, batch: int = 32):
    """The run's network from its step-0 weights and a linear head on its patch tokens (or
    its class token, for a slice task), trained with binary cross-entropy on the labelled
    samples (flips of the slice, the cells moved with them). Returns the backbone and the
    head, frozen, in eval mode."""
    torch.manual_seed(seed)
    net = untrained_backbone(cfg, torch.device("cpu")).train()
    head = nn.Linear(cfg.model.vit_dim, 1)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    yt = torch.as_tensor(y, dtype=torch.float32)
    pos_weight = (1 - yt).sum() / yt.sum().clamp(min=1)
    rows_of = [torch.nonzero(b == i).flatten() for i in range(len(x))]
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            slices = order[start:start + batch]
            rows = torch.cat([rows_of[int(i)] for i in slices])
            if len(rows) == 0:
                continue
            local = torch.empty(len(x), dtype=torch.long)
            local[slices] = torch.arange(len(slices))
            xb, cell = x[slices], c[rows]
            r, col = cell // grid, cell % grid
            if bool(torch.rand(1, generator=gen) < 0.5):
                xb, col = xb.flip(-1), grid - 1 - col
            if bool(torch.rand(1, generator=gen) < 0.5):
                xb, r = xb.flip(-2), grid - 1 - r
            moved = torch.where(cell < 0, cell, r * grid + col)
            logits = head(sample_features(net(xb), local[b[rows]], moved)).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(logits, yt[rows], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False), head.eval().requires_grad_(False)


@torch.no_grad()
def vit_features(net, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, batch: int = 128) -> np.ndarray:
    outs = [net(x[i:i + batch]) for i in range(0, len(x), batch)]
    out = {k: torch.cat([o[k] for o in outs]) for k in ("cls", "patches")}
    return sample_features(out, b, c).float().numpy()


def vit_readouts(args, cfg, size: int, data: ProbeData, dataset: CTSliceDataset, task, extra_data) -> dict:
    """Scores on the probe's test patches of the checkpoint's network trained with the labels
    (`--vit`): the probe's read-out of its frozen tokens (`vit_frozen...`, the seeds' mean
    and each seed) and its trained head (`..._head/{seed}`)."""
    tr, te = task.side == "train", task.side == "test"
    y_tr = task.y[tr]
    extra_y = [et.y for _, _, et in extra_data]
    scores: dict[str, np.ndarray] = {}
    grid = size // cfg.model.vit_patch
    sx, sb, sc = slice_batch(data, dataset, task, cfg, size)
    train_sets = [("vit_frozen", [(sx, sb, sc)], [task.y], args.vit_epochs)] if args.vit_labels != "more" else []
    if extra_data and args.vit_labels != "probe":
        extra_sets = [slice_batch(ed, eds, et, cfg, size) for ed, eds, et in extra_data]
        total = len(sx) + sum(len(e[0]) for e in extra_sets)   # slices; epochs scaled to the same steps
        train_sets.append(("vit_frozen_more_labels", [(sx, sb, sc), *extra_sets], [task.y, *extra_y],
                           args.vit_more_labels_epochs or max(3, round(args.vit_epochs * len(sx) / total))))
    for name, parts, ys, epochs in train_sets:
        side_tr = np.concatenate([tr, *[np.ones(len(y), bool) for y in ys[1:]]])
        offset, xs, bs, cs = 0, [], [], []
        for px, pb, pc in parts:
            xs.append(px)
            bs.append(pb + offset)
            cs.append(pc)
            offset += len(px)
        x_cat, b_cat, c_cat, y_cat = torch.cat(xs), torch.cat(bs), torch.cat(cs), np.concatenate(ys)
        keep = torch.as_tensor(side_tr)   # the test side's labels never train the network
        runs = []
        for seed in args.vit_seeds:
            t0 = time.perf_counter()
            net, head = train_vit(cfg, x_cat, b_cat[keep], c_cat[keep], y_cat[side_tr], seed, epochs, grid)
            tok = vit_features(net, sx, sb, sc)
            proba, *_ = fit_probe(tok[tr], y_tr, task.groups[tr], tok[te], task.groups[te], 0)
            scores[f"{name}/{seed}"] = proba[:, 1]
            runs.append(proba[:, 1])
            with torch.no_grad():   # the trained head itself: the network as a detector, not frozen
                head_logits = head(torch.as_tensor(tok)).squeeze(1).numpy()
            scores[f"{name}_head/{seed}"] = head_logits[te]
            print(f"{name} seed {seed}: {epochs} epochs over {len(x_cat)} slices, "
                  f"{time.perf_counter() - t0:.0f} s; its head's AUROC on the probe's training side "
                  f"{float(auroc(head_logits[tr], y_tr)):.3f}", flush=True)
        scores[name] = np.mean([(s - s.mean()) / s.std() for s in runs], 0)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the checkpoint whose probe this puts in context")
    ap.add_argument("--task", choices=TASKS, default=TASKS[0],
                    help="the probe task; slice_nodule has no CNN and no hand features (they read patch cells), "
                         "so give it --vit")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--split-manifest", default=None)
    ap.add_argument("--extra-roots", nargs="*", default=[],
                    help="processed roots whose every patient adds labelled training patches (cnn_more_labels)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the CNN")
    ap.add_argument("--margin", type=int, default=4, help="context pixels around each cell")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--vit", action="store_true",
                    help="also train the checkpoint's own network with the labels and probe its frozen tokens")
    ap.add_argument("--vit-epochs", type=int, default=40, help="epochs of the probe's training side (vit)")
    ap.add_argument("--vit-seeds", type=int, nargs="+", default=[0], help="training seeds of the network (vit)")
    ap.add_argument("--vit-more-labels-epochs", type=int, default=None,
                    help="epochs with --extra-roots (default: --vit-epochs scaled to the same number of steps)")
    ap.add_argument("--vit-labels", choices=["probe", "more", "both"], default="both",
                    help="which label sets train the network: the probe's, with --extra-roots, or both (vit)")
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    started = time.perf_counter()

    backbone, cfg, _ = load_for_inference(args.checkpoint, torch.device("cpu"))
    size = probe_size(cfg, None)
    root = Path(args.data_root)
    manifest = Path(args.split_manifest) if args.split_manifest else default_manifest(root)
    networks = {"checkpoint": backbone, "untrained": untrained_backbone(cfg, torch.device("cpu"))}
    data, dataset = probe_data(root, manifest, cfg, networks, size, seed=0)
    task = next(t for t in build_tasks(data)[0] if t.name == args.task)
    patch_level = task.level == "patch"
    tr, te = task.side == "train", task.side == "test"
    y_tr, y_te = task.y[tr], task.y[te]
    weights, unit = bootstrap_weights(task.groups[te], args.bootstrap, 0)   # the probe's own resamples

    scores: dict[str, np.ndarray] = {}
    sources = {"checkpoint": "checkpoint", "untrained": "untrained", "pixels": "pixels"}
    if patch_level:
        sources["hand_features"] = "hand"
    for name, source in sources.items():
        x = task_matrix(data, task, source)
        proba, *_ = fit_probe(x[tr], y_tr, task.groups[tr], x[te], task.groups[te], 0)
        scores[name] = proba[:, 1]

    if patch_level:
        x_all = windows(data, dataset, task.rows, cfg, size, args.margin)
        x_tr, x_te = x_all[torch.as_tensor(tr)], x_all[torch.as_tensor(te)]
    extra_x, extra_y, extra_data = [], [], []
    for extra in args.extra_roots:
        extra_root = Path(extra)
        edata, eds = probe_data(extra_root, None, cfg, {}, size, seed=0)
        for rec in edata.slices:
            rec.side = "train"   # every patient of an extra root trains; none is a test patient here
        etask = next(t for t in build_tasks(edata)[0] if t.name == args.task)
        clash = set(etask.groups.tolist()) & set(task.groups[te].tolist())
        if clash:
            raise SystemExit(f"{extra_root} shares patients with the test side ({sorted(clash)[:3]}); "
                             f"give roots of other phantom seeds")
        if patch_level:
            extra_x.append(windows(edata, eds, etask.rows, cfg, size, args.margin))
        extra_y.append(etask.y)
        extra_data.append((edata, eds, etask))
    if extra_x:
        xm, ym = torch.cat([x_tr, *extra_x]), np.concatenate([y_tr, *extra_y])
    if args.vit:
        scores.update(vit_readouts(args, cfg, size, data, dataset, task, extra_data))
    for seed in args.seeds if patch_level else []:
        scores[f"cnn/{seed}"] = cnn_scores(train_cnn(x_tr, y_tr, seed, args.epochs), x_te)
        if extra_x:
            scores[f"cnn_more_labels/{seed}"] = cnn_scores(train_cnn(xm, ym, seed, args.epochs), x_te)
    for name in ("cnn", "cnn_more_labels"):   # the seeds' mean score: one read-out per kind
        runs = [s for k, s in scores.items() if k.startswith(name + "/")]
        if runs:
            scores[name] = np.mean([(s - s.mean()) / s.std() for s in runs], 0)

    boots = {k: np.asarray(auroc(s, y_te, weights)) for k, s in scores.items()}
    figures = {}
    for name, s in scores.items():
        entry = {"auroc": round(float(auroc(s, y_te)), 4), "ci95": percentile_interval(boots[name])}
        for base in ("untrained", "pixels", "hand_features"):
            if base != name and base in scores:
                lead = boots[name] - boots[base]
                entry[f"lead_over_{base}"] = round(entry["auroc"] - float(auroc(scores[base], y_te)), 4)
                entry[f"lead_over_{base}_ci95"] = percentile_interval(lead)
        figures[name] = entry
    row = {"tag": args.tag, "checkpoint": str(args.checkpoint), "data_root": str(root), "task": args.task,
           "n_train": int(tr.sum()), "n_train_pos": int(y_tr.sum()), "n_test": int(te.sum()),
           "n_test_pos": int(y_te.sum()), "n_test_patients": len(set(task.groups[te].tolist())),
           "extra_train": int(sum(len(y) for y in extra_y)), "extra_train_pos": int(sum(y.sum() for y in extra_y)),
           "extra_roots": args.extra_roots, "bootstrap": args.bootstrap, "bootstrap_unit": unit,
           "margin": args.margin, "epochs": args.epochs, "seeds": args.seeds, "figures": figures,
           "vit": {"epochs": args.vit_epochs, "more_labels_epochs": args.vit_more_labels_epochs,
                   "labels": args.vit_labels, "seeds": args.vit_seeds} if args.vit else None,
           "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"{args.task} on {row['n_test_patients']} test patients ({row['n_test_pos']} positive of {row['n_test']}); "
          f"training {row['n_train_pos']}/{row['n_train']} + extra {row['extra_train_pos']}/{row['extra_train']}")
    for name, e in figures.items():
        leads = "  ".join(f"{b}: {e[f'lead_over_{b}']:+.3f} {e[f'lead_over_{b}_ci95']}"
                          for b in ("untrained", "pixels", "hand_features") if f"lead_over_{b}" in e)
        print(f"  {name:22s} {e['auroc']:.3f} {e['ci95']}  {leads}")
    print(f"({row['seconds']} s) -> {RESULTS}")


if __name__ == "__main__":
    main()
