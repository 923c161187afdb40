"""`dinox train` (and scripts/phase5_big_run.py): flags -> config.resolve -> memory plan -> Trainer.

This module is the only one that sees the train command's argparse Namespace: it turns the
flags the user gave into a flat dict and hands it to `dinox.config.resolve`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from dinox.config import (
    BASE_RECIPE,
    DEVICE_CHOICES,
    FLAT_FIELDS,
    MODEL_CHOICES,
    PARALLEL_CHOICES,
    RECIPES,
    SHAPE_FIELDS,
    RunConfig,
    resolve,
)
from dinox.commands.argtypes import (
    boolean,
    float_at_least,
    nonneg_int,
    path_text,
    positive_int,
    seed_int,
    step_budget,
    vit_depth,
)
from dinox.data.layout import same_path
from dinox.errors import UserError
from dinox.model.head import PROTOTYPE_NORMS
from dinox.observe.anomaly import check_collapse_line
from dinox.run.checkpoint import CheckpointError, disk_size_text, free_space
from dinox.run.device import HARDWARE_PRESETS
from dinox.run.files import atomic_write_text
from dinox.run.signals import EXIT_WONT_FIT
from dinox.train.runs import (
    ResumeSource,
    check_disk_space,
    check_ranks_agree,
    checkpoint_tensor_bytes,
    open_resume,
    prepare_run_dir,
    refuse_replayed_halt,
    remove_failed_start,
    resumed_from,
)

log = logging.getLogger("dinox.train")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a DINOv3-style ViT (the Phase 5 big run)",
        description="Train a DINOv3-style ViT on a processed CT root. Gram anchoring is always on.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def recipe_defaults(key: str) -> str:
    """A recipe setting's default for --help: BASE_RECIPE's, then each preset's own value."""
    own = [f"{preset} {recipe[key]}" for preset, recipe in RECIPES.items() if key in recipe]
    return "; ".join([str(BASE_RECIPE[key])] + own)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """All flags of `dinox train` / scripts/phase5_big_run.py (defaults None: see module doc)."""
    g = p.add_argument_group("model")
    g.add_argument("--config", choices=MODEL_CHOICES, default=None,
                   help="model preset (default vit-tiny, or the checkpoint's on resume); the --vit-* flags "
                        "override it; 'custom' needs all four")
    g.add_argument("--vit-patch", type=positive_int)
    g.add_argument("--vit-dim", type=positive_int)
    g.add_argument("--vit-depth", type=vit_depth)
    g.add_argument("--vit-heads", type=positive_int)
    g.add_argument("--vit-mlp", type=positive_int,
                   help="MLP hidden width (default 4 x dim; 6144 for vit-giant and vit-giant2, 6 x dim for dinov3-*plus)")
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None, help="SwiGLU MLP instead of GELU")
    g.add_argument("--registers", type=nonneg_int, help="register tokens (default 4)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--layerscale", type=float,
                   help=f"LayerScale init (default {recipe_defaults('layerscale')}; DINOv2: 1e-5; 0 disables)")
    g.add_argument("--out-dim", type=positive_int,
                   help="DINO head prototypes (default: 32 per image of the global batch, 1024 to 65536)")
    g.add_argument("--head-hidden", type=positive_int)
    g.add_argument("--head-bottleneck", type=positive_int)
    g.add_argument("--head-layers", type=positive_int)
    g.add_argument("--head-bn", type=boolean, metavar="true|false",
                   help="BatchNorm (batch statistics) in the head MLP (DINO's use_bn; default on, DINOv2: off)")
    g.add_argument("--prototype-norm", choices=PROTOTYPE_NORMS,
                   help="the heads' prototype norms: fixed at 1 (DINO's norm_last_layer), learned (DINOv2), "
                        "free (a plain Linear, DINOv3); docs/recipes.md")

    g = p.add_argument_group("views")
    g.add_argument("--context-mm", type=float, metavar="MM",
                   help="the 2.5D stack's neighbours: the slices nearest MM above and below slice z, at least "
                        "one slice away (default 10: z-2, z, z+2 at 5 mm slices, z-8, z, z+8 at 1.25 mm); "
                        "0: the adjacent slices whatever the spacing")
    g.add_argument("--img-size", type=positive_int, help="global crop size in px (224; 64 for vit-tiny)")
    g.add_argument("--local-crops", type=nonneg_int, help="local crops per sample")
    g.add_argument("--local-size", type=positive_int, help="local crop size in px")
    g.add_argument("--global-scale-min", type=float, help="smallest area fraction of a global crop (DINOv2: 0.32)")
    g.add_argument("--local-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area fraction range of the local crops (DINOv2: 0.05 0.32)")
    g.add_argument("--distinct-windows", type=boolean, metavar="true|false",
                   help="draw the two global views' HU windows from different families (lung/mediastinal/bone/broad; "
                        "default false: drawn independently)")
    g.add_argument("--standardize-views", type=boolean, metavar="true|false",
                   help="zero-mean unit-std each view after windowing (default true)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=step_budget,
                   help="optimizer steps, or `unlimited` (train until stopped; the default of a new run); "
                        "a resume without it keeps the run's")
    g.add_argument("--batch-size", type=positive_int, help="per-device micro-batch (default: hardware preset)")
    g.add_argument("--accumulation-steps", type=positive_int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, help="peak learning rate (not scaled by batch)")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine (seed 004: 1e-6)")
    g.add_argument("--warmup-steps", type=nonneg_int, help="linear warm-up steps (seed 004: 2500)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--weight-decay-end", type=float)
    g.add_argument("--clip-grad", type=float, help="gradient norm clip (0 disables)")
    g.add_argument("--freeze-last-layer-steps", type=nonneg_int)
    g.add_argument("--freeze-backbone-steps", type=nonneg_int,
                   help="steps during which only the heads learn (default with --init-from: 10%% of the run)")
    g.add_argument("--momentum", type=float, help="teacher EMA momentum at step 0 (cosine towards --momentum-end)")
    g.add_argument("--momentum-end", type=float)
    g.add_argument("--teacher-temp", type=float)
    g.add_argument("--teacher-temp-start", type=float)
    g.add_argument("--teacher-temp-warmup-steps", type=nonneg_int)
    g.add_argument("--student-temp", type=float)
    g.add_argument("--centering", choices=["centering", "sinkhorn"])
    g.add_argument("--center-momentum", type=float)
    g.add_argument("--koleo-weight", type=float,
                   help=f"KoLeo weight on the sum over the global views (default {recipe_defaults('koleo_weight')}; "
                        "DINOv2: 0.1)")
    g.add_argument("--dino-local-weight", type=float,
                   help="weight of the local crops' DINO pairs against the global pairs' 1 (DINOv3's "
                        "reweight_dino_local_loss; default 1)")
    g.add_argument("--ibot-weight", type=float, help="iBOT masked-patch loss weight (0 turns iBOT off; DINOv2: 1.0)")
    g.add_argument("--ibot-mask-ratio", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="range of the fraction of patches masked per masked image (DINOv2: 0.1 0.5)")
    g.add_argument("--ibot-mask-probability", type=float,
                   help=f"fraction of the global-view images that are masked (default "
                        f"{recipe_defaults('ibot_mask_probability')}; DINOv2: 0.5)")
    g.add_argument("--dense-weight", type=float,
                   help=f"weight of the dense correspondence term: each patch token of one global view picks out "
                        f"the teacher's token at the same anatomical point of the other view (InfoNCE over the "
                        f"batch; 0 leaves it out; default {recipe_defaults('dense_weight')})")
    g.add_argument("--dense-temp", type=float, help="InfoNCE temperature of the dense term (default 0.2)")
    g.add_argument("--dense-teacher-scale", type=positive_int,
                   help="the dense term's keys come from the EMA teacher on the global views this many times "
                        "larger (bicubic), its finer token map sampled at the same points (default 1; 2 costs a "
                        "teacher forward at 4x the tokens, docs/recipes.md \"How much a probe on the demo's data "
                        "can tell\")")
    g.add_argument("--gram-weight", type=float, help="Gram anchoring weight (> 0; it cannot be disabled)")
    g.add_argument("--gram-refresh-every", type=positive_int, help="steps between Gram-teacher snapshots")
    g.add_argument("--gram-start-step", type=nonneg_int,
                   help="first frozen Gram snapshot; before it the Gram teacher follows the EMA teacher and the "
                        "Gram weight ramps in (0: snapshots from step 0)")
    g.add_argument("--gram-teacher-scale", type=positive_int,
                   help="the Gram teacher sees the global views this many times larger and its patch features "
                        "are resized back to the student's grid (DINOv3's high-resolution Gram teacher: 2; "
                        "costs a teacher forward at scale^2 the tokens)")
    g.add_argument("--horizon", type=positive_int, help="schedule span of an unlimited run")
    g.add_argument("--seed", type=seed_int)

    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="override detection (default auto)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (fp16 + scaler where bf16 is missing)")
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None, help="per-block activation checkpointing")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the backbone")
    g.add_argument("--parallel", choices=PARALLEL_CHOICES, default=None,
                   help="under torchrun: ddp (default; whole copies on every rank) or fsdp (FSDP2: student, teacher "
                        "and Gram teacher sharded over the ranks, sharded DCP checkpoints)")
    g.add_argument("--num-workers", type=nonneg_int)
    g.add_argument("--pin-memory", type=boolean, metavar="true|false")
    g.add_argument("--device-memory", type=float_at_least(0, inclusive=False), metavar="GB", help="plan for a device with this much memory (GiB: a card sold as 24 GB holds 24 GiB)")

    g = p.add_argument_group("data and output")
    g.add_argument("--data-root", type=path_text, help="processed root (default data/processed)")
    g.add_argument("--init-from", type=path_text, metavar="PATH",
                   help="start the backbone from pretrained weights: a DINOv2/DINOv3 .pth, a transformers folder, "
                        "a dinox export (`dinox export`; a training checkpoint is continued with --resume); "
                        "selects the warm-start recipe (docs/recipes.md)")
    g.add_argument("--index-csv", type=path_text, help="default <data-root>/_index/index.csv")
    g.add_argument("--split-manifest", type=path_text, help="default <data-root>/_splits/val10_seed0.json")
    g.add_argument("--out", type=path_text, help="runs root (default data/runs); each run gets YYYYMMDD_HHMMSS/")
    g.add_argument("--resume", type=path_text, help="'auto' (newest good checkpoint under --out) or a checkpoint path")

    g = p.add_argument_group("checkpoints, monitoring, validation")
    g.add_argument("--ckpt-every", type=positive_int, help="steps between checkpoints (100)")
    g.add_argument("--ckpt-keep-last", type=positive_int, help="periodic checkpoints kept (5)")
    g.add_argument("--ckpt-milestone-every", type=nonneg_int, help="keep every M-th step out of rotation")
    g.add_argument("--ckpt-keep-emergency", type=nonneg_int,
                   help="emergency checkpoints (anomalies, failed steps, halts) kept, the newest (3; 0 keeps all)")
    g.add_argument("--monitor-every", type=nonneg_int, help="steps between heatmaps/stats (1000; 0 off)")
    g.add_argument("--eval-every", type=nonneg_int, help="steps between retrieval + rank checks (0 off)")
    g.add_argument("--eval-n", type=positive_int, help="validation samples per in-training check (512)")
    g.add_argument("--probe-every", type=nonneg_int,
                   help="steps between frozen-feature nodule probes (Eval/Probe_*; needs labels; 0 off)")
    g.add_argument("--log-interval", type=float_at_least(0), help="seconds between progress lines (10)")
    g.add_argument("--log-every", type=positive_int, help="steps between metrics.jsonl/TensorBoard rows (1)")
    g.add_argument("--halt-on-anomaly", action=argparse.BooleanOptionalAction, default=None,
                   help="stop (emergency checkpoint, exit 5) on any alarm: loss spike, collapse, entropy wall, "
                        "not learning (a non-finite loss always stops)")
    g.add_argument("--collapse-std", type=float_at_least(0, inclusive=False), help="embedding std (mean of the last 10 steps) below which collapse is flagged (0.01)")
    g.add_argument("--spike-factor", type=float, help="loss above this x its 10-step mean is a spike (2.0)")

    g = p.add_argument_group("planning")
    g.add_argument("--dry-run", action="store_true", help="resolve, estimate memory on the meta device, exit (0 fits, 3 not)")
    g.add_argument("--json", action="store_true", help="with --dry-run: print the summary as one JSON object")
    g.add_argument("--hardware-preset", dest="plan_preset", choices=list(HARDWARE_PRESETS), default=None,
                   help="with --dry-run and --device-memory: plan with this hardware preset's workers, pinning "
                        "and batch x accumulation (rtx4090 64 x 4, amd395 128 x 2, ...) instead of this "
                        "machine's, for a card that is not here")
    g.add_argument("--world-size", "--nproc", dest="world_size", type=positive_int, default=None,
                   help="with --dry-run: plan for this many ranks (per-rank memory with --parallel fsdp); "
                        "default: this launch's (WORLD_SIZE under torchrun, else 1)")


