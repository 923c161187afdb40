"""An ordered map over worker processes, shared by `dinox synth` and `dinox prep`.

Both turn independent series into files, one series per task; the work is numpy and
file I/O, so processes (not threads) are what use more than one core.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from dinox.errors import UserError
from dinox.run.signals import end_with_parent, leave_stop_signals_to_parent

# the default of `--workers` (synth, prep): the cores, at most 4 (both are also disk-bound)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _start_worker() -> None:
    leave_stop_signals_to_parent()
    end_with_parent()   # a parent killed outright leaves no worker behind


def process_map(fn, items, workers: int, desc: str, progress: bool, *, unit: str = "series", chunksize: int = 1):
    """Yield fn(item) for each item, in order: inline for one worker (or one item), else over
    a pool of `workers` processes (fn must be picklable: a module-level function or an
    instance of a module-level class). Progress on stderr when `progress` (`Progress`)."""
    items = list(items)
    bar = Progress(len(items), desc, unit, progress)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update()
        else:
            # Ctrl-C (and a closed terminal's hangup) reaches the whole process group: a worker that
            # raised KeyboardInterrupt would print its own traceback, one caught holding the task
            # queue's lock could leave its parent waiting for ever, and one the hangup ended would
            # read as killed for lack of memory. The parent stops them instead (`_stop_workers`);
            # the handler a forked worker inherits (`signals.interrupts_raise`) would raise in it.
            pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), initializer=_start_worker)
            try:
                for result in pool.map(fn, items, chunksize=chunksize):
                    yield result
                    bar.update()
            except BrokenProcessPool:
                # the system kills a worker without a Python error, most often for lack of memory
                _stop_workers(pool)
                raise UserError(f"{desc}: a worker process was killed (most often for lack of memory); run again "
                                f"with fewer --workers") from None
            except BaseException:
                # interrupted (Ctrl-C, SIGTERM), or the caller stopped reading: stop the workers now
                # rather than wait for the series they hold, or leave them blocked on the task queue
                _stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


# Where stderr is no terminal, a progress line at most this often (seconds)
PLAIN_PROGRESS_S = 60.0


class Progress:
    """A tqdm bar on a terminal. Elsewhere (a log file under nohup or a scheduler) tqdm
    writes nothing, and a prep of LIDC-IDRI's 244k files showed no sign of life for its
    whole run: there, a plain line at most every PLAIN_PROGRESS_S, with the time left. Also
    the progress of `dinox eval`'s embedding passes."""

    def __init__(self, total: int, desc: str, unit: str, show: bool) -> None:
        tty = show and _isatty(sys.stderr)
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not tty, leave=False)
        self.plain = show and not tty
        self.total, self.desc, self.done = total, desc, 0
        self.units = unit if unit.endswith("s") else unit + "s"
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.plain and self.done < self.total and now - self.last >= PLAIN_PROGRESS_S:
            self.last = now
            left = (now - self.start) / self.done * (self.total - self.done)
            print(f"{self.desc}: {self.done} of {self.total} {self.units} ({100 * self.done // self.total} %), "
                  f"{_duration(now - self.start)} so far, about {_duration(left)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # replaced or closed
        return False


def _duration(seconds: float) -> str:
    minutes = round(seconds) // 60
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min {round(seconds) % 60:02d} s" if minutes else f"{round(seconds)} s"


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes (whatever they are doing: their writes are
    atomic, a temporary file at worst)."""
    terminate = getattr(pool, "terminate_workers", None)    # Python 3.14
    if terminate is not None:
        terminate()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            proc.terminate()
        except (OSError, ValueError):   # already gone, or closed
            pass
    # Before Python 3.11.5 (gh-94777) the shutdown that follows waits for ever on the task
    # queue's feeder thread, blocked writing to a full pipe that no worker reads any more
    # (prep's tasks are tens of KB each): closing the parent's read end lets that write fail.
    # From 3.11.5 on the pool's own thread closes it once it sees the workers gone; closed
    # here as well, the two closes raced (EBADF in that thread, or a descriptor number
    # reused meanwhile closed under another file).
    reader = getattr(getattr(pool, "_call_queue", None), "_reader", None)
    if reader is not None and sys.version_info < (3, 11, 5):
        try:
            reader.close()
        except OSError:
            pass
