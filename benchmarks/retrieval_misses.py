#!/usr/bin/env python3
"""What do a checkpoint's retrieval misses have in common with their queries?

    python benchmarks/retrieval_misses.py data/runs/<RUN>/checkpoint_final_00000220.pth [--draws 2]

For each view draw (the run's own training augmentation, seeds 1234, 1235, ...; as
`dinox eval retrieval`), the class tokens of view 1 query those of view 2, and the
nearest key of every missed query is compared with the query on what the views share
or could share:

- the series (the patient) and the slice position |dz| (a model that has learnt the
  anatomy level but not the patient finds other patients at the same |dz| ~ 0);
- the HU window family and the crop area of the two views (a model that is not yet
  invariant to them finds keys cut the same way: a share above chance);

each beside its chance level over all query-key pairs. It also scores the same draw with
other readouts of the teacher (the class token whitened over the draw, and each layer of
the DINO head), which tells whether the slice identity is in the network but not in the
class token's cosine geometry. Diagnosis only: the pass/fail measure stays `dinox eval
retrieval`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dinox.data.augment import CTAugment
from dinox.data.dataset import CTSliceDataset, pad_collate
from dinox.data.layout import INDEX_FILE
from dinox.eval.load import load_for_inference
from dinox.eval.retrieval import nearest_keys, spread_sample, view_retrieval
from dinox.eval.runner import view_augment
from dinox.model.dino_model import build_dino_model


def whiten(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening fitted on the queries and keys together (ZCA up to a rotation)."""
    both = torch.cat([q, k]).double()
    mean = both.mean(0)
    centred = both - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / len(both))
    w = vectors / values.clamp_min(1e-8 * values.max()).sqrt()
    return ((q.double() - mean) @ w), ((k.double() - mean) @ w)


@torch.no_grad()
def draw(model, dataset, cfg, n: int, seed: int) -> dict:
    indices = spread_sample(dataset.series_ranges(), n, seed)
    augment = CTAugment(view_augment(cfg.views.to_augment(), "train"))
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, list[list[torch.Tensor]]] = {}
    family, area = [[], []], [[], []]
    for start in range(0, len(indices), 128):
        views = augment(pad_collate([dataset[i] for i in indices[start:start + 128]]), generator)
        box = views.params["crop_box"]
        for v, image in enumerate(views.global_views):
            family[v].append(views.params["window_family"][v])
            area[v].append((box[v, :, 2] - box[v, :, 0]) * (box[v, :, 3] - box[v, :, 1]))
            h = model.backbone(image)["cls"]
            outs = {"cls": h}
            for j, layer in enumerate(model.head.mlp):
                h = layer(h)
                outs[f"head.mlp.{j}.{type(layer).__name__}"] = h
            outs["head.logits"] = model.head.last_layer(F.normalize(h, dim=-1))
            for name, t in outs.items():
                layers.setdefault(name, [[], []])[v].append(t.float())
    q, k = torch.cat(layers["cls"][0]), torch.cat(layers["cls"][1])
    fam_q, fam_k = torch.cat(family[0]), torch.cat(family[1])
    area_q, area_k = torch.cat(area[0]), torch.cat(area[1])
    where = [dataset.locate(i) for i in indices]
    names = {name: i for i, name in enumerate(sorted({name for name, _ in where}))}
    series = torch.tensor([names[name] for name, _ in where])
    z = torch.tensor([float(p) for _, p in where])
    top = nearest_keys(q, k)
    miss = top != torch.arange(len(top))
    other = miss & (series[top] != series)
    result = {
        "n": len(top), "hits": int((~miss).sum()), "same_series": int((series[top] == series).sum()),
        "other_patient_abs_dz": float((z - z[top])[other].abs().mean()),
        "chance_abs_dz": float((z[:, None] - z[None, :]).abs().mean()),
        "miss_same_window_family": float((fam_q == fam_k[top])[miss].float().mean()),
        "chance_same_window_family": float((fam_q[:, None] == fam_k[None, :]).float().mean()),
        "miss_abs_crop_area_difference": float((area_q - area_k[top])[miss].abs().mean()),
        "chance_abs_crop_area_difference": float((area_q[:, None] - area_k[None, :]).abs().mean()),
        "hit_rate_same_family": float((~miss)[fam_q == fam_k].float().mean()),
        "hit_rate_other_family": float((~miss)[fam_q != fam_k].float().mean()),
    }
    readouts = {name: view_retrieval(torch.cat(a), torch.cat(b))["ratio"] for name, (a, b) in layers.items()}
    readouts["cls whitened"] = view_retrieval(*whiten(q, k))["ratio"]
    result["hits_by_readout"] = readouts
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--network", choices=["teacher", "student"], default="teacher")
    args = p.parse_args()
    device = torch.device("cpu")
    _, cfg, meta = load_for_inference(args.checkpoint, device, which=args.network)
    with torch.device("cpu"):
        model = build_dino_model(cfg.model, img_size=cfg.views.img_size, drop_path=0.0)
    model.load_state_dict(meta.raw[args.network])
    model.eval()
    root = Path(cfg.io.data_root)
    dataset = CTSliceDataset(root, "val", cfg.io.split_manifest, root / INDEX_FILE,
                             context_mm=cfg.views.context_mm)
    for d in range(args.draws):
        print(json.dumps({"seed": args.seed + d, **draw(model, dataset, cfg, args.n, args.seed + d)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
