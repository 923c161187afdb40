"""A resumable, endless stream of training batches.

The order of samples is a pure function of (seed, epoch, rank), and the stream's position
is the number of samples this rank has consumed. Saving that one integer and rebuilding the
loader from it reproduces the exact same batches after a resume, with any number of
DataLoader workers (the dataset itself draws no random numbers; augmentation happens on the
training device from a generator saved in the checkpoint).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinox.errors import UserError
from dinox.run.signals import leave_stop_signals_to_parent

log = logging.getLogger("dinox.train")


class ResumableSampler(Sampler[int]):
    """Endless epochs of seeded permutations, sharded by rank, starting at `start`."""

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if size < world_size:
            raise ValueError(f"{size} samples cannot be shared among {world_size} ranks")
        self.size = size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.per_rank = size // world_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        return order[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order = self.epoch_order(epoch).tolist()
            yield from order[offset:]
            epoch, offset = epoch + 1, 0


def check_batch_fits(samples: int, batch_size: int, world_size: int = 1, root=None) -> None:
    """Refuse a per-device batch larger than a rank's share of the training samples: the
    endless stream would fill every batch with repeats of the same slices (and KoLeo would
    push a slice's copies apart), silently."""
    per_rank = samples // world_size
    if batch_size <= per_rank:
        return
    of = f" of {root}" if root is not None else ""
    if per_rank < 1:
        raise UserError(f"the {samples} training slices{of} cannot be shared among {world_size} ranks; "
                        f"launch at most {samples} processes, or prepare more series")
    share = f" per rank ({samples} over {world_size})" if world_size > 1 else ""
    raise UserError(f"--batch-size {batch_size} is more than the {per_rank} training slices{share}{of}: every batch "
                    f"would repeat slices; give --batch-size {per_rank} or less (with --accumulation-steps for a "
                    f"larger effective batch), or prepare more series")


def _worker_leaves_process_group(worker_id: int) -> None:
    """A stop signal sent to the whole process group (`timeout`, `kill -- -PGID`) would
    also kill the DataLoader workers, and the loader would then fail the main process
    mid-step, before it saves. In a group of its own a worker hears only its parent, which
    finishes the step, saves, and shuts it down (or terminates it at exit); a worker whose
    parent dies exits by itself (torch's worker watchdog). A scheduler that signals every
    process of the job (SLURM's `--signal=USR1@T`) still reaches it, and the trainer's handler,
    inherited through fork, would end the worker on a second signal: the worker ignores the
    warning signals, which are its parent's to act on. SIGTERM ends it, as it must: that is
    how its parent (multiprocessing's `terminate`) stops a worker that does not exit."""
    os.setpgrp()
    leave_stop_signals_to_parent()


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    consumed: int,
    num_workers: int,
    pin_memory: bool,
    collate_fn,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    sampler = ResumableSampler(len(dataset), seed, start=consumed, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_leaves_process_group if num_workers > 0 else None,
        # Its own generator: starting an iterator draws the workers' base seed from it, and
        # drawing from the global torch RNG instead would shift drop path on a resumed run.
        generator=torch.Generator().manual_seed(seed * 7 + rank),
    )


def stop_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes now. Left to the garbage collector (a
    frame of the loop can outlive it through a traceback that a library keeps), the iterator's
    queues may be finalised before it, so its stop message never reaches the workers and the
    exit waits out the join timeout, 5 s per worker."""
    shutdown = getattr(batches, "_shutdown_workers", None)   # a single-process iterator has none
    if shutdown is not None:
        shutdown()


def validation_dataset(cfg, train_dataset):
    """The validation split for in-training eval and monitoring (None when neither runs);
    the training split when there is none, since an empty validation split must not stop
    a run."""
    from dinox.data.dataset import CTSliceDataset

    watch, io = cfg.watch, cfg.io
    if not (watch.eval_every or watch.monitor_every):
        return None
    try:
        return CTSliceDataset(io.data_root, "val", io.split_manifest, io.index_csv, context_mm=cfg.views.context_mm)
    except Exception as exc:  # noqa: BLE001
        log.warning("no validation data for monitoring/eval (%s); using the training split", exc)
        return train_dataset
