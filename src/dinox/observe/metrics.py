"""Training metrics sinks: one JSON line per log call, TensorBoard scalars, a stdout line.

`metrics.jsonl` is the durable record of a run: every call appends one line and flushes it,
so a crash loses at most the line being written. A resumed run appends to the same file
after `truncate_after(resume_step)` has dropped the lines the crashed run wrote past the
checkpoint it resumes from, so every step appears once.

JSON keys are the metric names as given (snake_case by convention: `loss`, `loss_dino`,
`entropy_teacher`, `lr`). TensorBoard tags are `Prefix/Title_Case` (`Train/Loss_DINO`,
`Train/Entropy_Teacher`); a name that already contains '/' is used as the tag unchanged.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dinox.errors import UserError
from dinox.run.files import atomic_write

log = logging.getLogger("dinox.metrics")

METRICS_FILE = "metrics.jsonl"

# Words whose conventional spelling is not plain capitalisation.
_TAG_WORDS = {"dino": "DINO", "koleo": "KoLeo", "ibot": "iBOT", "lr": "LR", "wd": "WD",
              "gb": "GB", "rss": "RSS", "std": "Std"}


def tensorboard_tag(name: str, prefix: str = "Train") -> str:
    """`loss_dino` -> `Train/Loss_DINO`; names containing '/' are already tags."""
    if "/" in name:
        return name
    words = [_TAG_WORDS.get(w.lower(), w[:1].upper() + w[1:]) for w in name.split("_")]
    return f"{prefix}/{'_'.join(words)}"


def json_safe(obj: Any) -> Any:
    """A JSON-ready copy of `obj`: dicts and sequences recursively, 0-d tensors and numpy
    scalars as numbers, small tensors (<= 16 values) as lists, larger ones by shape,
    non-finite floats as None (JSON has no NaN), anything else as its string."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "numel") and callable(obj.numel) and obj.numel() != 1:
        return json_safe(obj.tolist()) if obj.numel() <= 16 else f"tensor{tuple(obj.shape)}"
    if hasattr(obj, "item") and callable(obj.item):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else None


def _step_of(line: str) -> int:
    return int(json.loads(line)["step"])


def lines_until(path: str | os.PathLike, step: int) -> tuple[list[str], int]:
    """(the JSONL lines of `path` with step <= `step`, each ending in a newline; the number of
    other lines, unreadable ones included: a damaged byte drops its line, not the resume)."""
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                keep = _step_of(line) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    return kept, dropped


class MetricsUnwritable(UserError):
    """The run folder no longer takes the metrics (a full disk, a folder removed)."""


_other_excepthook = threading.excepthook


