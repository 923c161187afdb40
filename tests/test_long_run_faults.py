"""Faults of a weeks-long run: an unlimited run's teacher, a resume that drops --max-steps,
a console that goes away before the stop's checkpoint, stop signals reaching the loader's
workers, a damaged metrics byte, and `--resume auto` beside a run that never saved."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinox.commands.argtypes import step_budget
from dinox.config import UNLIMITED_STEPS, resolve
from dinox.observe.metrics import lines_until
from dinox.run import checkpoint as ck
from dinox.run.logging import close_file_logging, console, setup_logging
from dinox.run.schedules import UNLIMITED_MOMENTUM_END
from dinox.train.optim import Schedules
from dinox.train.runs import find_checkpoint


def large(**given):
    return resolve({"config": "vit-large", **given}, hardware_preset="cpu", device_kind="cpu")


def momentum_at(cfg, step: int) -> float:
    return Schedules.from_config(cfg).at(step)["teacher_momentum"]


def test_an_unlimited_run_keeps_its_teacher_learning_past_the_horizon():
    resolved = large()
    cfg = resolved.cfg
    assert cfg.optim.max_steps is None and cfg.ssl.momentum_end == 1.0
    horizon = cfg.optim.horizon
    assert momentum_at(cfg, 0) == pytest.approx(cfg.ssl.momentum)
    for step in (horizon, 3 * horizon):
        assert momentum_at(cfg, step) == UNLIMITED_MOMENTUM_END < 1.0
    assert any("unlimited run" in n and f"{UNLIMITED_MOMENTUM_END:g}" in n for n in resolved.notices)
    # A finite run keeps DINO's cosine to 1.0 at its end; a chosen end below 1 is kept as given.
    assert momentum_at(large(max_steps=50_000).cfg, 50_000) == 1.0
    chosen = large(momentum_end=0.9995)
    assert momentum_at(chosen.cfg, 3 * horizon) == 0.9995
    assert not any("unlimited run" in n for n in chosen.notices)


def test_a_resume_without_max_steps_keeps_the_runs_budget():
    saved = large(max_steps=5000).cfg.to_flat()
    kept = resolve({}, hardware_preset="cpu", device_kind="cpu", saved=saved)
    assert kept.cfg.optim.max_steps == 5000
    assert not any("--max-steps" in n for n in kept.notices)
    longer = resolve({"max_steps": 8000}, hardware_preset="cpu", device_kind="cpu", saved=saved)
    assert longer.cfg.optim.max_steps == 8000
    endless = resolve({"max_steps": step_budget("unlimited")}, hardware_preset="cpu", device_kind="cpu", saved=saved)
    assert endless.cfg.optim.max_steps is None
    assert any("(unlimited) differs from the checkpoint's 5000" in n for n in endless.notices)
    assert large(max_steps=UNLIMITED_STEPS).cfg.optim.max_steps is None


def test_step_budget_reads_numbers_and_unlimited_only():
    assert step_budget("384") == 384
    assert step_budget(" Unlimited ") == UNLIMITED_STEPS
    import argparse

    for bad in ("0", "-3", "forever", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            step_budget(bad)


def test_a_console_that_went_away_does_not_stop_the_run(tmp_path, monkeypatch):
    setup_logging(tmp_path)
    try:
        def gone(*args, **kwargs):
            raise BrokenPipeError(32, "Broken pipe")

        monkeypatch.setattr("builtins.print", gone)
        console("step=  10 loss=1.0")  # no exception: the step's checkpoint is still to be saved
        console("step=  11 loss=0.9")
        handlers = logging.getLogger("dinox").handlers
        assert not any(getattr(h, "_dinox_console", False) for h in handlers)
        for h in handlers:
            h.flush()
        log = (tmp_path / "train.log").read_text()
        assert "the console went away (Broken pipe)" in log
        assert "step=  10 loss=1.0" in log and "step=  11 loss=0.9" in log
    finally:
        monkeypatch.undo()
        close_file_logging()
        setup_logging(None)


def test_loader_workers_ignore_the_warning_signals():
    """A scheduler that signals every process of the job reaches the workers too: the
    parent saves and stops them; a worker ended by the signal would fail the step first.
    SIGTERM still ends a worker: it is how its parent stops one that does not exit."""
    code = ("import signal; from dinox.run.signals import STOP_SIGNALS; "
            "from dinox.train.data_stream import _worker_leaves_process_group as init; init(0); "
            "print(all(signal.getsignal(s) == (signal.SIG_DFL if s == signal.SIGTERM else signal.SIG_IGN) "
            "for s in STOP_SIGNALS), len(STOP_SIGNALS) > 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(ck.__file__).parents[2])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True True"


def test_a_damaged_byte_in_the_metrics_drops_its_line_not_the_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo\xffss": 1.5}\n{"step": 3, "loss": 1.0}\n')
    kept, dropped = lines_until(path, 2)
    assert kept[0] == '{"step": 1, "loss": 2.0}\n' and len(kept) == 2  # the damaged row is still a step-2 row
    assert dropped == 1
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"st\xffep": 2}\n')
    assert lines_until(path, 5) == (['{"step": 1, "loss": 2.0}\n'], 1)


def _saved_run(run: Path, step: int, at: float) -> Path:
    path = ck.checkpoint_path(run, step)
    ck.save_checkpoint(path, {"step": step, "w": torch.ones(3)})
    os.utime(path, (at, at))
    os.utime(run, (at, at))
    return path


def test_resume_auto_starts_anew_when_the_latest_run_never_saved(tmp_path, caplog):
    """Run A saved and ended; run B started later (another experiment, or a first launch
    killed before its first checkpoint). Continuing A with B's flags would be wrong."""
    now = time.time()
    older = _saved_run(tmp_path / "20260101_090000", 100, now - 7200)
    assert ck.latest_run_never_saved(tmp_path) is None and ck.find_resume_checkpoint(tmp_path) == older
    never_saved = ck.new_run_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dinox"):
        assert find_checkpoint("auto", tmp_path) == (None, True)
    assert never_saved.name in caplog.text and "stopped before its first checkpoint" in caplog.text
    # Once the older run is written to again (a resume of it, a save), it is the latest.
    os.utime(never_saved, (now - 9000, now - 9000))
    assert ck.latest_run_never_saved(tmp_path) is None


def test_train_log_holds_the_console_lines_once_and_the_console_has_no_timestamps(tmp_path, capsys):
    setup_logging(tmp_path)
    try:
        console("step=    10 loss=1.0000 lr=1.0e-03")
        console("eval step=10 retrieval top1=0.1000 ratio=2.00 (n=64) effective_rank=3.0")
        console("training finished at step 10; final checkpoint: x.pth")
        for h in logging.getLogger("dinox").handlers:
            h.flush()
    finally:
        close_file_logging()
        setup_logging(None)
    out = capsys.readouterr().out.splitlines()
    assert out == ["step=    10 loss=1.0000 lr=1.0e-03",
                   "eval step=10 retrieval top1=0.1000 ratio=2.00 (n=64) effective_rank=3.0",
                   "training finished at step 10; final checkpoint: x.pth"]
    log = (tmp_path / "train.log").read_text()
    for line in out:
        assert log.count(line) == 1, line
    assert " INFO step=    10 loss=1.0000" in log
