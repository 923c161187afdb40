"""An ordered map over worker processes, shared by `dinox synth` and `dinox prep`.

Both turn independent series into files, one series per task; the work is numpy and
file I/O, so processes (not threads) are what use more than one core.
"""
from __future__ import annotations

import os
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
            try:
                with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
                    for result in pool.map(fn, items, chunksize=chunksize):
                        yield result
                        bar.update()
            except BrokenProcessPool:
                # the system kills a worker without a Python error, most often for lack of memory
                raise UserError(f"{desc}: a worker process was killed (most often for lack of memory); run again "
                                f"with fewer --workers") from None
    finally:
        bar.close()
