"""The checkpoint schema: every stateful component of a run, packed and unpacked here only.

A checkpoint (format "dinox-checkpoint", version `CHECKPOINT_FORMAT_VERSION`) holds:

    step, schedules            the optimizer step and the schedule values at it
    student, teacher,          the three networks' state dicts, the Gram snapshot's step
      gram_teacher, gram_snapshot_step
    dino_loss, ibot_loss       the DINO centre; the iBOT centre (None without iBOT)
    optimizer, scaler          AdamW moments; the fp16 loss scale (None when unused)
    rng, aug_generator         Python/NumPy/torch/accelerator RNGs and the augmentation generator
    data                       the position in the data order (per rank and global)
    ranks                      every rank's RNGs, generator and data position (list by rank), so
                               that a multi-process run resumes exactly on the same world size
    anomaly                    the anomaly guard's history
    config                     the flat run configuration (`RunConfig.to_flat`)
    model                      {"arch": the shape fields}
    provenance, hardware       where and from what the run was made

Everything is a tensor or a plain Python value, so it loads with weights_only=True.

A run sharded with FSDP2 saves the same content as a DCP directory (`dinox.run.sharded`):
`SHARDED_ENTRIES` through DCP, each rank writing its shards (AdamW's state keyed by
parameter name, as `get_optimizer_state_dict` gives it), the rest in its meta file. Either
format resumes into either kind of run: DCP reshards a directory onto any number of ranks
(or whole tensors in one process), and a single file is distributed to the shards.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dinox.config import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, RunConfig, check_checkpoint_format
from dinox.observe.anomaly import AnomalyGuard
from dinox.run import checkpoint as store
from dinox.run.distributed import barrier, broadcast_object, gather_object
from dinox.run.rng import capture_rng_state, restore_rng_state
from dinox.run.torch_file import first_line
from dinox.train.optim import Schedules
from dinox.train.ssl import DINOSSL

log = logging.getLogger("dinox.train")

AUGMENT_GENERATOR = "augment"
# The entries a sharded checkpoint writes through DCP.
SHARDED_ENTRIES = ("student", "teacher", "gram_teacher", "optimizer", "dino_loss", "ibot_loss")


@dataclass
class Progress:
    """Where the run is: optimizer steps done and samples consumed by this rank."""

    step: int = 0
    consumed: int = 0


@dataclass
class Components:
    """Every stateful piece of a run, as the checkpoint sees it."""

    progress: Progress
    ssl: DINOSSL
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    aug_generator: torch.Generator
    guard: AnomalyGuard


@dataclass(frozen=True)
class Placement:
    """This process's place in the run: needed to pack and to remap the data position."""

    rank: int
    world_size: int
    device: torch.device
    samples: int  # training samples in the dataset (for the epoch count)


def rank_state(c: Components, where: Placement) -> dict:
    """What differs between ranks: RNG streams, the augmentation generator, the data position."""
    return {"rank": where.rank, "rng": capture_rng_state(where.device), "aug_generator": c.aug_generator.get_state(),
            "consumed": c.progress.consumed}


def _networks(c: Components, *, by_name: bool) -> dict:
    """The state dicts of the networks, centres and optimizer (`by_name`: AdamW keyed by
    parameter name, as DCP needs to reshard it)."""
    ssl = c.ssl
    if by_name:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        nets = {name: get_model_state_dict(getattr(ssl, name)) for name in ("student", "teacher", "gram_teacher")}
        optimizer = get_optimizer_state_dict(ssl.student, c.optimizer)
    else:
        nets = {name: getattr(ssl, name).state_dict() for name in ("student", "teacher", "gram_teacher")}
        optimizer = c.optimizer.state_dict()
    return {**nets, "optimizer": optimizer, "dino_loss": ssl.dino_loss.state_dict(),
            "ibot_loss": ssl.ibot_loss.state_dict() if ssl.ibot_loss is not None else None}


