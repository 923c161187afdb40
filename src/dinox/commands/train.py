"""`dinox train` (and scripts/phase5_big_run.py): resolve the run, plan memory, train."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from dinox.data.layout import atomic_write_text
from dinox.errors import UserError
from dinox.config import TrainConfig, add_train_arguments, build_config, explicit_values

log = logging.getLogger("dinox.train")

EXIT_WONT_FIT = 3


class WontFit(UserError):
    exit_code = EXIT_WONT_FIT


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a DINOv3-style ViT (the Phase 5 big run)",
        description="Train a DINOv3-style ViT on a processed CT root. Gram anchoring is always on.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def setup_logging(run_dir: Path | None = None, is_main: bool = True) -> None:
    logger = logging.getLogger("dinox")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(logger.handlers):
        if getattr(h, "_dinox_console", False) or (run_dir is not None and getattr(h, "_dinox_file", False)):
            logger.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    handler._dinox_console = True
    logger.addHandler(handler)
    if run_dir is not None and is_main:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file_handler._dinox_file = True
        logger.addHandler(file_handler)
    logger.propagate = False


def resolve_arch(args: argparse.Namespace):
    from dinox.model.presets import resolve_arch as preset_arch

    arch = preset_arch(
        args.config,
        patch=args.vit_patch,
        dim=args.vit_dim,
        depth=args.vit_depth,
        heads=args.vit_heads,
        mlp_hidden_dim=args.vit_mlp,
    )
    if args.swiglu is not None:
        arch = replace(arch, swiglu=args.swiglu)
    if args.registers is not None:
        arch = replace(arch, num_registers=args.registers)
    return arch


def shape_mismatch(saved: dict, cfg: TrainConfig) -> list[str]:
    defaults = TrainConfig.__dataclass_fields__
    return [
        f"{name}: checkpoint {saved.get(name, defaults[name].default)!r}, requested {getattr(cfg, name)!r}"
        for name in TrainConfig.SHAPE_FIELDS
        if saved.get(name, defaults[name].default) != getattr(cfg, name)
    ]


def matching_flags(saved: dict) -> str:
    flags = (
        f"--config {saved.get('config', 'custom')} --vit-patch {saved['vit_patch']} --vit-dim {saved['vit_dim']} "
        f"--vit-depth {saved['vit_depth']} --vit-heads {saved['vit_heads']} --vit-mlp {saved['vit_mlp']} "
        f"--out-dim {saved['out_dim']} --img-size {saved['img_size']} --layerscale {saved.get('layerscale', 1e-5)}"
    )
    if saved.get("swiglu"):
        flags += " --swiglu"
    return flags


def merge_resumed(saved: dict, requested: TrainConfig, given: dict) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's settings, except hardware values and flags the user gave now."""
    mismatch = shape_mismatch(saved, requested)
    if mismatch:
        raise UserError(
            "the checkpoint's model differs from the one requested ("
            + "; ".join(mismatch)
            + f"). Resume with the checkpoint's shape: {matching_flags(saved)}"
        )
    known = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in saved.items() if k in known}
    for name in ("num_workers", "pin_memory", "batch_size", "accumulation_steps", "device", "hardware_preset",
                 "custom_values", "max_steps", "out", "resume"):
        values[name] = getattr(requested, name)
    values.update({k: v for k, v in given.items() if k in known})
    merged = TrainConfig(**values)
    if saved.get("max_steps") != merged.max_steps:
        log.warning(
            "--max-steps %s differs from the checkpoint's %s: the learning-rate, weight-decay and momentum "
            "schedules are recomputed for the new length from the resumed step on",
            merged.max_steps if merged.max_steps is not None else "(unlimited)", saved.get("max_steps"),
        )
    changes = [
        f"{name}: {saved.get(name)!r} -> {getattr(merged, name)!r}"
        for name in sorted(known)
        if name not in ("resume", "custom_values") and saved.get(name) != getattr(merged, name)
    ]
    return merged, changes


