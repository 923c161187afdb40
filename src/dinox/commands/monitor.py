"""`dinox monitor` / scripts/phase5_monitor.py: heatmaps and embedding statistics of a checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dinox.commands.argtypes import add_network_and_device, path_text
from dinox.run.files import atomic_write_text
from dinox.run.signals import interrupts_raise


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("monitor", help="heatmap.png, input.png, stats.json of a checkpoint")
    p.add_argument("--checkpoint", type=path_text, required=True)
    p.add_argument("--data-root", type=path_text, help="processed root (default: the one the run trained on)")
    p.add_argument("--index-csv", type=path_text,
                   help="index CSV (default: the run's own on its root, else <data-root>/_index/index.csv)")
    p.add_argument("--split-manifest", type=path_text, help="split JSON (default: the run's own on its root, else "
                                                            "<data-root>/_splits/val10_seed0.json)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"],
                   help="the split side the fixed slices are drawn from (default val)")
    add_network_and_device(p)
    p.add_argument("--out", type=path_text,
                   help="run folder to write monitor/step_%%08d_cli/ into (default: the checkpoint's)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    # SIGTERM and SIGHUP too: one line, exit 143 / 129, no temporary file left
    with interrupts_raise(lambda sig: f"monitor stopped by {sig} before it finished; run the same command again "
                                      f"(it rewrites the files it had written)"):
        return _monitor(args)


def _monitor(args) -> int:
    from dinox.data.dataset import CTSliceDataset
    from dinox.observe.monitor_hook import run_monitor
    from dinox.eval.load import open_evaluation

    evaluation = open_evaluation(args.checkpoint, device=args.device, network=args.network,
                                 data_root=args.data_root, index_csv=args.index_csv,
                                 split_manifest=args.split_manifest)
    cfg, root, manifest, index_csv = evaluation.cfg, evaluation.root, evaluation.manifest, evaluation.index_csv
    dataset = CTSliceDataset(root, args.split, manifest, index_csv, context_mm=cfg.views.context_mm)
    run_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    out_dir = run_monitor(evaluation.backbone, dataset, run_dir, evaluation.step, evaluation.device,
                          augment_cfg=cfg.views.to_augment(), out_dim=cfg.model.out_dim, tags=_tags(args, evaluation),
                          source="/".join(Path(args.checkpoint).resolve().parts[-2:]))
    atomic_write_text(out_dir / "inputs.json", json.dumps({
        "checkpoint": str(args.checkpoint), "network": args.network, "split": args.split,
        "data_root": str(root), "split_manifest": str(manifest) if manifest else None,
        "index_csv": str(index_csv) if index_csv else None}, indent=2) + "\n")
    for name in ("heatmap.png", "input.png", "stats.json"):
        print(out_dir / name)
    return 0


def _tags(args, evaluation) -> list[str]:
    """The output folder's name tags: always cli, since even on training's own root, val
    side and teacher the outputs differ from the monitor training wrote at that step (its
    health.json holds the run's throughput, its stats the run's autocast precision); then
    what else differs."""
    from dinox.data.layout import default_manifest, root_tag, same_path

    root, manifest = evaluation.root, evaluation.manifest
    tags = ["cli"]
    if args.split != "val":
        tags.append(args.split)
    if args.network != "teacher":
        tags.append(args.network)
    if not same_path(root, evaluation.trained_root):
        tags.append(root_tag(root))
    elif manifest is not None and not same_path(manifest, evaluation.trained_manifest or default_manifest(root)):
        tags.append(f"split-{Path(manifest).stem}")
    return tags
