"""Watching a run: embedding statistics, heatmaps, the loss curve, and a health report.

Everything here is read-only with respect to training: `write_monitor_outputs` puts the
backbone in eval mode under `torch.no_grad()` and restores every submodule's training flag
afterwards, and `health_report` never raises (a monitoring hiccup must not kill a two-week
run).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dinox.data.augment import LUNG_WINDOW, AugmentConfig, fixed_window_input, window_unit
from dinox.errors import UserError
from dinox.eval.rank import embedding_stats
from dinox.observe.metrics import json_safe
from dinox.run.files import atomic_write, atomic_write_text

log = logging.getLogger("dinox.monitor")

# ----------------------------------------------------------------------------- heatmaps

def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    for attr in ("_orig_mod", "module"):
        while hasattr(module, attr) and isinstance(getattr(module, attr), torch.nn.Module):
            module = getattr(module, attr)
    return module


def _resize_to_patches(hu: torch.Tensor, patch: int, img_size: int | None) -> torch.Tensor:
    h, w = hu.shape[-2:]
    def nearest(n):
        return max(1, math.floor(n / patch + 0.5)) * patch

    th, tw = (nearest(img_size), nearest(img_size)) if img_size is not None else (nearest(h), nearest(w))
    if (th, tw) == (h, w):
        return hu
    return F.interpolate(hu, size=(th, tw), mode="bilinear", align_corners=False,
                         antialias=th < h or tw < w)


def _to_grid(values: torch.Tensor, gh: int, gw: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, N) patch values -> (B, H, W) bilinearly upsampled to the image."""
    grid = values.float().reshape(-1, 1, gh, gw)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]


def _cls_attention(backbone, x: torch.Tensor, n_patches: int) -> torch.Tensor | None:
    """Last-layer attention of the class token to the patch tokens, mean over heads (B, N)."""
    if not hasattr(backbone, "last_attention"):
        return None
    try:
        attn = backbone.last_attention(x)
    except Exception as e:  # a heatmap panel is not worth failing the monitor for
        log.warning("last_attention failed (%s: %s); CLS attention panel skipped", type(e).__name__, e)
        return None
    return attn[:, :, 0, -n_patches:].float().mean(dim=1)