def _tensorboard_thread_hook(args) -> None:
    """TensorBoard's writer thread prints its traceback when a write fails, then hands the
    same error to the next call in the main thread: that one is answered (in one line), so
    the thread's own copy is not printed. Every other thread's error goes to the hook that
    was in place before."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _other_excepthook(args)


def _quiet_tensorboard_thread() -> None:
    global _other_excepthook
    if threading.excepthook is not _tensorboard_thread_hook:
        _other_excepthook, threading.excepthook = threading.excepthook, _tensorboard_thread_hook


class MetricsLogger:
    """Append-only JSONL + TensorBoard logger for one run directory.

    Only the main process writes (`is_main=False` makes every method a no-op), so the
    trainer can call it unconditionally under torchrun. `elapsed_offset` lets a resumed run
    continue the `wall` clock of the run it resumes.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, is_main: bool = True,
                 elapsed_offset: float = 0.0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.is_main = is_main
        self.tensorboard = tensorboard
        self._start = time.monotonic() - float(elapsed_offset)
        self._file = None
        self._writer = None   # opened with the first row: a resume's purge_step is known by then
        self._purge_step: int | None = None
        self._failed: str | None = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def _open_writer(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_thread()
        return SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    @property
    def elapsed(self) -> float:
        """Seconds since this logger started, plus `elapsed_offset`."""
        return time.monotonic() - self._start

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "Train") -> dict:
        """Write one record; returns it (non-finite values already replaced by None)."""
        record = {"step": int(step), "time": round(time.time(), 3), "wall": round(self.elapsed, 3)}
        for name, value in metrics.items():
            record[name] = json_safe(value)
        if not self.is_main:
            return record
        if self._failed:
            raise MetricsUnwritable(self._failed)
        try:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            if self.tensorboard and self._writer is None:
                self._writer = self._open_writer(self._purge_step)
            if self._writer is not None:
                for name, value in record.items():
                    if name in ("step", "time", "wall") or isinstance(value, (bool, str)) or value is None:
                        continue
                    self._writer.add_scalar(tensorboard_tag(name, prefix), value, global_step=int(step))
                self._writer.flush()
        except OSError as exc:
            self._abandon()
            self._failed = (f"cannot write the run's metrics in {self.run_dir} ({exc.strerror or exc}): free disk "
                            f"space there, or restore the folder")
            raise MetricsUnwritable(self._failed) from None
        return record

    def _abandon(self) -> None:
        """Let go of the files after a failed write, without writing (or failing) again."""
        for closing in (self._file, self._writer):
            try:
                if closing is not None:
                    closing.close()
            except Exception:   # noqa: BLE001 - the write error is the one to report
                pass
        self._file = self._writer = None

    def truncate_after(self, step: int, logged_every: int = 1) -> int:
        """Drop JSONL records with step > `step` (and unreadable lines); returns lines dropped.

        TensorBoard events past `step` are hidden by reopening the writer with
        `purge_step=step + 1`, TensorBoard's own mechanism for resumed runs. Rows missing
        before `step` (the file deleted or cut outside dinox; a row was due every
        `logged_every` steps) are named in a warning: plots would show a quiet gap.
        """
        if not self.is_main:
            return 0
        self._file.close()
        kept, dropped = lines_until(self.path, step)
        last = _step_of(kept[-1]) if kept else None   # rows are appended in step order
        if step > 0 and (last is None or step - last >= logged_every):
            held = "no rows" if last is None else f"rows only up to step {last}"
            log.warning("%s holds %s but the checkpoint is at step %d: the rows between are missing (the run's "
                        "metrics.jsonl was deleted or cut, or the checkpoint no longer sits in the run folder that "
                        "logged them); training goes on and appends from step %d, the TensorBoard events keep "
                        "what they hold", self.path, held, step, step + 1)
        atomic_write(self.path, lambda f: f.writelines(line.encode("utf-8") for line in kept))
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = int(step) + 1
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_eta(seconds: float) -> str:
    """`HhMMm`, e.g. 0h07m, 12h30m, 180h00m (minutes rounded up, so 0h00m means done)."""
    minutes = max(0, math.ceil(seconds / 60.0))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_progress(step: int, metrics: Mapping[str, Any], extra: Iterable[str] = (),
                    max_steps: int | None = None) -> str:
    """The interval line, e.g. `step=   100 loss=3.4521 lr=1.2e-04 steps/s=1.23 samples/s=78.7 elapsed=81.3s`.

    Reads `loss`, `lr`, `steps_per_s`, `samples_per_s` and `elapsed` from `metrics`, each
    only if present; names in `extra` are appended as `name=value`. With `max_steps`, the
    time left at the current `steps_per_s` comes last, as ` eta=HhMMm` (left out while the
    rate is unknown).
    """
    def get(name):
        value = json_safe(metrics[name]) if name in metrics else None
        return float("nan") if value is None and name in metrics else value

    parts = [f"step={int(step):6d}"]
    for name, label, fmt in (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.1e}"),
                             ("steps_per_s", "steps/s", "{:.2f}"),
                             ("samples_per_s", "samples/s", "{:.1f}"),
                             ("elapsed", "elapsed", "{:.1f}s")):
        value = get(name)
        if value is not None:
            parts.append(f"{label}={fmt.format(value)}")
    for name in extra:
        value = get(name)
        if value is not None:
            parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    if max_steps is not None:
        rate = get("steps_per_s")
        if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0:
            parts.append(f"eta={format_eta(max(0, int(max_steps) - int(step)) / rate)}")
    return " ".join(parts)


