"""An ordered map over worker processes, shared by `dinox synth` and `dinox prep`.

Both turn independent series into files, one series per task; the work is numpy and
file I/O, so processes (not threads) are what use more than one core.
"""
from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from dinox.errors import UserError

# the default of `--workers` (synth, prep): the cores, at most 4 (both are also disk-bound)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def process_map(fn, items, workers: int, desc: str, progress: bool, *, unit: str = "series", chunksize: int = 1):
    """Yield fn(item) for each item, in order: inline for one worker (or one item), else over
    a pool of `workers` processes (fn must be picklable: a module-level function or an
    instance of a module-level class). A tqdm bar on stderr when `progress`."""
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit=unit, file=sys.stderr, disable=None if progress else True,
               leave=False)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update()
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), initializer=_leave_ctrl_c_to_parent)
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


def _leave_ctrl_c_to_parent() -> None:
    """In each worker: ignore SIGINT, and let SIGTERM end it. Ctrl-C reaches the whole
    process group; a worker that raised KeyboardInterrupt would print its own traceback, and
    one caught holding the task queue's lock could leave its parent waiting on it forever.
    The parent stops the workers (`_stop_workers`, with SIGTERM); the handler a forked worker
    inherits from its parent (`signals.interrupts_raise`) would instead raise in it too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
