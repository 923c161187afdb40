#!/usr/bin/env python3
"""Why is a run's teacher at the entropy wall? How far apart its class tokens, its DINO
head's bottleneck outputs and its prototype logits lie across slices.

    python benchmarks/head_diversity.py data/runs/<RUN>/checkpoint_final_00000300.pth [--slices 64]

The DINO target of a slice is softmax((logits - centre) / T): the centre removes what all
slices share, so a target can only be as far from uniform as the logits of different
slices are apart. This embeds `--slices` validation slices (spread over the split, the
deterministic lung-window input of the probes) through the chosen network and prints:

- the mean pairwise cosine of the class tokens and of the head's bottleneck outputs
  (1.0: every slice the same);
- the spread of each prototype's logit across the slices (std, averaged over prototypes),
  beside the temperature it is divided by;
- the entropy of the batch-centred targets at the run's final and starting teacher
  temperatures, against ln(out_dim);
- with iBOT, the same for every patch token through the iBOT head, and the share of the
  iBOT logits' variance that lies between slices (the rest is between the patches of a
  slice);
- how far training moved the patch tokens: their linear CKA (Kornblith et al. 2019) with
  the same run's untrained network on the same input, over all patches and with each grid
  position's mean removed (1.0: the same geometry), and the share of a patch token the
  blocks add (||x_L - x_0|| / ||x_L|| before the final norm; at LayerScale 0.1 the rest is
  the patch and position embedding).

Diagnosis only; the run's own Entropy_Teacher metric is the measure the guard watches.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dinox.config import config_from_checkpoint
from dinox.data.dataset import CTSliceDataset
from dinox.data.layout import INDEX_FILE
from dinox.eval.probe import model_input, untrained_backbone
from dinox.model.dino_model import build_dino_model
from dinox.run import checkpoint as store


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x.float(), dim=-1)
    n = x.shape[0]
    return float(((x @ x.T).sum() - n) / (n * n - n))


def centred_entropy(logits: torch.Tensor, temp: float) -> float:
    """Mean entropy (nats) of softmax((logits - batch mean) / temp): the EMA centre at rest."""
    p = F.softmax((logits - logits.mean(0, keepdim=True)) / temp, dim=-1)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


@torch.no_grad()
def diversity(checkpoint: Path, slices: int, which: str) -> dict:
    state = store.load_checkpoint(checkpoint, map_location="cpu")
    cfg = config_from_checkpoint(state)
    model = build_dino_model(cfg.model, img_size=cfg.views.img_size, drop_path=0.0)
    model.load_state_dict(state[which])
    model.eval()
    root = Path(cfg.io.data_root)
    dataset = CTSliceDataset(root, "val", cfg.io.split_manifest, root / INDEX_FILE,
                             context_mm=cfg.views.context_mm)
    picks = torch.linspace(0, len(dataset) - 1, min(slices, len(dataset))).long().tolist()
    x = torch.cat([model_input(dataset[i][None], cfg, cfg.views.img_size) for i in picks])
    out, block_share = _forward_with_block_share(model.backbone, x)
    cls = out["cls"]
    bottleneck = model.head.mlp(cls)
    logits = model.head.last_layer(F.normalize(bottleneck, dim=-1))
    s = cfg.ssl
    temps = (s.teacher_temp_start, s.teacher_temp)
    patch = {}
    if model.has_ibot:
        patch = _patch_figures(out["patches"], model.ibot_head, temps)
    untrained, untrained_share = _forward_with_block_share(untrained_backbone(cfg, torch.device("cpu")), x)
    movement = _patch_movement(out["patches"], untrained["patches"])
    return {
        "checkpoint": str(checkpoint), "network": which, "step": int(state.get("step", 0)), "slices": len(picks),
        "cls_pairwise_cos": round(mean_pairwise_cosine(cls), 5),
        "bottleneck_pairwise_cos": round(mean_pairwise_cosine(bottleneck), 5),
        "logit_std_across_slices": float(f"{logits.std(0).mean():.3g}"),
        "teacher_temps": list(temps),
        "entropy_at_temps": [round(centred_entropy(logits, t), 3) for t in temps],
        "wall": round(math.log(logits.shape[1]), 3),
        **patch,
        **movement,
        "patch_block_share": block_share,
        "patch_block_share_untrained": untrained_share,
    }


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment of two (n, d) feature sets of the same n inputs."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


def _forward_with_block_share(net, x: torch.Tensor) -> tuple[dict, float]:
    """The backbone's outputs on `x`, and the mean share of a patch token that its blocks
    add: ||x_L - x_0|| / ||x_L||, before the final norm."""
    seen = {}
    hooks = [net.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("first", a[0])),
             net.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("last", a[0]))]
    try:
        out = net(x)
    finally:
        for hook in hooks:
            hook.remove()
    n = out["patches"].shape[1]
    first, last = seen["first"][:, -n:], seen["last"][:, -n:]
    return out, round(float(((last - first).norm(dim=-1) / last.norm(dim=-1)).mean()), 3)


def _patch_movement(trained: torch.Tensor, untrained: torch.Tensor) -> dict:
    """Linear CKA of the (B, N, D) patch tokens of the trained and the untrained network on
    the same input: over all patches, and of the content (each grid position's mean over
    the slices removed)."""
    t, u = trained, untrained
    return {
        "patch_cka_to_untrained": round(linear_cka(t.flatten(0, 1), u.flatten(0, 1)), 4),
        "patch_content_cka_to_untrained": round(linear_cka((t - t.mean(0)).flatten(0, 1),
                                                           (u - u.mean(0)).flatten(0, 1)), 4),
    }


def _patch_figures(patches: torch.Tensor, head, temps) -> dict:
    """The same figures for the patch tokens through the iBOT head (every patch of every
    slice, as the teacher targets all masked patches of a batch), plus how much of the
    logits' spread lies between slices rather than between the patches of one slice."""
    b, n, d = patches.shape
    tokens = patches.reshape(b * n, d)
    bottleneck = head.mlp(tokens)
    logits = head.last_layer(F.normalize(bottleneck, dim=-1))
    per_slice = logits.reshape(b, n, -1)
    total = logits.var(0).mean()
    between = per_slice.mean(1).var(0).mean()
    sample = torch.randperm(b * n, generator=torch.Generator().manual_seed(0))[:2048]   # the same patches for both
    return {
        "patch_pairwise_cos": round(mean_pairwise_cosine(tokens[sample]), 5),
        "ibot_bottleneck_pairwise_cos": round(mean_pairwise_cosine(bottleneck[sample]), 5),
        "ibot_logit_std_across_patches": float(f"{logits.std(0).mean():.3g}"),
        "ibot_logit_var_between_slices": round(float(between / total), 3),
        "ibot_entropy_at_temps": [round(centred_entropy(logits, t), 3) for t in temps],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--network", choices=("teacher", "student"), default="teacher")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))  # leave a core to a running job
    print(json.dumps(diversity(args.checkpoint, args.slices, args.network)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
