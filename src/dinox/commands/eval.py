"""`dinox eval retrieval`: label-free view retrieval + effective rank of a checkpoint.

Exit codes: 0 pass (ratio >= --min-ratio), 2 fail, 1 bad input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dinox.errors import UserError

EXIT_PASS = 0
EXIT_FAIL = 2
DEFAULT_MIN_RATIO = 3.0  # the seed guide's first proof of semantic learning (run nano_aug_test)


def add_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a dinox checkpoint (.pth)")
    p.add_argument("--split-manifest", help="split JSON (default <data-root>/_splits/val10_seed0.json)")
    p.add_argument("--index-csv", help="index CSV (default <data-root>/_index/index.csv)")
    p.add_argument("--data-root", help="processed root (default: the folder above the index CSV's _index/)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"], help="which side of the split (val)")
    p.add_argument("--n", type=int, default=4096, help="validation samples (all of them if the split has fewer)")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 5], help="k values to report (default 1 5)")
    p.add_argument("--min-ratio", type=float, default=DEFAULT_MIN_RATIO,
                   help=f"pass threshold on top1 / (1/n) (default {DEFAULT_MIN_RATIO})")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sample draw and the views")
    p.add_argument("--network", choices=["teacher", "student"], default="teacher")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "rocm", "mps", "cpu"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", help="folder for the JSON (default: beside the checkpoint)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="label-free validation of a checkpoint")
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL")
    retrieval = sub.add_parser("retrieval", help="view retrieval (top-1/top-k vs chance) and effective rank")
    add_retrieval_arguments(retrieval)
    retrieval.set_defaults(func=run_retrieval)
    parser.set_defaults(func=lambda args: parser.print_help() or 1)
    return parser


def resolve_data_paths(data_root, index_csv, split_manifest) -> tuple[Path, Path | None, Path | None]:
    if data_root is None:
        if index_csv is None:
            data_root = "data/processed"
        else:
            index_path = Path(index_csv)
            data_root = index_path.parent.parent if index_path.parent.name == "_index" else index_path.parent
    return Path(data_root), Path(index_csv) if index_csv else None, Path(split_manifest) if split_manifest else None


def run_retrieval(args) -> int:
    import torch

    from dinox.data.dataset import CTSliceDataset
    from dinox.eval.runner import evaluate_backbone
    from dinox.run.device import detect_device
    from dinox.eval.load import load_for_inference

    if args.n < 2:
        raise UserError(f"--n {args.n} is too small: retrieval needs at least 2 samples")
    info, notes = detect_device(args.device)
    for note in notes:
        print(f"warning: {note}")
    device = torch.device(info.torch_device)
    backbone, cfg, meta = load_for_inference(args.checkpoint, device, which=args.network)
    root, index_csv, manifest = resolve_data_paths(args.data_root, args.index_csv, args.split_manifest)
    dataset = CTSliceDataset(root, args.split, manifest, index_csv)
    available = len(dataset)
    if available < args.n:
        print(f"note: the {args.split} split holds {available} samples, fewer than --n {args.n}; using all of them")
    result = evaluate_backbone(
        backbone, dataset, cfg.views.to_augment(), n=args.n, seed=args.seed, device=device, ks=tuple(args.topk),
        batch_size=args.batch_size,
    )
    passed = result["ratio"] >= args.min_ratio
    result.update(
        step=meta.step,
        checkpoint=str(args.checkpoint),
        split=args.split,
        min_ratio=args.min_ratio,
        passed=passed,
        network=args.network,
    )
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"view_retrieval_step{meta.step}_N{result['n']}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    tops = " ".join(f"top{k}={result[f'top{k}']:.4f}" for k in args.topk)
    print(
        f"view retrieval step={meta.step} n={result['n']} ({result['series']} series) {tops} "
        f"baseline={result['baseline']:.6f} ratio={result['ratio']:.2f} effective_rank={result['effective_rank']:.1f}"
    )
    print(f"{'PASS' if passed else 'FAIL'}: ratio {result['ratio']:.2f} {'>=' if passed else '<'} {args.min_ratio} -> {out_path}")
    return EXIT_PASS if passed else EXIT_FAIL
