"""The periodic side work of a run: the monitor step (heatmaps + stats of fixed validation
slices, the loss curve and a health report, under <run>/monitor/step_%08d/) and the
in-training view-retrieval check."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dinox.data.dataset import pad_collate
from dinox.eval.retrieval import spread_sample
from dinox.observe.health import health_report
from dinox.observe.heatmaps import plot_loss_curve, write_monitor_outputs
from dinox.run.files import atomic_write_text
from dinox.run.logging import console

log = logging.getLogger("dinox.monitor")

MONITOR_SLICES = 4
STATS_SAMPLES = 128


def monitor_samples(dataset) -> list[int]:
    """Fixed, deterministic picks: the middle slice of up to four series."""
    picks = []
    for _, indices in sorted(dataset.series_ranges().items())[:MONITOR_SLICES]:
        picks.append(indices[len(indices) // 2])
    return picks


def _short(series_id: str, keep: int = 16) -> str:
    """A series id short enough for a plot title: a DICOM UID's distinctive tail."""
    return series_id if len(series_id) <= keep + 1 else "…" + series_id[-keep:]


def monitor_folder_name(step: int, tags=()) -> str:
    """monitor/step_{step:08d}, plus what sets the outputs apart from training's own (`dinox
    monitor` adds cli, and another split, network or root), so that they never overwrite those."""
    return "_".join([f"step_{step:08d}", *tags])


def run_monitor(backbone, dataset, run_dir: Path, step: int, device, *, augment_cfg, out_dim=None,
                steps_per_s=None, samples_per_s=None, autocast_dtype=None, tags=(), source: str | None = None) -> Path:
    """Monitor outputs with the run's own preprocessing (`augment_cfg`, an AugmentConfig);
    `source` names what heatmap.png shows (default: the run folder's name)."""
    out_dir = Path(run_dir) / "monitor" / monitor_folder_name(step, tags)
    picks = monitor_samples(dataset)
    stacks = pad_collate([dataset[i] for i in picks])
    stats_batch = pad_collate([dataset[i] for i in spread_sample(dataset.series_ranges(), STATS_SAMPLES, seed=0)])
    names = [f"series {_short(series)}, slice {z}" for series, z in (dataset.locate(i) for i in picks)]
    heading = f"{source or 'run ' + Path(run_dir).name}, step {step}" + (f" ({', '.join(tags)})" if tags else "")
    stats = write_monitor_outputs(
        backbone, stacks, out_dir, img_size=augment_cfg.global_size, augment_cfg=augment_cfg,
        embeddings_batch=stats_batch, autocast_dtype=autocast_dtype, heading=heading, row_names=names,
    )
    metrics_file = Path(run_dir) / "metrics.jsonl"
    if metrics_file.exists():
        plot_loss_curve(metrics_file, Path(run_dir) / "loss_curve.png", out_dim=out_dim)
    health = health_report(device, steps_per_s=steps_per_s, samples_per_s=samples_per_s)
    atomic_write_text(out_dir / "health.json", json.dumps(health, indent=2, default=str) + "\n")
    cls_stats = stats.get("cls_tokens", {})
    log.info(
        "monitor step %d: %s | cls std %s, effective rank %s | health %s",
        step, out_dir,
        _fmt(cls_stats.get("std")), _fmt(cls_stats.get("effective_rank")),
        health_text(health),
    )
    return out_dir


def health_text(health: dict) -> str:
    """The health report's figures for the monitor's log line (not its clock reading)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in health.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def run_retrieval(backbone, dataset, augment_cfg, *, n: int, step: int, device, autocast_dtype, metrics,
                  on_training_split: bool = False) -> dict:
    """View retrieval + effective rank of `backbone` (seed 1234), logged as Eval/* and printed.
    `on_training_split`: the run has no validation split, so these figures score slices it
    trains on; the printed line says so and Eval/On_Training_Split is logged as 1."""
    from dinox.eval.runner import evaluate_backbone

    result = evaluate_backbone(backbone, dataset, augment_cfg, n=n, seed=1234, device=device,
                               autocast_dtype=autocast_dtype)
    logged = {"Eval/Retrieval_Top1": result["top1"], "Eval/Retrieval_Top5": result.get("top5"),
              "Eval/Retrieval_Ratio": result["ratio"], "Eval/Mean_Rank": result["mean_rank"],
              "Eval/Effective_Rank": result["effective_rank"], "Eval/N": result["n"]}
    if on_training_split:
        logged["Eval/On_Training_Split"] = 1.0
    metrics.log(step, logged)
    console(f"eval step={step} retrieval top1={result['top1']:.4f} ratio={result['ratio']:.2f} "
            f"(n={result['n']}) effective_rank={result['effective_rank']:.1f}"
            + (" (on the training split: the run has no validation split)" if on_training_split else ""))
    return result


def run_probe(backbone, cfg, *, step: int, device, metrics) -> dict | None:
    """The labelled nodule probes of `backbone` (no baselines: they do not change during a
    run), logged as Eval/Probe_<task>; None (with a warning) when the root has no labels."""
    from dinox.errors import UserError
    from dinox.eval.probe import probe_backbone

    try:
        result = probe_backbone(backbone, cfg, cfg.io.data_root, split_manifest=cfg.io.split_manifest,
                                seed=cfg.runtime.seed, device=device, baselines=False, max_slices=1024, n_boot=200)
    except UserError as exc:
        log.warning("nodule probe skipped at step %d: %s", step, exc)
        return None
    scores = {f"Eval/Probe_{name}": task["auroc"] for name, task in result["tasks"].items()}
    if not scores:
        why = "; ".join(f"{name}: {reason}" for name, reason in result.get("skipped", {}).items())
        log.warning("nodule probe at step %d found no task it could fit (%s)", step, why or "no samples")
        return None
    metrics.log(step, scores)
    console(f"probe step={step} " + " ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in scores.items()))
    return result
