"""`dinox eval retrieval` (label-free view retrieval + effective rank) and `dinox eval probe`
(labelled validation: frozen-feature linear probes for nodules) of a checkpoint.

Exit codes: 0 pass (retrieval: ratio >= --min-ratio; probe: AUROC >= --min-auroc on
slice_nodule and patch_nodule), 2 fail, 1 bad input.

Result files carry what changes the result in their name (issue 16, defect 14), so that
runs on other splits or seeds never overwrite each other: the defaults give the plain
name (view_retrieval_step{step}_N{n}.json, probe_step{step}.json); otherwise the split
and seed follow, e.g. probe_step{step}_val_seed1.json, plus the network when it is the
student, a short hash of the processed root when it is not the one the run trained on, and
the probe's own settings where they are not the defaults (probe_tags).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from dinox.commands.argtypes import (
    add_network_and_device,
    float_at_least,
    nonneg_int,
    path_text,
    positive_int,
    seed_int,
)
from dinox.errors import UserError
from dinox.run.files import atomic_write_text
from dinox.run.signals import interrupts_raise

EXIT_PASS = 0
EXIT_FAIL = 2
DEFAULT_MIN_RATIO = 3.0  # the seed guide's first proof of semantic learning (run nano_aug_test)
RETRIEVAL_DEFAULTS = {"split": "val", "seed": 1234}
FEW_QUERIES = 100  # below this many queries a retrieval figure is mostly the luck of a few hits
PROBE_DEFAULTS = {"split": "auto", "seed": 0}


def add_retrieval_arguments(p: argparse.ArgumentParser) -> None:
    from dinox.eval.runner import VIEWS

    p.add_argument("--checkpoint", type=path_text, required=True, help="a dinox checkpoint (.pth)")
    p.add_argument("--split-manifest", type=path_text, help="split JSON (default: the run's own on its root, else "
                                                            "<data-root>/_splits/val10_seed0.json)")
    p.add_argument("--index-csv", type=path_text,
                   help="index CSV (default: the run's own on its root, else <data-root>/_index/index.csv)")
    p.add_argument("--data-root", type=path_text,
                   help="processed root (default: the folder above --index-csv's _index/ when given, "
                        "else the run's data root)")
    p.add_argument("--split", default=RETRIEVAL_DEFAULTS["split"], choices=["val", "train", "all"],
                   help="which side of the split (val)")
    p.add_argument("--n", type=positive_int, default=4096, help="validation samples (all of them if the split has fewer)")
    p.add_argument("--topk", type=positive_int, nargs="+", default=[1, 5], help="k values to report (default 1 5)")
    p.add_argument("--min-ratio", type=float_at_least(0), default=DEFAULT_MIN_RATIO,
                   help=f"pass threshold on top1 / (1/n) (default {DEFAULT_MIN_RATIO})")
    p.add_argument("--seed", type=seed_int, default=RETRIEVAL_DEFAULTS["seed"], help="seed of the sample draw and the views")
    p.add_argument("--draws", type=positive_int, default=1,
                   help="independent draws of the views (seeds --seed, --seed + 1, ...), the figures averaged: one "
                        "draw at a few per cent top-1 is noisy, so compare checkpoints on 4 or more (default 1)")
    p.add_argument("--views", default="train", choices=list(VIEWS),
                   help="what the two views differ by: the run's augmentation (train, the measure), its windows "
                        "and flips on the whole slice (uncropped), or the lung window on the whole slice "
                        "(uncropped-lung); a diagnosis of which invariance is missing")
    p.add_argument("--untrained", action="store_true",
                   help="also score the run's untrained network (its step-0 weights, rebuilt from the run's seed; "
                        "random init also for a run started with --init-from, as the result notes) "
                        "on the same view draws, and report the checkpoint's hits as a multiple of its hits "
                        "(x_untrained, with a paired 95 %% interval over the draws)")
    p.add_argument("--min-x-untrained", type=float_at_least(0), default=None,
                   help="also require x_untrained >= this to pass (implies --untrained; the demo asks 3)")
    add_network_and_device(p)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--out", type=path_text, help="folder for the JSON (default: beside the checkpoint)")


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    from dinox.eval import probe

    p.add_argument("--checkpoint", type=path_text, required=True, help="a dinox checkpoint (.pth)")
    p.add_argument("--data-root", type=path_text,
                   help="processed root with _labels/nodules.csv (default: the run's data root)")
    p.add_argument("--split-manifest", type=path_text,
                   help="split JSON whose val series are the test side (default: the "
                        "run's own manifest, else <data-root>/_splits/val10_seed0.json)")
    p.add_argument("--split", default=PROBE_DEFAULTS["split"], choices=["auto", "val", "patients"],
                   help="test side: the manifest's val split (val), a seeded patient split of the labelled "
                        "series (patients), or val when it holds nodules, else patients (auto)")
    p.add_argument("--test-fraction", type=float, default=probe.DEFAULT_TEST_FRACTION,
                   help=f"share of patients tested with --split patients (default {probe.DEFAULT_TEST_FRACTION})")
    p.add_argument("--min-auroc", type=float, default=probe.DEFAULT_MIN_AUROC,
                   help=f"pass line on slice_nodule and patch_nodule (default {probe.DEFAULT_MIN_AUROC})")
    p.add_argument("--min-readers", type=positive_int, default=probe.MIN_READERS,
                   help=f"readers who must mark a nodule for it to count (default {probe.MIN_READERS} of LIDC's 4)")
    p.add_argument("--seed", type=seed_int, default=PROBE_DEFAULTS["seed"],
                   help="seed of the patient split, the patch draw and the bootstrap")
    add_network_and_device(p)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--max-slices", type=positive_int, default=probe.DEFAULT_MAX_SLICES,
                   help=f"slices embedded at most (positives first; default {probe.DEFAULT_MAX_SLICES})")
    p.add_argument("--bootstrap", type=positive_int, default=probe.BOOTSTRAP, help=f"resamples (default {probe.BOOTSTRAP})")
    p.add_argument("--refit-bootstrap", type=nonneg_int, default=probe.REFIT_BOOTSTRAP, metavar="N",
                   help="also resample the training patients and refit each binary probe N times (e.g. 200; "
                        "default 0: off): an interval that holds which patients the probe was fitted on, "
                        "where --bootstrap resamples the test patients only; costs N fits per source")
    p.add_argument("--labels-json", type=path_text,
                   help="dinox synth's labels.json for vessel labels (default: the one the "
                        "table's synthetic rows came from)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the untrained-network and pixel baselines (and the patch tasks' hand-feature reference)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="input size in pixels the slices are resized to (a multiple of the patch; default: the "
                        "run's training size). Larger gives smaller patch cells for the patch-level probes")
    p.add_argument("--out", type=path_text, help="folder for the JSON (default: beside the checkpoint)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="validation of a checkpoint (label-free retrieval, labelled probes)")
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL")
    retrieval = sub.add_parser("retrieval", help="view retrieval (top-1/top-k vs chance) and effective rank")
    add_retrieval_arguments(retrieval)
    retrieval.set_defaults(func=run_retrieval)
    probe = sub.add_parser("probe", help="linear probes of frozen features on nodule labels (AUROC with "
                                         "bootstrap intervals, untrained and pixel baselines)")
    add_probe_arguments(probe)
    probe.set_defaults(func=run_probe)
    parser.set_defaults(func=lambda args: parser.print_help() or 1)
    return parser


def output_dir(out, checkpoint) -> Path:
    """The folder for a result file: --out, made if missing, else the checkpoint's folder.
    A file is written and removed there first: a folder that exists but takes no files (a
    read-only mount, a checkpoint folder of another user) would otherwise fail the write
    after all the work."""
    folder = Path(out) if out else Path(checkpoint).parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is an existing file; give a folder for the result JSON")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {folder} ({exc.strerror or exc}); "
                        f"give another --out") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dinox_write_test"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write into the output folder {folder} ({exc.strerror or exc}); "
                        f"give another --out") from None
    return folder


def result_name(stem: str, *, split: str, seed: int, defaults: dict, network: str = "teacher",
                manifest=None, root=None, trained_root=None, trained_manifest=None, size: int | None = None,
                trained_size: int | None = None, views: str = "train", draws: int = 1,
                extra: tuple[str, ...] | list[str] = ()) -> str:
    """`stem`.json for the default split and seed, else `stem`_{split}_seed{seed}.json; a
    manifest other than the root's default and the run's own joins the split as
    split-{manifest stem}, the student adds _student, a root other than the run's own adds
    _root{hash8}, an input size other than the training size _size{size}, diagnostic views
    _{views}, a mean over several view draws _draws{draws}; `extra` (a command's own
    settings, e.g. probe_tags) last."""
    from dinox.data.layout import default_manifest, root_tag, same_path

    tags = []
    custom_manifest = (manifest is not None and root is not None and not same_path(manifest, default_manifest(root))
                       and not (trained_manifest and same_path(manifest, trained_manifest)))
    if split != defaults["split"] or seed != defaults["seed"] or custom_manifest:
        tags.append(f"{split}-{Path(manifest).stem}" if custom_manifest else split)
        tags.append(f"seed{seed}")
    if network != "teacher":
        tags.append(network)
    if root is not None and trained_root is not None and not same_path(root, trained_root):
        tags.append(root_tag(root))
    if size is not None and size != trained_size:
        tags.append(f"size{size}")
    if views != "train":
        tags.append(views)
    if draws != 1:
        tags.append(f"draws{draws}")
    return "_".join([stem, *tags, *extra]) + ".json"


def probe_tags(args, split_mode: str) -> list[str]:
    """The probe's settings that change its result, where they are not the defaults:
    readers{n}, maxslices{n}, testfraction{f} (only a patient split uses it), bootstrap{n}
    and refit{n} (the intervals' resamples), labels{hash8} of --labels-json, nobaselines (the
    result lacks the baselines)."""
    from dinox.data.layout import path_tag
    from dinox.eval import probe

    tags = []
    if args.min_readers != probe.MIN_READERS:
        tags.append(f"readers{args.min_readers}")
    if args.max_slices != probe.DEFAULT_MAX_SLICES:
        tags.append(f"maxslices{args.max_slices}")
    if split_mode == "patients" and args.test_fraction != probe.DEFAULT_TEST_FRACTION:
        tags.append(f"testfraction{args.test_fraction:g}")
    if args.bootstrap != probe.BOOTSTRAP:
        tags.append(f"bootstrap{args.bootstrap}")
    if args.refit_bootstrap != probe.REFIT_BOOTSTRAP:
        tags.append(f"refit{args.refit_bootstrap}")
    if args.labels_json:
        tags.append(path_tag("labels", args.labels_json))
    if args.no_baselines:
        tags.append("nobaselines")
    return tags


def _earlier_result(path: Path) -> dict | None:
    """The result an earlier evaluation wrote at `path`, or None (no file, or not a result)."""
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def _write_result(out_dir: Path, name: str, result: dict) -> Path:
    """Write `result` as out_dir/name and return the path. A file of that name written for
    another checkpoint (several runs evaluated into one --out at the same step) is kept: the
    new result gets a short hash of its checkpoint's path in its name instead. The checkpoint
    is recorded resolved: a path as typed is relative to a working folder that the next
    evaluation into this --out need not share (an older result's relative path is resolved
    here, the best reading it allows)."""
    path = out_dir / name
    mine = str(Path(result["checkpoint"]).resolve())
    result = {**result, "checkpoint": mine}
    theirs = (_earlier_result(path) or {}).get("checkpoint")
    if isinstance(theirs, str) and str(Path(theirs).resolve()) != mine:
        tag = hashlib.sha256(mine.encode()).hexdigest()[:8]
        path = path.with_name(f"{path.stem}_ckpt{tag}{path.suffix}")
        print(f"note: {out_dir / name} holds the result of another checkpoint ({theirs}); kept, this one "
              f"goes to {path.name}")
    try:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")   # a kill leaves the earlier file whole
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); give another --out") from None
    return path


def _stopped(command: str):
    """What `dinox eval COMMAND` says when a signal stops it (`signals.interrupts_raise`)."""
    return lambda sig: (f"eval {command} stopped by {sig} before it finished; its result is written only at the "
                        f"end, so run the same command again")


def run_retrieval(args) -> int:
    with interrupts_raise(_stopped("retrieval")):   # SIGTERM and SIGHUP too: one line, exit 143 / 129
        return _retrieval(args)


def _retrieval(args) -> int:
    from dinox.data.dataset import CTSliceDataset
    from dinox.eval.load import open_evaluation
    from dinox.eval.runner import evaluate_draws

    if args.n < 2:
        raise UserError(f"--n {args.n} is too small: retrieval needs at least 2 samples")
    out_dir = output_dir(args.out, args.checkpoint)   # before the work: a bad --out fails fast
    evaluation = open_evaluation(args.checkpoint, device=args.device, network=args.network,
                                 data_root=args.data_root, index_csv=args.index_csv,
                                 split_manifest=args.split_manifest)
    device, backbone, cfg = evaluation.device, evaluation.backbone, evaluation.cfg
    root, manifest = evaluation.root, evaluation.manifest
    dataset = CTSliceDataset(root, args.split, manifest, evaluation.index_csv, context_mm=cfg.views.context_mm)
    available = len(dataset)
    n = min(args.n, available)
    if available < args.n:
        print(f"note: the {args.split} split holds {available} samples, fewer than --n {args.n}; using all of them")
    if n < 2:
        raise UserError(f"the {args.split} split holds {available} sample(s); retrieval needs at least 2")
    if n < FEW_QUERIES:
        # a few lucky hits among a handful of keys pass the ratio bar without features that learned
        print(f"warning: only {n} queries: the ratio counts hits, so on so few one hit more or less moves it "
              f"by 1 and a network with barely any features can pass; judge a run on --n 480 or more samples, "
              f"and add --untrained to see what an untrained network scores on the same views")
    ks = sorted({k for k in args.topk if k <= n})
    dropped = sorted({k for k in args.topk if k > n})
    if dropped:
        # top-k with k >= n is 1 by definition: reporting it would only look like a result
        print(f"note: --topk {' '.join(map(str, dropped))} exceeds the {n} samples evaluated; left out")
    scoring = dict(draws=args.draws, n=n, seed=args.seed, device=device, ks=tuple(ks or [1]),
                   batch_size=args.batch_size, progress=True, views=args.views)
    result = evaluate_draws(backbone, dataset, cfg.views.to_augment(), **scoring)
    if args.untrained or args.min_x_untrained is not None:
        from dinox.eval.probe import untrained_backbone, untrained_note
        from dinox.eval.runner import against_untrained

        print("scoring the untrained network on the same view draws")
        untrained = evaluate_draws(untrained_backbone(cfg, device), dataset, cfg.views.to_augment(), **scoring)
        result.update(against_untrained(result, untrained), untrained_note=untrained_note(cfg))
    result.update(
        step=evaluation.step,
        checkpoint=str(args.checkpoint),
        split=args.split,
        split_manifest=str(manifest) if manifest else None,
        data_root=str(root),
        seed=args.seed,
        draw_count=args.draws,
        min_ratio=args.min_ratio,
        min_x_untrained=args.min_x_untrained,
        network=args.network,
    )
    passed, verdict = retrieval_verdict(result)
    result["passed"] = passed
    name = result_name(f"view_retrieval_step{evaluation.step}_N{result['n']}", split=args.split, seed=args.seed,
                       defaults=RETRIEVAL_DEFAULTS, network=args.network, manifest=manifest, root=root,
                       trained_root=evaluation.trained_root, trained_manifest=evaluation.trained_manifest,
                       views=args.views, draws=args.draws)
    if "untrained" not in result:
        _keep_untrained_comparison(out_dir / name, result)
    out_path = _write_result(out_dir, name, result)
    tops = " ".join(f"top{k}={result[f'top{k}']:.4f}" for k in sorted({1, *ks}))
    print(
        f"view retrieval step={evaluation.step} n={result['n']} ({result['series']} series) {tops} "
        f"baseline={result['baseline']:.6f} ratio={result['ratio']:.2f} effective_rank={result['effective_rank']:.1f} "
        f"same-series top1={result['top1_same_series']:.4f}" + ("" if args.views == "train" else f" (views {args.views})")
        + (f"; mean of {args.draws} draws, ratios " + " ".join(f"{d['ratio']:g}" for d in result["draws"])
           if args.draws > 1 else "")
    )
    if "untrained" in result:
        print(untrained_line(result))
    print(f"{verdict} -> {out_path}")
    return EXIT_PASS if passed else EXIT_FAIL


UNTRAINED_KEYS = ("untrained", "x_untrained", "x_untrained_ci95", "untrained_note")


def _keep_untrained_comparison(path: Path, result: dict) -> None:
    """Carry the untrained network's figures over from the earlier result at `path` (the
    demo's, or an eval with --untrained) when it scored the same checkpoint on the same
    view draws (each draw's figures equal), so that a later eval without --untrained does
    not erase that comparison."""
    def draws_of(r: dict) -> list:
        return [(d.get("top1"), d.get("ratio"), d.get("mean_rank")) for d in r.get("draws", [r])]

    earlier = _earlier_result(path)
    if (earlier is None or "untrained" not in earlier
            or str(Path(earlier.get("checkpoint", "")).resolve()) != str(Path(result["checkpoint"]).resolve())
            or draws_of(earlier) != draws_of(result) or earlier.get("n") != result.get("n")):
        return
    result.update({key: earlier[key] for key in UNTRAINED_KEYS if key in earlier})
    print(f"note: kept the untrained network's figures of the same view draws from the earlier {path.name}")


def untrained_line(result: dict) -> str:
    """The untrained network's figures beside the checkpoint's, on the same draws, and what
    that network is not (untrained_note) where the run started from other weights."""
    x, ci = result["x_untrained"], result["x_untrained_ci95"]
    draws = result["untrained"]["draws"]
    line = f"untrained network: ratio {result['untrained']['ratio']:.2f}" + (
        f" (draws {' '.join(f'{d:g}' for d in draws)})" if len(draws) > 1 else "")
    note = f"; note: {result['untrained_note']}" if result.get("untrained_note") else ""
    if x is None:
        return line + "; it finds none, so the checkpoint has no multiple of its hits" + note
    upper = "unbounded" if ci and ci[1] is None else f"{ci[1]:.2f}" if ci else ""
    return (line + f"; the checkpoint finds {x:.2f}x" + (f" [95 % {ci[0]:.2f}, {upper}]" if ci else "")
            + " its hits" + note)


def retrieval_verdict(result: dict) -> tuple[bool, str]:
    """Whether a retrieval result passes, and the line that says so with each bar and its
    figure: ratio >= min_ratio, and x_untrained >= min_x_untrained where one is asked (an
    untrained network that finds nothing is beaten by any hit)."""
    passed = result["ratio"] >= result["min_ratio"]
    parts = [f"ratio {result['ratio']:.2f} {'>=' if passed else '<'} {result['min_ratio']:g}"]
    min_x = result.get("min_x_untrained")
    if min_x is not None:
        x = result.get("x_untrained")
        beaten = result["ratio"] > 0 if x is None else x >= min_x
        passed = passed and beaten
        parts.append("the untrained network finds none" if x is None else
                     f"{x:.2f}x the untrained network {'>=' if beaten else '<'} {min_x:g}x")
    return passed, f"{'PASS' if passed else 'FAIL'}: " + "; ".join(parts)


def interval_text(ci, sign: str = "+") -> str:
    """A 95 % interval as "[lo, hi]" to 3 decimals (signed by default, as a lead's is)."""
    return "(none)" if not ci else f"[{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def _print_table(result: dict) -> None:
    for name, t in result["tasks"].items():
        ci = t["ci95"] or [float("nan")] * 2
        base = "  ".join(f"{k} {v['auroc']:.3f} (delta {v['delta']:+.3f})"
                         for k, v in (*t["baselines"].items(), *t.get("references", {}).items()))
        print(f"  {name:28s} AUROC {t['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]  n_train={t['n_train']} "
              f"n_test={t['n_test']} ({t['n_test_patients']} patients)  {base}")
        if "refit" in t:
            print(f"  {'':28s} refit interval {interval_text(t['refit']['ci95'], '')}; leads: " + "  ".join(
                f"over {k} {interval_text(v.get('delta_ci95_refit'))}"
                for k, v in (*t["baselines"].items(), *t.get("references", {}).items())))
    for name, why in result["skipped"].items():
        print(f"  {name:28s} skipped: {why}")


def run_probe(args) -> int:
    with interrupts_raise(_stopped("probe")):
        return _probe(args)


def _probe(args) -> int:
    from dinox.eval import probe
    from dinox.eval.load import open_evaluation

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-slices", args.max_slices, 2),
                             ("--bootstrap", args.bootstrap, 1), ("--min-readers", args.min_readers, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: give at least {low}")
    if not 0.0 < args.test_fraction < 1.0:
        raise UserError(f"--test-fraction {args.test_fraction}: give a fraction between 0 and 1 (e.g. 0.3)")
    if not 0.0 <= args.min_auroc <= 1.0:
        raise UserError(f"--min-auroc {args.min_auroc}: an AUROC lies between 0 and 1 (e.g. 0.7)")
    out_dir = output_dir(args.out, args.checkpoint)
    evaluation = open_evaluation(args.checkpoint, device=args.device, network=args.network,
                                 data_root=args.data_root, split_manifest=args.split_manifest)
    device, backbone, cfg = evaluation.device, evaluation.backbone, evaluation.cfg
    root, manifest = evaluation.root, evaluation.manifest
    if manifest is not None and not manifest.is_file():
        what = "a folder; give a split JSON file" if manifest.is_dir() else "not found; give an existing --split-manifest"
        raise UserError(f"split manifest {manifest} is {what}")
    result = probe.probe_backbone(
        backbone, cfg, root, split_manifest=manifest, split=args.split, seed=args.seed, device=device,
        batch_size=args.batch_size, max_slices=args.max_slices, n_boot=args.bootstrap, min_readers=args.min_readers,
        test_fraction=args.test_fraction, labels_json=args.labels_json, baselines=not args.no_baselines,
        progress=True, size=args.size, n_refit=args.refit_bootstrap,
    )
    passed, line = probe.verdict(result, args.min_auroc)
    gate_missing = any(t not in result["tasks"] for t in probe.GATE_TASKS)
    result.update(step=evaluation.step, checkpoint=str(args.checkpoint), network=args.network, data_root=str(root),
                  split_manifest=str(manifest) if manifest else None, min_auroc=args.min_auroc,
                  gate_tasks=list(probe.GATE_TASKS), passed=passed, verdict=line)
    name = result_name(f"probe_step{evaluation.step}", split=args.split, seed=args.seed, defaults=PROBE_DEFAULTS,
                       network=args.network, manifest=manifest, root=root, trained_root=evaluation.trained_root,
                       trained_manifest=evaluation.trained_manifest, size=args.size, trained_size=cfg.views.img_size,
                       extra=probe_tags(args, result["split"]["mode"]))
    out_path = _write_result(out_dir, name, result)
    print(f"probe step={evaluation.step} ({args.network}) split={result['split']['mode']}: "
          f"{result['split']['train_patients']} train / {result['split']['test_patients']} test patients; "
          f"{result['labels']['rule']}")
    for note in result["notes"]:
        print(f"note: {note}")
    _print_table(result)
    if gate_missing:
        raise UserError(f"{line}; the other tasks' figures -> {out_path}")
    print(f"{line} -> {out_path}")
    return EXIT_PASS if passed else EXIT_FAIL
