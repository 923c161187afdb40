"""Label-free view retrieval and effective rank of a backbone on a validation split.

Two augmented views of each of n validation slices (the training augmentation, own seed)
are embedded by the backbone's class token; view 1 queries must retrieve their own view 2
among all n keys. Chance is 1/n, so ratio = top1 * n measures how far above chance the
features are (seed guide, "Label-free Validation").

`views` chooses what the two views differ by, to tell which invariance a model lacks:
"train" (the default and the pass/fail measure) is the run's own global-view
augmentation; "uncropped" keeps its HU windows and flips but shows the whole slice (no
random resized crop); "uncropped-lung" shows the whole slice to both views in the lung
window family (with the run's window jitter and flips). A model that scores far higher uncropped than with its training views
has learnt window invariance but not crop invariance; compare each with the untrained
network, which already scores well uncropped (its two views are nearly the same image).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from dinox.data.augment import LUNG_WINDOW, AugmentConfig, CTAugment
from dinox.data.dataset import CTSliceDataset, pad_collate
from dinox.data.parallel import Progress
from dinox.eval.rank import effective_rank, embedding_std
from dinox.eval.retrieval import nearest_keys, spread_sample, view_retrieval


@torch.no_grad()
def embed_views(backbone, dataset, indices, augment, generator, device, autocast_dtype=None, batch_size=128,
                progress=False):
    """Class-token embeddings (float32, L2-normalised) of the two global views of each index.
    `progress` shows a bar on stderr, or a line with the time left every minute where stderr
    is no terminal (nohup, a scheduler's log; `Progress`); off inside training."""
    first, second = [], []
    bar = Progress(len(indices), "retrieval: embedding", "slice", progress)
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            stacks = pad_collate([dataset[i] for i in chunk]).to(device)
            views = augment(stacks, generator)
            for out, view in zip((first, second), views.global_views):
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    cls = backbone(view)["cls"]
                out.append(F.normalize(cls.float(), dim=-1).cpu())
            bar.update(len(chunk))
    finally:
        bar.close()
    return torch.cat(first), torch.cat(second)


VIEWS = ("train", "uncropped", "uncropped-lung")


def view_augment(augment_cfg: AugmentConfig, views: str = "train") -> AugmentConfig:
    """The two global views' augmentation for `views` (see the module docstring)."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    cfg = replace(augment_cfg, n_local=0)
    if views == "train":
        return cfg
    whole = replace(cfg, global_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    if views == "uncropped":
        return whole
    return replace(whole, window_families=(LUNG_WINDOW,), distinct_global_windows=False)


def evaluate_backbone(
    backbone,
    dataset: CTSliceDataset,
    augment_cfg: AugmentConfig,
    *,
    n: int,
    seed: int,
    device: torch.device,
    autocast_dtype=None,
    ks=(1, 5),
    batch_size: int = 128,
    progress: bool = False,
    views: str = "train",
) -> dict:
    """Retrieval metrics and effective rank; restores the backbone's training mode after.

    Also `top1_same_series`: the share of queries whose nearest key is a view of any slice
    of their own series (the exact slice included), i.e. how often the features at least
    find the patient; with 12 near-identical neighbouring slices per series, it tells a
    model that knows the patient but not the slice from one that knows neither."""
    was_training = backbone.training
    backbone.eval()
    try:
        indices = spread_sample(dataset.series_ranges(), n, seed)
        augment = CTAugment(view_augment(augment_cfg, views))
        generator = torch.Generator().manual_seed(seed)
        queries, keys = embed_views(backbone, dataset, indices, augment, generator, device, autocast_dtype, batch_size,
                                   progress)
    finally:
        backbone.train(was_training)
    result = view_retrieval(queries, keys, ks=ks)
    result["effective_rank"] = float(effective_rank(queries))
    result["embedding_std"] = embedding_std(queries)
    result["requested_n"] = n
    series = [dataset.locate(i)[0] for i in indices]
    result["series"] = len(set(series))
    top = nearest_keys(queries, keys).tolist()
    result["top1_same_series"] = sum(series[t] == series[i] for i, t in enumerate(top)) / len(indices)
    result["views"] = views
    return result


DRAW_AVERAGED = ("ratio", "mean_rank", "effective_rank", "embedding_std", "top1_same_series")


def evaluate_draws(backbone, dataset: CTSliceDataset, augment_cfg: AugmentConfig, *, draws: int, seed: int,
                   **kwargs) -> dict:
    """`evaluate_backbone` over `draws` independent draws of the views (seeds `seed`,
    `seed` + 1, ...), the figures averaged. One draw is a noisy measure at a few per cent
    top-1: the 480 queries are a binomial sample, and on the demo data two draws of the same
    checkpoint differ by up to 12 hits (docs/recipes.md), so recipes and checkpoints are
    compared on the mean. `draws` holds each draw's top-1, ratio and mean rank."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    results = [evaluate_backbone(backbone, dataset, augment_cfg, seed=seed + d, **kwargs) for d in range(draws)]
    if draws == 1:
        return results[0]
    merged = dict(results[0])
    for key in [k for k in merged if k.startswith("top") and k[3:].isdigit()] + list(DRAW_AVERAGED):
        merged[key] = sum(r[key] for r in results) / draws
    merged["draws"] = [{"seed": seed + d, "top1": r["top1"], "ratio": r["ratio"], "mean_rank": r["mean_rank"]}
                       for d, r in enumerate(results)]
    return merged


def draw_ratios(result: dict) -> list[float]:
    """Each view draw's ratio (hits = top1 x n) of an `evaluate_draws` result."""
    return [d["ratio"] for d in result.get("draws", [result])]


def against_untrained(trained: dict, untrained: dict) -> dict:
    """The trained network's retrieval as a multiple of the untrained network's, both scored
    by `evaluate_draws` on the same view draws: `x_untrained` (the ratio of their mean hits)
    with its paired 95 % interval over the draws (None for one draw), and the untrained
    network's own figures. The untrained network's hits (~4-14 of 480 on the phantoms) sit
    in the denominator, so one draw can move the multiple by a third (docs/recipes.md, "How
    many view draws")."""
    hits, hits0 = draw_ratios(trained), draw_ratios(untrained)
    out = {"untrained": {"ratio": untrained["ratio"], "top1": untrained["top1"],
                         "mean_rank": untrained["mean_rank"], "draws": hits0},
           "x_untrained": None, "x_untrained_ci95": None}
    if sum(hits0) > 0:
        out["x_untrained"], out["x_untrained_ci95"] = paired_draw_ratio(hits, hits0)
    return out


def paired_draw_ratio(numerator: list[float], denominator: list[float], *, n_boot: int = 10000,
                      seed: int = 0) -> tuple[float, list[float] | None]:
    """sum(numerator) / sum(denominator) of two networks scored on the same view draws (for
    example the trained and the untrained network's hits), with a 95 % percentile-bootstrap
    interval that resamples whole draws, so each resample keeps the pairing of the two
    networks on one draw. The interval is None with fewer than 2 draws; its upper end is None
    (unbounded) where more than 2.5 % of the resamples hold only draws whose denominator is 0. A ratio of the mean
    hits over a handful of draws is noisy where the denominator is a small count (an
    untrained network at ~10 of 480): on head seed 2 four draws read 2.96x and sixteen
    3.57x [3.14, 4.11] (docs/recipes.md, "How many view draws")."""
    from dinox.eval.stats import bootstrap_weights

    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty lists of draws, got {a.shape} and {b.shape}")
    if b.sum() <= 0:
        raise ValueError("the denominator's draws sum to 0: the ratio is undefined")
    ratio = float(a.sum() / b.sum())
    if a.size < 2:
        return ratio, None
    counts, _ = bootstrap_weights(np.arange(a.size), n_boot, seed)   # each draw its own unit
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (counts @ a) / (counts @ b)
    # a resample of draws where the denominator found nothing is an unbounded ratio, the top
    # of the distribution, not a resample to leave out (that would cut the interval's top);
    # only 0 / 0 carries no information
    ratios = ratios[~np.isnan(ratios)]
    if ratios.size == 0:
        return ratio, None
    lo, hi = np.percentile(np.where(np.isinf(ratios), np.finfo(np.float64).max, ratios), [2.5, 97.5])
    return ratio, [round(float(lo), 4), None if np.mean(np.isinf(ratios)) > 0.025 else round(float(hi), 4)]