def explicit_values(args: argparse.Namespace) -> dict[str, object]:
    """The run settings the user actually gave (argparse defaults are None = not given;
    --config always counts, it names the model)."""
    given = {name: getattr(args, name) for name in FLAT_FIELDS if getattr(args, name, None) is not None}
    for flag, (low, high) in (("ibot_mask_ratio", ("ibot_mask_ratio_min", "ibot_mask_ratio_max")),
                              ("local_scale", ("local_scale_min", "local_scale_max"))):
        if getattr(args, flag, None) is not None:
            given[low], given[high] = getattr(args, flag)
    return given


def run(args: argparse.Namespace) -> int:
    from dinox.run.checkpoint import parse_checkpoint_name
    from dinox.run.device import cpus_per_rank, detect_device, match_preset
    from dinox.run.distributed import DistEnv
    from dinox.run.logging import close_file_logging, setup_logging
    from dinox.train.plan import WontFit, plan_memory

    if args.json and not args.dry_run:
        raise UserError("--json only changes what --dry-run prints; add --dry-run, or drop --json to train")
    if args.plan_preset is not None and not (args.dry_run and args.device_memory):
        raise UserError(f"--hardware-preset {args.plan_preset} only plans for a card that is not here: add --dry-run "
                        f"and that card's --device-memory GB (a run takes the preset of the device it finds)")
    if args.world_size is not None and not args.dry_run:
        raise UserError("--world-size only plans (with --dry-run); a run's world size is the number of processes "
                        "torchrun starts (--nnodes x --nproc-per-node)")
    out_root = Path(args.out or RunConfig().io.out)
    if not args.dry_run and out_root.exists() and not out_root.is_dir():
        raise UserError(f"--out {out_root} is a file, not a folder; give a folder for the runs "
                        f"(it is created when missing)")
    dist = DistEnv.from_environment()
    setup_logging(is_main=dist.is_main)
    info, device_notes = detect_device(args.device or "auto", local_rank=dist.local_rank)
    preset_name = args.plan_preset or match_preset(info)
    given = explicit_values(args)
    source = open_resume(args.resume, out_root, planning=args.dry_run) if args.resume else None
    if source is not None:
        given["resume"] = str(source.path)
    world_size = args.world_size or dist.world_size
    cpus = None if args.plan_preset else cpus_per_rank(_planned_local_ranks(args.world_size, info))
    resolved = resolve(given, hardware_preset=preset_name, device_kind=info.kind,
                       saved=source.state["config"] if source is not None else None, world_size=world_size, cpus=cpus)
    cfg = resolved.cfg
    moved_root = _resumed_data_root(cfg, source, given)
    if moved_root is not None:
        given.update(moved_root)
        resolved = resolve(given, hardware_preset=preset_name, device_kind=info.kind,
                           saved=source.state["config"], world_size=world_size, cpus=cpus)
        cfg = resolved.cfg
        resolved.notices.append(f"--resume: the run's data root, {source.state['config'].get('data_root')!r} "
                                f"in its config, is not found from this folder; reading it where the run "
                                f"recorded it, {moved_root['data_root']}")
    saved_init = source.state["config"].get("init_from") if source is not None else None
    if source is not None and given.get("init_from") and not same_path(given["init_from"], saved_init):
        # the same --init-from as the run began with, however spelled, is fine (a requeue repeats
        # its command line, or writes the path another way)
        raise UserError(f"--init-from {given['init_from']} would be ignored: --resume continues {source.path} with "
                        f"its own weights (begun from {saved_init or 'scratch'}); drop --init-from, or start a new "
                        "run without --resume")
    if args.resume == "auto":
        refuse_replayed_halt(source, resolved.changes)
    if source is not None and cfg.optim.max_steps is not None and source.step > cfg.optim.max_steps:
        raise UserError(f"{source.path} is at step {source.step}, past --max-steps {cfg.optim.max_steps}: nothing "
                        f"to train; give a --max-steps above {source.step} to train on")
    if cfg.io.split_manifest and _manifest_lacks_val(Path(cfg.io.split_manifest)):
        log.warning("split manifest %s has no \"val\" list: in-training evaluation and monitoring will score "
                    "training patients, and `dinox eval` of this run will ask for a manifest with one; add the "
                    "validation series, or use the manifest `dinox prep` wrote", cfg.io.split_manifest)
    if args.resume == "auto" and source is None and not args.dry_run:
        resolved.notices.append(f"--resume auto: no checkpoint under {out_root}; starting a new run")

    plan = plan_memory(cfg, args.device_memory, info.total_memory_bytes, world_size=world_size)
    if plan["fits"]:   # a model that fits no device is answered first, with its ways out
        check_collapse_line(cfg.watch.collapse_std, cfg.model.vit_dim, rows=2 * cfg.optim.batch_size)  # 2 globals
    if cfg.runtime.parallel == "fsdp" and not args.dry_run and not dist.enabled:
        resolved.notices.append("--parallel fsdp in a single process: nothing to shard over, training unsharded "
                                "(launch with torchrun --nproc-per-node N to shard)")
    if args.dry_run and cfg.io.init_from and source is None:
        from dinox.model.weights import check_init_source

        src = check_init_source(cfg.io.init_from, cfg.model.arch())
        resolved.notices.append(f"--init-from {cfg.io.init_from}: {src.kind} weights of the requested shape")
    in_place = source is not None and source.in_place
    target = source.path.parent if in_place else out_root
    existing = sum(parse_checkpoint_name(name)[1] == "periodic" for name, *_ in source.snapshot) if in_place else 0
    if args.dry_run:   # under torchrun every rank plans alike; rank 0 alone prints the plan
        return report_dry_run(cfg, info, preset_name, resolved.preset_lines, plan, args.json, device_notes,
                              resolved.notices, ranks=world_size, show=dist.is_main, disk=(target, existing),
                              warnings=resolved.warnings)
    if not plan["fits"]:
        raise WontFit(wont_fit_message(plan))
    space_warning = check_disk_space(plan, target, cfg.io.ckpt_keep_last, existing) if dist.is_main else None

    dist.init(torch.device(info.torch_device).type)
    try:
        run_dir, lock, created = prepare_run_dir(dist, out_root, source, resume_auto=args.resume == "auto")
        try:
            if _is_finished(source, cfg, sharded=cfg.runtime.parallel == "fsdp" and dist.enabled):
                # A finished run relaunched as it was (a requeued job with --resume auto): saving
                # its checkpoints again would give files whose hashes others may have recorded
                # other bytes. Checked under the run's lock, so a run still writing is not "finished".
                if dist.is_main:
                    print(f"{source.path} is a checkpoint of step {source.step} = --max-steps: the run "
                          f"is finished, nothing to train or rewrite (give a --max-steps above {source.step} to "
                          f"train on; `dinox eval` scores it)", flush=True)
                return 0
            return _train(cfg, info, preset_name, resolved, plan, dist, run_dir, source, device_notes,
                          space_warning)
        except BaseException:
            if created and dist.is_main:
                close_file_logging()
                remove_failed_start(run_dir, source)
            raise
        finally:
            if lock is not None:
                lock.release()
    finally:
        dist.shutdown()
        close_file_logging()