def pack(c: Components, cfg: RunConfig, where: Placement, *, provenance: dict, hardware: dict,
         ranks: list | None = None, sharded: bool = False) -> dict:
    """The checkpoint dict of the run's current state (`ranks`: every rank's `rank_state`)."""
    step = c.progress.step
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "step": step,
        **_networks(c, by_name=sharded),
        "gram_snapshot_step": c.ssl.gram_snapshot_step,
        "scaler": c.scaler.state_dict() if c.scaler.is_enabled() else None,
        "schedules": {"step": step, **Schedules.from_config(cfg).at(step)},
        "rng": capture_rng_state(where.device),
        "aug_generator": c.aug_generator.get_state(),
        "data": {
            "consumed": c.progress.consumed,
            "consumed_global": c.progress.consumed * where.world_size,
            "seed": cfg.runtime.seed,
            "rank": where.rank,
            "world_size": where.world_size,
            "epoch": c.progress.consumed // max(1, where.samples // where.world_size),
        },
        "ranks": ranks or [],
        "anomaly": c.guard.state_dict(),
        "config": cfg.to_flat(),
        "model": {"arch": cfg.shape()},
        "provenance": provenance,
        "hardware": hardware,
    }


def _by_name(optimizer_state: dict, c: Components) -> dict:
    """A torch optimizer state dict (parameters by position) keyed by parameter name instead."""
    names = {id(p): n for n, p in c.ssl.student.named_parameters()}
    order = [names[id(p)] for group in c.optimizer.param_groups for p in group["params"]]
    saved = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    fqn = dict(zip(saved, order))
    return {"state": {fqn[i]: v for i, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}


def _load_networks(state: dict, c: Components) -> None:
    """The networks, centres and AdamW state from a file's dict or a DCP directory, into
    plain or FSDP2-sharded modules."""
    ssl, nets = c.ssl, ("student", "teacher", "gram_teacher")
    sharded_source = "student" not in state and state.get("sharded_path")
    if not ssl.sharded and not sharded_source:
        for name in nets:
            store.load_network(getattr(ssl, name), state[name], None, name)
        try:
            c.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:   # torch says it in a traceback
            raise store.CheckpointError(f"its optimizer state does not fit its student network ({first_line(exc)}); "
                                        f"use another checkpoint of the run") from None
        entries = state
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if sharded_source:
            entries = _networks(c, by_name=True)
            entries = {k: v for k, v in entries.items() if v is not None}
            store.load_sharded_into(state["sharded_path"], entries)
            options = StateDictOptions()
        else:  # a single file into shards
            entries = {**state, "optimizer": _by_name(state["optimizer"], c)}
            options = StateDictOptions(full_state_dict=True)
        for name in nets:
            set_model_state_dict(getattr(ssl, name), entries[name], options=options)
        set_optimizer_state_dict(ssl.student, c.optimizer, entries["optimizer"], options=options)
    ssl.dino_loss.load_state_dict(entries["dino_loss"])
    if ssl.ibot_loss is not None:
        ssl.ibot_loss.load_state_dict(entries["ibot_loss"])


def unpack(state: dict, c: Components, cfg: RunConfig, where: Placement) -> None:
    """Restore every component from a checkpoint dict (format checked)."""
    check_checkpoint_format(state)
    _load_networks(state, c)
    c.ssl.gram_snapshot_step = int(state.get("gram_snapshot_step", 0))
    c.ssl.gram_is_teacher = False  # loaded separately; the loop's next refresh decides
    if state.get("scaler") and c.scaler.is_enabled():
        c.scaler.load_state_dict(state["scaler"])
    c.guard.load_state_dict(state.get("anomaly", {}))
    c.progress.step = int(state["step"])
    data = state["data"]
    saved_world = int(data.get("world_size", 1))
    ranks = state.get("ranks") or []
    own = ranks[where.rank] if saved_world == where.world_size and len(ranks) == where.world_size else state
    c.aug_generator.set_state(own["aug_generator"])
    restore_rng_state(own["rng"], where.device)
    if own is not state:  # every rank continues its own streams: bitwise
        c.progress.consumed = int(own["consumed"])
        return
    if saved_world == where.world_size:
        c.progress.consumed = int(data["consumed"])
    else:
        c.progress.consumed = int(data.get("consumed_global", data["consumed"])) // where.world_size
        log.warning("the number of processes changed (%s -> %d): the data order continues from the same "
                    "global position, the run is not bitwise reproducible across this change",
                    saved_world, where.world_size)
    if where.world_size > 1:
        # Only rank 0's RNG states are in the checkpoint: give every rank its own stream.
        seed = cfg.runtime.seed
        torch.manual_seed(seed * 1_000_003 + c.progress.step * 101 + where.rank)
        c.aug_generator.manual_seed(seed * 7919 + c.progress.step * 101 + where.rank)


def capture_step(c: Components, device: torch.device) -> tuple:
    """What a step changes before its update, to undo a step that is not applied (NaN), so
    that the emergency checkpoint is exactly the state before the bad step."""
    return c.progress.consumed, capture_rng_state(device, {AUGMENT_GENERATOR: c.aug_generator})


def restore_step(c: Components, snapshot: tuple, device: torch.device) -> None:
    consumed, rng = snapshot
    c.progress.consumed = consumed
    restore_rng_state(rng, device, {AUGMENT_GENERATOR: c.aug_generator})


class Checkpointer:
    """Writes the run's checkpoints into its folder (rank 0 only): periodic and emergency ones
    rotated (each kind its newest kept), final ones kept."""

    def __init__(self, run_dir: Path, cfg: RunConfig, where: Placement, *, provenance: dict, hardware: dict,
                 is_main: bool, sharded: bool = False):
        self.run_dir, self.cfg, self.where = run_dir, cfg, where
        self.provenance, self.hardware, self.is_main, self.sharded = provenance, hardware, is_main, sharded

    def _save_making_room(self, path: Path, state: dict) -> int:
        """Save; where the disk has filled since the start (another process), rotate out the
        oldest kept periodic checkpoint early and try once more, rather than stop the run (an
        intact newer one is always kept). The run's log says so."""
        try:
            return store.save_checkpoint(path, state)
        except store.NoSpaceError as exc:
            if not self._rotate_early(exc):
                raise
            return store.save_checkpoint(path, state)

    def _rotate_early(self, exc: Exception) -> list[Path]:
        """Rotate out the oldest kept periodic checkpoint before its time (where two or more
        are kept); returns what was deleted, said in the run's log."""
        io = self.cfg.io
        freed = (store.rotate_checkpoints(self.run_dir, io.ckpt_keep_last - 1, io.ckpt_milestone_every)
                 if io.ckpt_keep_last >= 2 else [])
        if freed:
            log.warning("%s; rotated out %s early to make room (free space, or lower --ckpt-keep-last)", exc,
                        ", ".join(p.name for p in freed))
        return freed

    def save(self, c: Components, kind: str = "periodic") -> Path | None:
        """Save a checkpoint of kind periodic / emergency; returns its path (None off rank 0).
        Every rank calls it (their RNG states are gathered; sharded, each writes its shards)."""
        ranks = gather_object(rank_state(c, self.where))
        if not self.is_main and not self.sharded:
            return None
        path = store.checkpoint_path(self.run_dir, c.progress.step, kind, sharded=self.sharded)
        start = time.perf_counter()
        state = pack(c, self.cfg, self.where, provenance=self.provenance, hardware=self.hardware, ranks=ranks,
                     sharded=self.sharded)
        if self.sharded:
            tensors = {k: state.pop(k) for k in SHARDED_ENTRIES if state.get(k) is not None}
            state.pop("ibot_loss", None)
            size = store.save_sharded_checkpoint(path, tensors, state, rank=self.where.rank, gather=gather_object,
                                                 barrier=barrier, broadcast=broadcast_object,
                                                 make_room=self._rotate_early)
            if not self.is_main:
                return None
        else:
            size = self._save_making_room(path, state)
        log.info("saved %s (%.1f MB, %.2fs)", path, size / 1e6, time.perf_counter() - start)
        io = self.cfg.io
        if kind == "periodic":
            for old in store.rotate_checkpoints(self.run_dir, io.ckpt_keep_last, io.ckpt_milestone_every):
                log.info("rotated out %s", old.name)
        elif kind == "emergency" and io.ckpt_keep_emergency > 0:
            # each is a whole checkpoint (20.5 GB for a ViT-Giant), one per anomaly episode or halt:
            # over weeks of requeued launches, kept all, they would fill the disk
            for old in store.rotate_checkpoints(self.run_dir, io.ckpt_keep_emergency, kind="emergency"):
                log.info("rotated out %s (--ckpt-keep-emergency %d keeps the newest)", old.name,
                         io.ckpt_keep_emergency)
        return path

    def save_final(self, c: Components) -> Path | None:
        """A periodic checkpoint of the last step, linked as checkpoint_final_*."""
        path = self.save(c, "periodic")
        if path is None:
            return None
        final = store.checkpoint_path(self.run_dir, c.progress.step, "final", sharded=self.sharded)
        store.link_or_copy(path, final)
        log.info("final checkpoint %s", final)
        return final
