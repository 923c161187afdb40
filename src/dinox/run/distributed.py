"""torchrun / DDP: one process per device, rank 0 writes files; every collective of dinox.

`torchrun --nproc_per_node=N -m dinox.cli train ...` (or the seed script) sets RANK,
WORLD_SIZE and LOCAL_RANK; without them the run is a single process. The module-level
functions are no-ops (identity) in a single process, so the losses call them unconditionally.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") over ranks; returns `t`."""
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (a picklable Python value)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device_type: str) -> None:
        if self.enabled and not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend="nccl", device_id=torch.device("cuda", self.local_rank))
            else:
                dist.init_process_group(backend="gloo")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.enabled and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any: keeps ranks stepping in lock-step when
        one of them sees a signal, a non-finite loss or an anomaly that halts."""
        if not self.enabled:
            return flag
        return bool(all_reduce_(torch.tensor([1.0 if flag else 0.0], device=device), "max").item())

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
