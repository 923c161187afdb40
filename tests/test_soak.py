"""Soak: a run SIGKILLed at 20 random moments (some of them inside a checkpoint save) and
continued with `--resume auto` each time ends bitwise equal to an uninterrupted run.

Slow (a few minutes on two CPU cores, mostly process start-up): `pytest -m slow
tests/test_soak.py`. The moments are drawn from DINOX_SOAK_SEED (default 16); timing still
varies from run to run.
"""
from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from _train_support import losses, processed_root, train_args  # noqa: F401
from dinox.run.checkpoint import list_checkpoints, parse_checkpoint_name, sidecar_path
from test_train import _spawn, assert_same_state, final_weights

KILLS = 20
STEPS = 60
CKPT_EVERY = 3
# The big presets' settings that draw from the global RNG (drop path, local crops), and frozen
# Gram snapshots refreshed out of step with the checkpoints.
COMMON = ("--batch-size", "4", "--num-workers", "0", "--drop-path", "0.1", "--local-crops", "2",
          "--local-size", "16", "--ckpt-every", str(CKPT_EVERY), "--ckpt-keep-last", "2",
          "--max-steps", str(STEPS), "--gram-refresh-every", "5")
_STEP_RE = re.compile(r"^step=\s*(\d+) ")
_RUN_RE = re.compile(r"run directory: (\S+)")


class Watched:
    """A spawned training process whose output is read as it comes: the last step it
    printed and the run folder it writes to."""

    def __init__(self, args: list[str]):
        self.proc = _spawn(args)
        self.step, self.run_dir, self.lines = None, None, []
        self.step_seconds = 0.05  # the last step's duration, once two steps were printed
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        last = None
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := _STEP_RE.match(line):
                now = time.monotonic()
                if last is not None:
                    self.step_seconds = now - last
                self.step, last = int(match.group(1)), now
            elif match := _RUN_RE.search(line):
                self.run_dir = Path(match.group(1))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)

    def output(self) -> str:
        return "".join(self.lines[-40:])


def _saving(run_dir: Path | None) -> bool:
    """A checkpoint is being written into `run_dir` (its temporary file exists)."""
    if run_dir is None:
        return False
    try:
        return any(name.startswith(".checkpoint_") and name.endswith(".tmp") for name in os.listdir(run_dir))
    except FileNotFoundError:
        return False


def _interrupted_save(run_dir: Path | None) -> bool:
    """The kill hit a save: a temporary file is left, or the newest checkpoint has no record yet."""
    if run_dir is None or not run_dir.is_dir():
        return False
    checkpoints = list_checkpoints(run_dir)
    return _saving(run_dir) or bool(checkpoints and not sidecar_path(checkpoints[-1]).exists())


def _newest_saved_step(out: Path) -> int:
    steps = [parse_checkpoint_name(p)[0] for run in out.glob("*") if run.is_dir()
             for p in list_checkpoints(run) if sidecar_path(p).exists()]
    return max(steps, default=0)


def _kill_once(out: Path, args: list[str], rng: random.Random, in_save: bool) -> tuple[bool, int | None]:
    """Start a continuation and SIGKILL it: inside a save, or at a random moment of a step a
    few steps past the last checkpoint (never later than step STEPS - 1). Returns (the kill
    hit a save, the last step it had printed)."""
    newest = _newest_saved_step(out)
    in_save = in_save and newest + CKPT_EVERY < STEPS  # the last save would end the run
    proc = Watched(args)
    deadline = time.monotonic() + 300
    if in_save:
        while proc.alive() and not _saving(proc.run_dir):
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.005))
    else:
        target = min(newest + rng.randint(1, 2 * CKPT_EVERY), STEPS - 2)
        while proc.alive() and (proc.step or 0) < target:
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.9) * proc.step_seconds)  # somewhere inside step target + 1
    assert proc.alive(), f"the run ended before the kill (rc={proc.proc.returncode}):\n{proc.output()}"
    proc.kill()
    return _interrupted_save(proc.run_dir), proc.step


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_resume_bitwise_exact(processed_root, tmp_path, monkeypatch):
    # Every run in its own process with one thread: CPU kernels' reductions depend on the
    # thread count, and two shared cores oversubscribed by OpenMP run 40x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    straight = tmp_path / "straight"
    reference_run = _spawn(train_args(processed_root, straight, *COMMON))
    output, _ = reference_run.communicate(timeout=600)
    assert reference_run.returncode == 0, output[-4000:]

    rng = random.Random(int(os.environ.get("DINOX_SOAK_SEED", "16")))
    killed = tmp_path / "killed"
    args = train_args(processed_root, killed, *COMMON, "--resume", "auto")
    in_saves, printed = 0, []
    for i in range(KILLS):
        hit_save, step = _kill_once(killed, args, rng, in_save=i % 3 == 1)
        in_saves += hit_save
        printed.append(step)
    last = _spawn(args)
    output, _ = last.communicate(timeout=600)
    assert last.returncode == 0, output[-4000:]

    finished = [run for run in killed.iterdir() if list(run.glob("checkpoint_final_*.pth"))]
    assert len(finished) == 1
    reference = next(straight.iterdir())
    assert_same_state(final_weights(reference), final_weights(finished[0]))
    assert losses(reference) == losses(finished[0])
    elapsed = time.monotonic() - started
    print(f"\nsoak: {KILLS} SIGKILLs ({in_saves} inside a save; steps printed before each kill: {printed}), "
          f"resumed bitwise exact in {elapsed:.0f} s")
    assert in_saves >= 3, "too few kills landed inside a save to test it"