def _is_finished(source: ResumeSource | None, cfg: RunConfig, *, sharded: bool = False) -> bool:
    """Whether the launch continues its own finished run from a checkpoint at its --max-steps
    (the final one, or the periodic one saved beside it at the last step: either way nothing
    is left to train, and saving again would rewrite the run's files; a periodic checkpoint of
    a run that has no final one is finished by the launch, which writes it): a single file, or a
    sharded (DCP) one where this launch writes sharded checkpoints too (`sharded`: FSDP under
    torchrun). A launch that writes single files (one process, DDP) converts a sharded one."""
    from dinox.run.checkpoint import parse_checkpoint_name

    kept_as_is = source is not None and (source.path.is_file() or (sharded and source.path.is_dir()))
    return (source is not None and source.in_place and kept_as_is
            and cfg.optim.max_steps is not None
            and (parse_checkpoint_name(source.path) or (None,))[0] == cfg.optim.max_steps
            and any(parse_checkpoint_name(p) == (cfg.optim.max_steps, "final") for p in source.path.parent.iterdir()))


def _train(cfg, info, preset_name, resolved, plan, dist, run_dir: Path, source: ResumeSource | None,
           device_notes, space_warning) -> int:
    from dinox.run.device import hardware_change_notice
    from dinox.run.logging import setup_logging
    from dinox.run.provenance import collect_provenance
    from dinox.train.loop import Trainer

    setup_logging(run_dir if dist.is_main else None, is_main=dist.is_main)
    for line in [*device_notes, *(resolved.warnings if dist.is_main else ())]:
        log.warning(line)
    log.info("device: %s '%s' (%s memory%s)", info.kind, info.name, _gb(info.total_memory_bytes),
             ", unified" if info.unified_memory else "")
    for line in [*resolved.preset_lines, *resolved.notices]:
        log.info(line)
    if space_warning:
        log.warning(space_warning)
    state = source.state if source is not None else None
    if source is not None:
        log.info("resuming from %s (step %d)", source.path, source.step)
        if not source.in_place:
            log.info("%s is not the newest checkpoint of a run under %s: continuing in the new run folder %s; "
                     "the source run is left as it is", source.path, cfg.io.out, run_dir)
        for line in resolved.changes:
            log.info("changed on resume: %s", line)
        notice = hardware_change_notice(state.get("hardware", {}), info)
        if notice:
            log.warning(notice)
    log.info("memory estimate: %s", plan["estimate_text"])
    data_files = [p for p in _data_files(cfg) if p.exists()]
    provenance = collect_provenance(data_files, cfg.runtime.seed, info.torch_device)
    log.info("provenance: git %s, data manifest %s, torch %s, python %s",
             provenance.get("git_commit"), provenance.get("data_manifest_hash"),
             provenance.get("torch"), provenance.get("python"))
    check_ranks_agree(cfg.to_flat(), provenance.get("data_manifest_hash"), source)
    if source is not None:
        saved = state.get("provenance") if isinstance(state.get("provenance"), dict) else {}
        before, now = saved.get("data_manifest_hash"), provenance.get("data_manifest_hash")
        if before and now and before != now:
            log.warning("the data manifest differs from the checkpoint's (checkpoint %s, now %s): the processed "
                        "root was re-prepped or the split changed, so this run continues on other data than it "
                        "started with; resume on the data root it was trained on to keep the run reproducible",
                        before, now)
        if source.in_place:
            if saved.get("resumed_from"):  # a branch keeps naming its origin when continued
                provenance["resumed_from"] = saved["resumed_from"]
        else:
            provenance["resumed_from"] = resumed_from(source)
    try:
        trainer = Trainer(cfg, info, run_dir, provenance, dist, resume_state=state)
    except CheckpointError as exc:   # what the resumed file holds: named where the message does not
        if source is None or str(source.path) in str(exc):
            raise
        raise CheckpointError(f"checkpoint {source.path}: {exc}") from None
    state = None
    if source is not None:
        source.state = {}  # the trainer holds the weights now; keep one copy in memory
    if dist.is_main:  # after the trainer accepted data and checkpoint: a failed start keeps the old file
        write_config_json(run_dir, cfg, info, preset_name, plan, provenance)
    code = trainer.run()
    trainer.release()
    return code