def _save_png(fig, path: Path) -> None:
    # a temporary name of this process's own: training's monitor step and a `dinox monitor`
    # of the same run write its loss_curve.png, and a shared one let them cut each other's file
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def _plot_heatmaps(slices, norm_maps, attn_maps, out: Path, heading: str | None = None,
                   row_names: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(slices)
    fig, axes = plt.subplots(rows, 3, figsize=(13.5, 4.2 * rows), squeeze=False)
    for r in range(rows):
        img = slices[r]
        ax = axes[r]
        ax[0].imshow(img, cmap="gray", vmin=0, vmax=1)
        ax[0].set_title(f"input: {row_names[r]}" if row_names else "input (centre slice)")
        for a, hmap, title in ((ax[1], norm_maps[r], "patch-token L2 norm"),
                               (ax[2], attn_maps[r] if attn_maps is not None else None,
                                "last-layer CLS attention (mean over heads)")):
            a.imshow(img, cmap="gray", vmin=0, vmax=1)
            if hmap is None:
                a.text(0.5, 0.5, "unavailable", ha="center", va="center", color="white",
                       transform=a.transAxes)
            else:
                im = a.imshow(hmap, cmap="inferno", alpha=0.55)
                fig.colorbar(im, ax=a, fraction=0.046, pad=0.04)
            a.set_title(title)
        for a in ax:
            a.axis("off")
    if heading:
        fig.suptitle(heading, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (4.2 * rows)) if heading else None)   # 0.3 in for the title
    _save_png(fig, out / "heatmap.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(slices[0], cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    _save_png(fig, out / "input.png")
    plt.close(fig)


class _EvalMode:
    """eval() + no_grad for the duration; restores each submodule's own training flag."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


@torch.no_grad()
def _class_embeddings(backbone, batch: torch.Tensor, preprocess, patch: int,
                      img_size: int | None, device, dtype, chunk: int = 32) -> torch.Tensor:
    if batch.ndim == 2:
        return batch.detach().float()
    outs = []
    for i in range(0, batch.shape[0], chunk):
        x = _resize_to_patches(batch[i:i + chunk].to(device).float(), patch, img_size)
        outs.append(backbone(preprocess(x).to(dtype))["cls"].float().cpu())
    return torch.cat(outs)


def write_monitor_outputs(backbone: torch.nn.Module, stack_hu: torch.Tensor, out_dir: str | os.PathLike,
                          window: tuple[float, float] = LUNG_WINDOW, img_size: int | None = None,
                          augment_cfg: AugmentConfig | None = None,
                          embeddings_batch: torch.Tensor | None = None,
                          preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          max_rows: int = 4, autocast_dtype: torch.dtype | None = None,
                          heading: str | None = None, row_names: list[str] | None = None) -> dict:
    """Write input.png, heatmap.png and stats.json for one stack (or a few) into `out_dir`.

    stack_hu: (3, H, W) or (B, 3, H, W) raw HU (any dtype). It is resized to a multiple of
    the patch size (to `img_size` square if given), then `preprocess` turns it into the
    model input (default: `fixed_window_input` with the run's `augment_cfg`, i.e. the
    training preprocessing at the fixed `window`). `window` is also the display window.
    embeddings_batch: optional (n, 3, H, W) raw-HU stacks whose class tokens are computed,
    or precomputed (n, D) class embeddings; adds `cls_tokens` stats (the cross-image
    collapse statistic) to stats.json.
    autocast_dtype: run the forward passes under torch.autocast with this dtype (the
    training precision; saves memory for large models); statistics are computed in float32.
    heading: heatmap.png's title (which run and step: PNGs of many steps get compared side
    by side); row_names: each stack's name (its series and slice).
    Returns the stats dict written to stats.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _unwrap(backbone)
    patch = int(model.patch_size)
    if preprocess is None:
        def preprocess(t, _w=tuple(window)):
            return fixed_window_input(t, augment_cfg, _w)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    hu = stack_hu if stack_hu.ndim == 4 else stack_hu.unsqueeze(0)
    if hu.ndim != 4 or hu.shape[1] != 3:
        raise UserError(f"monitor input must be (3,H,W) or (B,3,H,W) HU stacks, got {tuple(stack_hu.shape)}")
    hu = _resize_to_patches(hu.to(device).float(), patch, img_size)
    h, w = hu.shape[-2:]
    gh, gw = h // patch, w // patch

    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with _EvalMode(model), autocast:
        x = preprocess(hu).to(dtype)
        tokens = model(x)
        patches = tokens["patches"].float()
        n = patches.shape[1]
        if n != gh * gw:
            raise ValueError(f"backbone returned {n} patch tokens, expected {gh}x{gw} for a {h}x{w} input")
        norms = patches.norm(dim=-1)
        attn = _cls_attention(model, x, n)
        cls_stats = None
        if embeddings_batch is not None:
            cls_stats = embedding_stats(_class_embeddings(model, embeddings_batch, preprocess,
                                                          patch, img_size, device, dtype))

    rows = min(hu.shape[0], max_rows)
    slices = window_unit(hu[:rows, 1], *window).cpu().numpy()
    norm_maps = _to_grid(norms[:rows], gh, gw, (h, w)).cpu().numpy()
    attn_maps = _to_grid(attn[:rows], gh, gw, (h, w)).cpu().numpy() if attn is not None else None
    _plot_heatmaps(slices, norm_maps, attn_maps, out, heading, row_names[:rows] if row_names else None)

    patch_stats = embedding_stats(patches)
    stats = {
        "std": patch_stats["std"],
        "cls_std": cls_stats["std"] if cls_stats else None,
        "patch_tokens": patch_stats,
        "token_norm": {"min": float(norms.min()), "max": float(norms.max()), "mean": float(norms.mean())},
        "input": {"shape": [int(s) for s in hu.shape], "patch_size": patch, "grid": [gh, gw],
                  "window": {"level": float(window[0]), "width": float(window[1])}},
    }
    if cls_stats is not None:
        stats["cls_tokens"] = cls_stats
    if attn is not None:
        a = attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        entropy = -(a * a.clamp_min(1e-12).log()).sum(dim=-1).mean()
        stats["cls_attention"] = {"entropy": float(entropy), "uniform_entropy": math.log(n),
                                  "max": float(attn.max())}
    stats = json_safe(stats)
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, allow_nan=False) + "\n")
    return stats


# ----------------------------------------------------------------------------- loss curve

# Points per series of the loss curve: a figure 10 inches wide shows no more, and a run of
# weeks logs hundreds of thousands of steps (read whole, they took 1.1 GB and 14 s at each
# monitor step of a 15-day run at 5 s a step).
LOSS_CURVE_POINTS = 2000


