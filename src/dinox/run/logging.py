"""Log set-up of a run: the console on every rank (warnings only off rank 0, each line
naming its rank), train.log in the run folder on rank 0."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def rank_prefix() -> str:
    """The console prefix "[rank N] " off rank 0 of a torchrun launch (RANK, WORLD_SIZE), else
    "": every rank prints its warnings and errors, and a line that one rank alone meets must
    say which."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return ""
    return f"[rank {rank}] " if world > 1 and rank > 0 else ""


def setup_logging(run_dir: Path | None = None, is_main: bool = True) -> None:
    logger = logging.getLogger("dinox")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in list(logger.handlers):
        if getattr(h, "_dinox_console", False) or (run_dir is not None and getattr(h, "_dinox_file", False)):
            logger.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(rank_prefix() + _FORMAT, "%H:%M:%S"))
    handler._dinox_console = True
    logger.addHandler(handler)
    if run_dir is not None and is_main:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler._dinox_file = True
        logger.addHandler(file_handler)
    logger.propagate = False


def console(text: str) -> None:
    """A line of the run's progress on stdout, as printed (no time stamp), and in train.log
    (as a log line), which keeps the run's whole record: progress, evaluations, the end. A
    terminal or pipe that went away (a closed ssh session gives EIO; Ctrl+C on `dinox train |
    tee log` ends the reader: EPIPE) must not end the run between its last step and the
    checkpoint a stop signal promises: from then on the console is left alone and the lines
    go to train.log only."""
    logger = logging.getLogger("dinox")
    if not any(getattr(h, "_dinox_console", False) for h in logger.handlers) and logger.handlers:
        logger.info(text)
        return
    files = [h for h in logger.handlers if getattr(h, "_dinox_file", False)]
    filed = bool(files) and logger.isEnabledFor(logging.INFO)
    if filed:
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, text, None, None)
        for handler in files:
            handler.handle(record)
    try:
        print(text, flush=True)
    except OSError as exc:
        for h in list(logger.handlers):
            if getattr(h, "_dinox_console", False):
                logger.removeHandler(h)
        logger.warning("the console went away (%s); the run goes on, logging to train.log only", exc.strerror or exc)
        if not filed:
            logger.info(text)


def close_file_logging() -> None:
    logger = logging.getLogger("dinox")
    for h in list(logger.handlers):
        if getattr(h, "_dinox_file", False):
            logger.removeHandler(h)
            h.close()
