"""torchrun / DDP / FSDP2: one process per device, rank 0 writes files; every collective of dinox.

`torchrun --nproc_per_node=N -m dinox.cli train ...` (or the seed script) sets RANK,
WORLD_SIZE and LOCAL_RANK; without them the run is a single process. The module-level
functions are no-ops (identity) in a single process, so the losses call them unconditionally.

Two ways to use several processes: DDP (`DistEnv.wrap`) keeps a whole copy of every network
and AdamW state on each rank and all-reduces gradients; FSDP2 (`fully_shard_units`, PyTorch's
`fully_shard`) splits each parameter along its first dimension over the ranks, all-gathers a
unit (a transformer block, a head) just before it runs and frees it after, and
reduce-scatters the gradients, so each rank holds 1/N of the weights, gradients and moments.
"""
from __future__ import annotations

import contextlib
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dinox.errors import UserError
from dinox.run.signals import stop_when_orphaned


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") over ranks; returns `t`."""
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def gather_object(obj) -> list:
    """Every rank's `obj` as a list on rank 0 (`[obj]` in a single process; [] off rank 0)."""
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out if out is not None else []


def all_gather_object(obj) -> list:
    """Every rank's `obj` as a list on every rank (`[obj]` in a single process)."""
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if initialized():
        dist.barrier()


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (the tensor itself when not sharded)."""
    return t.to_local() if is_sharded(t) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly sharded or partial) tensor on every rank."""
    return t.full_tensor() if is_sharded(t) else t


def fully_shard_units(root: nn.Module, units: list[nn.Module], *, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: shard each of `units` (all-gathered one at a time while it runs), then `root`
    (its remaining parameters). With `param_dtype` the gathered parameters are cast to it
    and gradients reduced in fp32 (`MixedPrecisionPolicy`); the shards stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
              else MixedPrecisionPolicy())
    # The root's outputs are slices of the backbone's token tensor (class and patch tokens),
    # which FSDP2 warns about at every forward in case an in-place op on them drops its
    # pre-backward hook. No loss writes into them in place; tests/test_fsdp.py holds FSDP2's
    # gradients and updates equal to DDP's, which such a dropped hook would break.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                            category=UserWarning)
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    # The root too is resharded after its forward (FSDP2 keeps a root whole by default): a
    # teacher has no backward to reshard it, and its EMA update works on the shards.
    fully_shard(root, mp_policy=policy, reshard_after_forward=True)


@contextlib.contextmanager
def _gradient_sync_off(model: nn.Module):
    """FSDP2 between micro-batches: no reduce-scatter, and the gathered parameters kept for
    the next micro-batch instead of resharded and gathered again."""
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)


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

    @property
    def node_name(self) -> str | None:
        """This machine's host name where the run has several ranks (a line one node alone
        meets must say which), else None."""
        return socket.gethostname() if self.enabled else None

    @classmethod
    def from_environment(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device_type: str) -> None:
        if not self.enabled or dist.is_initialized():
            return
        try:
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend="nccl", device_id=torch.device("cuda", self.local_rank))
            else:
                dist.init_process_group(backend="gloo")
        except (dist.DistError, ValueError) as exc:   # ranks started by hand: a taken port, MASTER_ADDR unset
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"rank {self.rank} of {self.world_size} could not join the process group at {where} "
                            f"({reason}); start the ranks with torchrun, or give every rank the same free "
                            f"MASTER_ADDR and MASTER_PORT") from None
        if "TORCHELASTIC_RUN_ID" in os.environ:   # started by torchrun: stop when it is gone
            stop_when_orphaned()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module):
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
        micro-batch of a step: gradients accumulate locally and are reduced once."""
        if self.enabled and hasattr(model, "no_sync"):
            return model.no_sync()
        if self.enabled and hasattr(model, "set_requires_gradient_sync"):
            return _gradient_sync_off(model)
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