class _Bins:
    """One series read into at most about `limit` points: each step its own point until
    there are more, then the means of 2, 4, 8, ... consecutive steps (by step number), so
    memory stays bounded however long the run. Unbinned, a step read twice keeps the later
    value."""

    def __init__(self, limit: int | None):
        self.limit, self.width, self.bins = limit, 1, {}

    def add(self, step: int, value: float) -> None:
        if self.width == 1:
            self.bins[step] = [value, step, 1]
        else:
            b = self.bins.setdefault(step // self.width, [0.0, 0, 0])
            b[0], b[1], b[2] = b[0] + value, b[1] + step, b[2] + 1
        if self.limit is not None and len(self.bins) > self.limit:
            merged: dict[int, list] = {}
            for key, (total, steps, n) in self.bins.items():
                b = merged.setdefault(key // 2, [0.0, 0, 0])
                b[0], b[1], b[2] = b[0] + total, b[1] + steps, b[2] + n
            self.bins, self.width = merged, self.width * 2

    def points(self) -> list[tuple[int, float]]:
        return [(round(steps / n), total / n) for _, (total, steps, n) in sorted(self.bins.items())]


def read_metrics(metrics_jsonl: str | os.PathLike, keep: Callable[[str], bool] | None = None,
                 max_points: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} sorted by step, from a metrics.jsonl.

    Skips unreadable lines (a crash can leave a partial last line), null/non-numeric
    values; when a step appears twice (a resume without truncation) the later line wins,
    until the series is binned (then both count in their bin's mean). `keep(name)`: only the
    series it accepts. `max_points`: at most that many points per series, past it the means of
    consecutive steps (see `_Bins`), in memory that does not grow with the run (the time to
    read the file still does: about 5 s at 260k rows).
    """
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}; pass the run's metrics.jsonl")
    series: dict[str, _Bins] = {}
    wanted: dict[str, bool] = {"step": False, "time": False}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                continue
            for k, v in rec.items():
                take = wanted.get(k)
                if take is None:
                    take = wanted[k] = keep is None or bool(keep(k))
                if not take or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    bins = series.get(k)
                    if bins is None:
                        bins = series[k] = _Bins(max_points)
                    bins.add(step, float(v))
    return {k: bins.points() for k, bins in series.items()}


def plot_loss_curve(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                    out_dim: int | None = None) -> None:
    """Total loss and each `loss*` term vs step, lr on a twin axis.

    Terms that are always positive share a log-y panel; a term that reaches zero or below
    (KoLeo can) goes to a second, linear panel underneath so it does not flatten the rest.
    With `out_dim`, a dashed line marks the entropy wall ln(out_dim): a DINO loss parked
    there means near-uniform outputs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_jsonl, keep=lambda k: k.lower().startswith("loss") or k == "lr",
                          max_points=LOSS_CURVE_POINTS)
    losses = sorted((k for k in series if k.lower().startswith("loss")),
                    key=lambda k: (k.lower() != "loss", k))
    positive = [k for k in losses if min(v for _, v in series[k]) > 0]
    signed = [k for k in losses if k not in positive]
    if signed:
        fig, (ax, ax_lin) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        ax_lin = None
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])

    def draw(axis, k):
        steps, vals = zip(*series[k])
        total = k.lower() == "loss"
        axis.plot(steps, vals, label=k, linewidth=2.0 if total else 1.0,
                  color="black" if total else next(colors))

    for k in positive:
        draw(ax, k)
    if out_dim:
        wall = math.log(out_dim)
        ax.axhline(wall, linestyle="--", color="gray", linewidth=1.0,
                   label=f"entropy wall ln({out_dim})={wall:.3f}")
    if positive or out_dim:
        ax.set_yscale("log")
    if not losses:
        ax.text(0.5, 0.5, "no loss values logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("loss (log)")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "lr" in series:
        ax2 = ax.twinx()
        steps, vals = zip(*series["lr"])
        ax2.plot(steps, vals, color="tab:green", linestyle=":", linewidth=1.2, label="lr")
        ax2.set_ylabel("learning rate", color="tab:green")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
                  fontsize=8, frameon=False)
    if ax_lin is not None:
        for k in signed:
            draw(ax_lin, k)
        ax_lin.axhline(0.0, color="gray", linewidth=0.6)
        ax_lin.set_ylabel("loss (linear)")
        ax_lin.grid(True, alpha=0.3)
        ax_lin.legend(loc="upper right", fontsize=8)
    (ax_lin or ax).set_xlabel("step")
    fig.suptitle(f"training loss ({Path(metrics_jsonl).parent.name})")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, out)
    plt.close(fig)