def find_checkpoint(resume: str, out_root: Path) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, and whether its integrity was already verified
    (`--resume auto` checks every candidate; a given path is checked when loaded)."""
    from dinox.run.checkpoint import find_resume_checkpoint

    if resume == "auto":
        return find_resume_checkpoint(out_root), True
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume {resume}: no such checkpoint file; use --resume auto or a path to a .pth file")
    return path, False


def plan_memory(cfg: TrainConfig, device_memory: float | None, info) -> dict:
    """Build on the meta device, count parameters and estimate the training peak."""
    from dinox.model.dino_model import build_dino_model
    from dinox.model.vit import swiglu_hidden_dim
    from dinox.train.plan import estimate_training_memory, fits, format_estimate, suggestions

    with torch.device("meta"):
        model = build_dino_model(cfg)
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    head_params = sum(p.numel() for p in model.head.parameters())
    estimate = estimate_training_memory(
        params_backbone=backbone_params,
        params_head=head_params,
        embed_dim=cfg.vit_dim,
        depth=cfg.vit_depth,
        num_heads=cfg.vit_heads,
        mlp_hidden_dim=swiglu_hidden_dim(cfg.vit_mlp) if cfg.swiglu else cfg.vit_mlp,
        patch_size=cfg.vit_patch,
        num_registers=cfg.registers,
        batch_size=cfg.batch_size,
        global_size=cfg.img_size,
        n_global=2,
        local_size=cfg.local_size,
        n_local=cfg.local_crops,
        amp=cfg.amp,
        grad_checkpoint=cfg.grad_checkpoint,
        out_dim=cfg.out_dim,
        swiglu=cfg.swiglu,
        head_hidden_dim=cfg.head_hidden,
        head_bottleneck_dim=cfg.head_bottleneck,
    )
    capacity = int(device_memory * 1024**3) if device_memory else info.total_memory_bytes
    verdict = fits(estimate, capacity) if capacity else True
    advice = [] if verdict else suggestions(estimate, capacity, accumulation_steps=cfg.accumulation_steps)
    return {
        "backbone_params": backbone_params,
        "head_params": head_params,
        "estimate": estimate,
        "estimate_text": format_estimate(estimate),
        "device_memory_bytes": capacity,
        "fits": verdict,
        "suggestions": advice,
    }


def run(args: argparse.Namespace) -> int:
    from dinox.model.dino_model import arch_from_config
    from dinox.model.presets import validate_arch
    from dinox.run.distributed import DistEnv
    from dinox.run.device import apply_hardware_preset, detect_device, hardware_change_notice, match_preset

    dist = DistEnv.from_environment()
    setup_logging(is_main=dist.is_main)
    arch = resolve_arch(args)
    info, device_notes = detect_device(args.device or "auto", local_rank=dist.local_rank)
    preset_name = match_preset(info)
    user_hw = {k: getattr(args, k) for k in ("num_workers", "pin_memory", "batch_size", "accumulation_steps")}
    hardware, preset_lines = apply_hardware_preset(user_hw, preset_name)
    cfg, notices = build_config(args, arch, hardware, preset_name)
    if cfg.device == "auto":
        cfg.device = info.kind

    resume_state = None
    changes: list[str] = []
    out_root = Path(cfg.out)
    if args.resume and not args.dry_run:
        from dinox.run.checkpoint import load_checkpoint

        path, verified = find_checkpoint(args.resume, out_root)
        if path is None:
            notices.append(f"--resume auto: no checkpoint under {out_root}; starting a new run")
        else:
            resume_state = load_checkpoint(path, map_location="cpu", verify=not verified)
            cfg, changes = merge_resumed(resume_state["config"], cfg, explicit_values(args))
            cfg.resume = str(path)
    validate_arch(arch_from_config(cfg), cfg.img_size)

    plan = plan_memory(cfg, args.device_memory, info)
    if args.dry_run:
        return report_dry_run(cfg, info, preset_name, preset_lines, plan, args.json)
    if not plan["fits"]:
        raise WontFit(won_t_fit_message(plan))

    from dinox.train.loop import Trainer
    from dinox.run.provenance import collect_provenance

    dist.init(torch.device(info.torch_device).type)
    try:
        run_dir = Path(cfg.resume).parent if resume_state is not None else broadcast_run_dir(dist, out_root)
        setup_logging(run_dir if dist.is_main else None, is_main=dist.is_main)
        for line in device_notes:
            log.warning(line)
        log.info("device: %s '%s' (%s memory%s)", info.kind, info.name, _gb(info.total_memory_bytes),
                 ", unified" if info.unified_memory else "")
        for line in preset_lines:
            log.info(line)
        for line in notices:
            log.info(line)
        if resume_state is not None:
            log.info("resuming from %s (step %d)", cfg.resume, int(resume_state["step"]))
            for line in changes:
                log.info("changed on resume: %s", line)
            notice = hardware_change_notice(resume_state.get("hardware", {}), info)
            if notice:
                log.warning(notice)
        log.info("memory estimate: %s", plan["estimate_text"])
        data_files = [p for p in _data_files(cfg) if p.exists()]
        provenance = collect_provenance(data_files, cfg.seed, info.torch_device)
        log.info("provenance: git %s, data manifest %s, torch %s, python %s",
                 provenance.get("git_commit"), provenance.get("data_manifest_hash"),
                 provenance.get("torch"), provenance.get("python"))
        if dist.is_main:
            write_config_json(run_dir, cfg, info, preset_name, plan, provenance)
        trainer = Trainer(cfg, info, run_dir, provenance, dist, resume_state=resume_state)
        resume_state = None
        code = trainer.run()
        trainer.release()
        return code
    finally:
        dist.shutdown()
        close_file_logging()


def close_file_logging() -> None:
    logger = logging.getLogger("dinox")
    for h in list(logger.handlers):
        if getattr(h, "_dinox_file", False):
            logger.removeHandler(h)
            h.close()


def broadcast_run_dir(dist, out_root: Path) -> Path:
    from dinox.run.checkpoint import new_run_dir

    name = [str(new_run_dir(out_root))] if dist.is_main else [None]
    if dist.enabled:
        import torch.distributed as tdist

        tdist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _data_files(cfg: TrainConfig) -> list[Path]:
    root = Path(cfg.data_root)
    return [
        Path(cfg.index_csv) if cfg.index_csv else root / "_index" / "index.csv",
        Path(cfg.split_manifest) if cfg.split_manifest else root / "_splits" / "val10_seed0.json",
    ]


def _gb(n: int | None) -> str:
    return f"{n / 1024**3:.1f} GB" if n else "unknown"


def won_t_fit_message(plan: dict) -> str:
    ways = "; ".join(plan["suggestions"]) or "use a smaller model"
    return (
        f"this run needs about {plan['estimate'].total / 1024**3:.1f} GB but the device has "
        f"{_gb(plan['device_memory_bytes'])}; ways out: {ways}"
    )


def report_dry_run(cfg, info, preset_name, preset_lines, plan, as_json: bool) -> int:
    est = plan["estimate"]
    summary = {
        "config": cfg.config,
        "arch": {k: getattr(cfg, k) for k in TrainConfig.SHAPE_FIELDS},
        "img_size": cfg.img_size,
        "backbone_params": plan["backbone_params"],
        "head_params": plan["head_params"],
        "batch_size": cfg.batch_size,
        "accumulation_steps": cfg.accumulation_steps,
        "effective_batch": cfg.effective_batch,
        "amp": cfg.amp,
        "grad_checkpoint": cfg.grad_checkpoint,
        "device": info.to_dict(),
        "hardware_preset": preset_name,
        "memory_estimate_bytes": est.as_dict() if hasattr(est, "as_dict") else vars(est),
        "memory_estimate_gb": round(est.total / 1024**3, 2),
        "device_memory_gb": round(plan["device_memory_bytes"] / 1024**3, 2) if plan["device_memory_bytes"] else None,
        "fits": plan["fits"],
        "suggestions": plan["suggestions"],
    }
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print(f"model {cfg.config}: backbone {plan['backbone_params'] / 1e6:.1f}M + head "
              f"{plan['head_params'] / 1e6:.1f}M parameters (built on the meta device)")
        print(f"device: {info.kind} '{info.name}', preset {preset_name}")
        for line in preset_lines:
            print(f"  {line}")
        print(f"batch {cfg.batch_size} x accumulation {cfg.accumulation_steps} = effective {cfg.effective_batch}; "
              f"{cfg.img_size}px; amp {cfg.amp}; grad checkpoint {cfg.grad_checkpoint}")
        print(f"memory estimate: {plan['estimate_text']}")
        print(f"device memory: {_gb(plan['device_memory_bytes'])}")
        if plan["fits"]:
            print("verdict: fits")
        else:
            print("verdict: does NOT fit; ways out:")
            for s in plan["suggestions"]:
                print(f"  - {s}")
    return 0 if plan["fits"] else EXIT_WONT_FIT


def write_config_json(run_dir: Path, cfg, info, preset_name, plan, provenance) -> None:
    est = plan["estimate"]
    doc = {
        "train": cfg.to_dict(),
        "effective_batch": cfg.effective_batch,
        "hardware": {**info.to_dict(), "preset": preset_name},
        "parameters": {"backbone": plan["backbone_params"], "head": plan["head_params"]},
        "memory_estimate_gb": round(est.total / 1024**3, 3),
        "provenance": provenance,
    }
    atomic_write_text(run_dir / "config.json", json.dumps(doc, indent=2, default=str) + "\n")
