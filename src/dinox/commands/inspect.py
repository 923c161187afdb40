"""`dinox inspect CKPT [CKPT...]`: is each checkpoint intact, and what is inside.

Per file: integrity (and why not: a sha256 record that does not match, a file that does
not load, required entries missing, a non-finite or implausibly large tensor), size, step,
model configuration, provenance, DINO centre statistics (a centre drifting far from zero,
or a near-uniform teacher, shows up here), and the L2 norms of student / teacher /
Gram-teacher weights per top-level module.
Exit status 0 when every file is intact, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dinox.commands.argtypes import path_text
from dinox.config import SHAPE_FIELDS, check_checkpoint_format, config_from_checkpoint
from dinox.errors import UserError
from dinox.model.dino_model import build_dino_model
from dinox.observe.metrics import json_safe
from dinox.run.checkpoint import (CheckpointError, load_checkpoint, network_mismatch, not_a_checkpoint,
                                  parse_checkpoint_name, verify_checkpoint)
from dinox.run.signals import interrupts_raise
from dinox.run.torch_file import first_line

_WEIGHT_SETS = ("student", "teacher", "gram_teacher")
# Without these a file is no usable dinox checkpoint, not even for evaluation (eval reads
# the teacher and the configuration); resuming needs more (commands/train.py RESUME_KEYS).
REQUIRED_KEYS = ("format", "format_version", "step", "student", "teacher", "config")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="check checkpoints for damage and summarise their contents",
        description="Verify each checkpoint (sha256 record or full load) and print its step, "
                    "model config, provenance, DINO centre statistics and weight norms. "
                    "Exits 1 if any file is damaged.",
    )
    parser.add_argument("checkpoints", nargs="+", type=path_text, metavar="CKPT", help="checkpoint .pth files")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.set_defaults(func=run)
    return parser


def _module_name(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.split(".", 1)[0]


def weight_norms(state_dict: dict) -> dict:
    """{"total": L2 over all floating tensors, "modules": {top-level name: L2}}."""
    squares: dict[str, float] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            module = _module_name(str(key))
            squares[module] = squares.get(module, 0.0) + float(value.double().square().sum())
    return {
        "total": math.sqrt(sum(squares.values())),
        "modules": {name: math.sqrt(sq) for name, sq in sorted(squares.items())},
    }


def centre_stats(center: torch.Tensor) -> dict:
    c = center.detach().double().flatten()
    return {
        "out_dim": c.numel(),
        "mean": float(c.mean()),
        "std": float(c.std()) if c.numel() > 1 else 0.0,
        "min": float(c.min()),
        "max": float(c.max()),
        "l2": float(c.norm()),
    }


def model_summary(state: dict) -> dict:
    """The model preset and the shape fields recorded in the checkpoint's configuration
    ({} if it has none); fields it does not record are left out, not defaulted. The format
    is checked before (`summarize`)."""
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    summary = {"preset": saved["config"]} if isinstance(saved.get("config"), str) else {}
    summary.update({k: saved[k] for k in SHAPE_FIELDS if k in saved})
    return json_safe(summary)


def networks_problem(state: dict) -> str | None:
    """Why the weights do not fit the model the checkpoint's configuration describes (an
    edited file), or None; the model is built on the meta device, so nothing is allocated.
    Judged only against a configuration that records the whole shape, as `dinox train`
    writes it: a partial one (a hand-made file) names no model to fit."""
    saved = state["config"]
    if isinstance(saved, dict) and not all(name in saved for name in SHAPE_FIELDS):
        return None   # not a dict: config_from_checkpoint below says so
    try:
        cfg = config_from_checkpoint(state)
        with torch.device("meta"):
            model = build_dino_model(cfg.model, img_size=cfg.views.img_size, drop_path=0.0)
    except UserError as exc:
        return str(exc)
    except Exception as exc:   # a configuration no model can be built from
        return f"its configuration builds no model ({first_line(exc)})"
    for name in _WEIGHT_SETS:   # the Gram teacher is a backbone alone
        module = model.backbone if name == "gram_teacher" else model
        problem = network_mismatch(module, state[name]) if name in state else None
        if problem:
            return f"its {name} network does not fit the model its configuration describes ({problem})"
    return None


def summarize(path) -> dict:
    """Everything `inspect` reports about one file, as a JSON-ready dict."""
    path = Path(path)
    parsed = parse_checkpoint_name(path)
    report: dict = {"path": str(path), "kind": parsed[1] if parsed else None}
    if path.is_dir():
        report["size_bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    else:
        report["size_bytes"] = path.stat().st_size if path.is_file() else None
    other = not_a_checkpoint(path) if path.exists() else None
    if other:  # not damage: a missing path, a folder, an export
        report["intact"], report["reason"], report["not_a_checkpoint"] = False, other, True
        return report
    intact, reason = verify_checkpoint(path, REQUIRED_KEYS)
    report["intact"], report["reason"] = intact, reason
    if not intact:
        return report
    try:
        state = load_checkpoint(path, verify=False, mmap=True)
    except CheckpointError as exc:
        report["intact"], report["reason"] = False, str(exc)
        return report
    try:
        check_checkpoint_format(state)
    except UserError as exc:   # intact, but not for this dinox to read
        report["intact"], report["reason"], report["unreadable"] = False, str(exc), True
        return report
    problem = networks_problem(state)
    if problem:
        report["intact"], report["reason"] = False, problem
        return report
    report["format"] = state.get("format")
    report["format_version"] = state.get("format_version")
    report["step"] = state.get("step", parsed[0] if parsed else None)
    model = model_summary(state)
    if model:
        report["model"] = model
    provenance = state.get("provenance")
    if isinstance(provenance, dict):
        report["provenance"] = {k: json_safe(provenance.get(k))
                                for k in ("git_commit", "data_manifest_hash") if k in provenance}
    if isinstance(state.get("data"), dict):
        report["data"] = json_safe(state["data"])
    center = state.get("dino_loss", {}).get("center") if isinstance(state.get("dino_loss"), dict) else None
    if isinstance(center, torch.Tensor) and center.numel():
        report["dino_center"] = centre_stats(center)
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        if config.get("centering") == "sinkhorn":   # the centre stays at its zeros: not a fault
            report["dino_center"]["unused"] = "Sinkhorn-Knopp targets"
    for name in _WEIGHT_SETS:
        if isinstance(state.get(name), dict):
            report[f"{name}_norms"] = weight_norms(state[name])
    if isinstance(state.get("metrics"), dict):
        report["metrics"] = json_safe(state["metrics"])
    return report


def _size_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fields(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def _row(label: str, text: str) -> str:
    return f"  {label + ':':<13} {text}"


def format_report(report: dict) -> str:
    status = ("intact" if report["intact"] else "MISSING" if report["reason"] == "no such file"
              else "NOT A CHECKPOINT" if report.get("not_a_checkpoint")
              else "NOT READABLE HERE" if report.get("unreadable") else "DAMAGED")
    lines = [report["path"],
             _row("status", f"{status} ({report['reason']})"),
             _row("size", _size_text(report["size_bytes"]))]
    if not report["intact"]:
        return "\n".join(lines)
    fmt = report.get("format") or "unknown format"
    lines.append(_row("step", f"{report.get('step')}  ({report.get('kind') or 'unnamed'}; "
                              f"{fmt} v{report.get('format_version')})"))
    for key, label in (("model", "model"), ("provenance", "provenance"), ("data", "data")):
        if key in report:
            lines.append(_row(label, _fields(report[key])))
    if "dino_center" in report:
        c = report["dino_center"]
        lines.append(_row("DINO centre", f"not used: the run has {c['unused']} (--centering sinkhorn)" if c.get("unused")
                          else f"out_dim={c['out_dim']} mean={c['mean']:.4g} "
                          f"std={c['std']:.4g} min={c['min']:.4g} max={c['max']:.4g} l2={c['l2']:.4g}"))
    for name in _WEIGHT_SETS:
        norms = report.get(f"{name}_norms")
        if norms:
            parts = " ".join(f"{m}={v:.4g}" for m, v in norms["modules"].items())
            lines.append(_row(f"{name} L2", f"total={norms['total']:.4g} {parts}".rstrip()))
    if "metrics" in report:
        lines.append(_row("metrics", _fields(report["metrics"])))
    return "\n".join(lines)


def run(args) -> int:
    all_intact = True
    done = 0
    # SIGTERM and SIGHUP too: one line and exit 143 / 129, not a silent end
    with interrupts_raise(lambda sig: f"inspect stopped by {sig} after {done} of {len(args.checkpoints)} "
                                      f"checkpoint(s)"):
        for path in args.checkpoints:
            report = summarize(path)
            all_intact &= bool(report["intact"])
            print(json.dumps(report) if args.json else format_report(report), flush=True)
            done += 1
    return 0 if all_intact else 1