def _manifest_lacks_val(path: Path) -> bool:
    """A readable JSON object without a "val" list (what the training side needs is
    checked, with its messages, when the dataset opens)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "train" in data and "val" not in data


def _resumed_data_root(cfg: RunConfig, source, given: dict) -> dict | None:
    """For a resume launched from another folder than the run was: the absolute data paths
    the run recorded at its start (its config keeps them as typed, perhaps relative), where
    the config's root is not found from here and the user gave no data flags; else None."""
    from dinox.eval.load import own_data_paths

    if source is None or any(given.get(k) for k in ("data_root", "index_csv", "split_manifest")):
        return None
    if Path(cfg.io.data_root).is_dir():
        return None
    root, index, manifest = own_data_paths(cfg, source.state.get("provenance"))
    if not root.is_dir():
        return None
    moved = {"data_root": str(root)}
    if index is not None:
        moved["index_csv"] = str(index)
    if manifest is not None:
        moved["split_manifest"] = str(manifest)
    return moved


def _data_files(cfg: RunConfig) -> list[Path]:
    from dinox.data.layout import INDEX_FILE, default_manifest

    root = Path(cfg.io.data_root)
    return [Path(cfg.io.index_csv) if cfg.io.index_csv else root / INDEX_FILE,
            Path(cfg.io.split_manifest) if cfg.io.split_manifest else default_manifest(root)]