class Throughput:
    """Steps and samples per second over windows of >= 1 s (or 50 steps)."""

    def __init__(self, start: float, samples_per_step: int):
        self.start, self.window_start, self.window_steps = start, start, 0
        self.samples_per_step = samples_per_step
        self.steps_per_s = self.samples_per_s = 0.0

    def update(self, now: float, first_step_of_run: bool) -> dict[str, float]:
        self.window_steps += 1
        if now - self.window_start >= 1.0 or self.window_steps >= 50:
            self.steps_per_s = self.window_steps / (now - self.window_start)
            self.window_start, self.window_steps = now, 0
        elif first_step_of_run:
            self.steps_per_s = 1.0 / max(now - self.start, 1e-9)
        self.samples_per_s = self.steps_per_s * self.samples_per_step
        return {"steps_per_s": self.steps_per_s, "samples_per_s": self.samples_per_s}


def _gram_line(cfg, img_size: int) -> str:
    """The run's Gram anchoring policy in one line (always on)."""
    s = cfg.ssl
    if s.gram_refresh_every == 1:
        teacher = "the Gram teacher is the EMA teacher, copied every step"
        if s.gram_teacher_scale == 1:
            teacher += " (no forward of its own)"
    else:
        teacher = f"Gram teacher refreshed every {s.gram_refresh_every} steps"
    if s.gram_teacher_scale > 1:
        teacher += f", sees the global views at {s.gram_teacher_scale}x ({img_size * s.gram_teacher_scale}px)"
    return f"Gram anchoring: weight {s.gram_weight:.3g}, {teacher} (always on)"


def _objective_line(cfg) -> str:
    """The run's self-distillation targets and loss weights in one line."""
    m, s = cfg.model, cfg.ssl
    targets = ("Sinkhorn-Knopp targets" if s.centering == "sinkhorn"
               else f"EMA-centred targets (centre momentum {s.center_momentum:g})")
    if s.teacher_temp_warmup_steps > 0 and s.teacher_temp_start != s.teacher_temp:
        temp = f"{s.teacher_temp_start:g} -> {s.teacher_temp:g} over {s.teacher_temp_warmup_steps} steps"
    else:
        temp = f"{s.teacher_temp:g} flat"
    return (f"objective: DINO over {m.out_dim} prototypes ({m.prototype_norm} norms), {targets}, teacher "
            f"temperature {temp}, student {s.student_temp:g} | iBOT {s.ibot_weight:g} | KoLeo {s.koleo_weight:g}"
            + (f" | dense {s.dense_weight:g} (temperature {s.dense_temp:g}"
               + (f", teacher keys at {s.dense_teacher_scale}x" if s.dense_teacher_scale > 1 else "") + ")"
               if s.dense_weight > 0 else " | dense off"))


def run_header(cfg, *, world_size: int, samples: int, params: tuple[int, int], autocast_dtype,
               sharding: list[str] | None = None) -> list[str]:
    """The lines that open a run's log: model, batch, schedule and views, how the processes
    share the model, the objective, Gram anchoring."""
    m, v, o = cfg.model, cfg.views, cfg.optim
    steps = o.max_steps if o.max_steps is not None else "until stopped"
    if sharding:
        parallel = [f"parallel: FSDP2 over {world_size} ranks: " + line for line in sharding]
    elif world_size > 1:
        parallel = [f"parallel: DDP over {world_size} ranks: every rank holds whole copies of the student, "
                    f"teacher, Gram teacher and AdamW state"]
    else:
        parallel = []
    return [
        f"model {m.preset}: patch {m.vit_patch} dim {m.vit_dim} depth {m.vit_depth} heads {m.vit_heads} "
        f"mlp {m.vit_mlp} | backbone {params[0] / 1e6:.2f}M + head {params[1] / 1e6:.2f}M parameters",
        f"batch: per-device {o.batch_size} x accumulation {o.accumulation_steps} x {world_size} device(s) = "
        f"effective {cfg.effective_batch * world_size} | {samples} training samples",
        f"steps: {steps} | lr {o.lr:.2e} -> {o.min_lr:.2e}, warm-up {o.warmup_steps} | views: 2 x {v.img_size}px "
        f"global + {v.local_crops} x {v.local_size}px local | amp {autocast_dtype or 'off (fp32)'} | "
        f"grad checkpoint {cfg.runtime.grad_checkpoint}",
        *parallel,
        _objective_line(cfg),
        _gram_line(cfg, v.img_size),
    ]