def _gb(n: int | None) -> str:
    """Device memory in GiB, the unit the estimate is in (a "24 GB" card holds 24 GiB)."""
    return f"{n / 1024**3:.1f} GiB" if n else "unknown"


def wont_fit_message(plan: dict) -> str:
    ways = "; ".join(plan["suggestions"]) or "use a smaller model"
    return (f"this run needs about {_gb(plan['estimate'].total)} but the device has "
            f"{_gb(plan['device_memory_bytes'])}; ways out: {ways}")


def _planned_local_ranks(planned_world: int | None, info) -> int | None:
    """The ranks a `--dry-run --world-size N` plan puts on this machine (one per GPU here, or
    all N on a CPU), where torchrun has not said (LOCAL_WORLD_SIZE); None: let it say. A plan
    for another machine (--hardware-preset) cuts nothing at all."""
    if planned_world is None or "LOCAL_WORLD_SIZE" in os.environ:
        return None
    return planned_world if info.kind == "cpu" else min(planned_world, max(1, info.count))


def report_dry_run(cfg: RunConfig, info, preset_name, preset_lines, plan, as_json: bool,
                   device_notes: list[str] = (), notices: list[str] = (), *, ranks: int = 1,
                   show: bool = True, disk: tuple[Path, int] | None = None, warnings: list[str] = ()) -> int:
    """Print the plan (`show`: False on the ranks other than 0 of a torchrun launch, which
    return the same exit code silently). `ranks`: the processes that share each optimizer step
    (DDP or FSDP2; the global batch). `device_notes` (a requested --device that is missing, and
    what is planned for instead) go to stderr as warnings, and into the JSON as "device_notices";
    `notices` (what resolve() fitted to the run: prototypes, warm-ups, teacher momentum) are
    printed as notes, and into the JSON as "notices"; `warnings` (settings that run but are
    likely mistakes) go to stderr and into the JSON as "warnings". `disk`: where the checkpoints would go
    and how many periodic ones are there already; the real run's disk check is judged there
    (on this machine) and reported, never refused: a plan may be for another machine."""
    code = 0 if plan["fits"] else EXIT_WONT_FIT
    if not show:
        return code
    est, o = plan["estimate"], cfg.optim
    ckpt_bytes, keep = checkpoint_tensor_bytes(plan), cfg.io.ckpt_keep_last
    disk_free = disk_warning = None
    if disk is not None:
        disk_free = free_space(disk[0])
        try:
            disk_warning = check_disk_space(plan, disk[0], keep, disk[1])
        except UserError as exc:
            disk_warning = str(exc)
    for line in device_notes:
        print(f"warning: {line} (plan for a card that is not here with --device-memory)", file=sys.stderr)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    summary = {
        "config": cfg.model.preset,
        "arch": {k: cfg.get(k) for k in SHAPE_FIELDS},
        "img_size": cfg.views.img_size,
        "backbone_params": plan["backbone_params"],
        "head_params": plan["head_params"],
        "batch_size": o.batch_size,
        "accumulation_steps": o.accumulation_steps,
        "num_workers": cfg.runtime.num_workers,
        "preset_lines": list(preset_lines),
        "effective_batch": cfg.effective_batch,
        "amp": cfg.runtime.amp,
        "grad_checkpoint": cfg.runtime.grad_checkpoint,
        "global_batch": cfg.effective_batch * ranks,
        "parallel": cfg.runtime.parallel,
        "world_size": ranks,
        "device": info.to_dict(),
        "hardware_preset": preset_name,
        "memory_estimate_bytes": est.as_dict(),
        "memory_estimate_gb": round(est.total / 1024**3, 2),
        "device_memory_gb": round(plan["device_memory_bytes"] / 1024**3, 2) if plan["device_memory_bytes"] else None,
        "fits": plan["fits"],
        "suggestions": plan["suggestions"],
        "checkpoint_bytes": ckpt_bytes,
        "checkpoints_disk_bytes": (keep + 1) * ckpt_bytes,
        "emergency_checkpoints_kept": cfg.io.ckpt_keep_emergency or None,   # None: every one kept
        "disk_free_bytes": disk_free,
        "disk_warning": disk_warning,
        "device_notices": list(device_notes),
        "notices": list(notices),
        "warnings": list(warnings),
    }
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print(f"model {cfg.model.preset}: backbone {plan['backbone_params'] / 1e6:.1f}M + head "
              f"{plan['head_params'] / 1e6:.1f}M parameters, {cfg.model.out_dim} prototypes "
              "(built on the meta device)")
        for line in notices:
            print(f"  note: {line}")
        print(f"device: {info.kind} '{info.name}', preset {preset_name}")
        for line in preset_lines:
            print(f"  {line}")
        print(f"batch {o.batch_size} x accumulation {o.accumulation_steps} = effective {cfg.effective_batch} per "
              f"rank; {cfg.views.img_size}px; amp {cfg.runtime.amp}; grad checkpoint {cfg.runtime.grad_checkpoint}")
        if plan["world_size"] > 1:
            print(f"parallel: FSDP2 over {plan['world_size']} ranks (memory below is per rank)")
        elif ranks > 1:
            print(f"parallel: DDP over {ranks} ranks (whole copies on every rank; memory below is per rank)")
        if ranks > 1:
            print(f"global batch: {cfg.effective_batch} x {ranks} ranks = {cfg.effective_batch * ranks} per "
                  f"optimizer step")
        print(f"memory estimate: {plan['estimate_text']}")
        print(f"device memory: {_gb(plan['device_memory_bytes'])}")
        print(f"checkpoints: about {disk_size_text(ckpt_bytes)} each (student, EMA teacher, Gram teacher and AdamW "
              f"moments in fp32); --ckpt-keep-last {keep} keeps {keep} and a save writes one more before it "
              f"removes the oldest: about {disk_size_text((keep + 1) * ckpt_bytes)} of disk under --out")
        kept = cfg.io.ckpt_keep_emergency
        print("  and where anomalies or failed steps are met, emergency checkpoints of the same size: "
              + (f"--ckpt-keep-emergency {kept} keeps the newest {kept} (up to {disk_size_text(kept * ckpt_bytes)} more)"
                 if kept else "--ckpt-keep-emergency 0 keeps every one"))
        if disk is not None:
            print(f"disk here: {disk_size_text(disk_free)} free for {disk[0]}"
                  + (f"; warning: {disk_warning}" if disk_warning else ""))
        if plan["fits"]:
            print("verdict: fits")
        else:
            print("verdict: does NOT fit; ways out:")
            for s in plan["suggestions"]:
                print(f"  - {s}")
    return code


def write_config_json(run_dir: Path, cfg: RunConfig, info, preset_name, plan, provenance) -> None:
    doc = {
        "train": cfg.to_flat(),
        "sections": cfg.to_dict(),
        "effective_batch": cfg.effective_batch,
        "hardware": {**info.to_dict(), "preset": preset_name},
        "parameters": {"backbone": plan["backbone_params"], "head": plan["head_params"]},
        "memory_estimate_gb": round(plan["estimate"].total / 1024**3, 3),
        "provenance": provenance,
    }
    atomic_write_text(run_dir / "config.json", json.dumps(doc, indent=2, default=str) + "\n")
