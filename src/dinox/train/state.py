"""The checkpoint schema: every stateful component of a run, packed and unpacked here only.

A checkpoint (format "dinox-checkpoint", version `CHECKPOINT_FORMAT_VERSION`) holds:

    step, schedules            the optimizer step and the schedule values at it
    student, teacher,          the three networks' state dicts, the Gram snapshot's step
      gram_teacher, gram_snapshot_step
    dino_loss, ibot_loss       the DINO centre; the iBOT centre (None without iBOT)
    optimizer, scaler          AdamW moments; the fp16 loss scale (None when unused)
    rng, aug_generator         Python/NumPy/torch/accelerator RNGs and the augmentation generator
    data                       the position in the data order (per rank and global)
    anomaly                    the anomaly guard's history
    config                     the flat run configuration (`RunConfig.to_flat`)
    model                      {"arch": the shape fields}
    provenance, hardware       where and from what the run was made

Everything is a tensor or a plain Python value, so it loads with weights_only=True.
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
from dinox.run.rng import capture_rng_state, restore_rng_state
from dinox.train.optim import Schedules
from dinox.train.ssl import DINOSSL

log = logging.getLogger("dinox.train")

AUGMENT_GENERATOR = "augment"


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


def pack(c: Components, cfg: RunConfig, where: Placement, *, provenance: dict, hardware: dict) -> dict:
    """The checkpoint dict of the run's current state."""
    step = c.progress.step
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "step": step,
        "student": c.ssl.student.state_dict(),
        "teacher": c.ssl.teacher.state_dict(),
        "gram_teacher": c.ssl.gram_teacher.state_dict(),
        "gram_snapshot_step": c.ssl.gram_snapshot_step,
        "dino_loss": c.ssl.dino_loss.state_dict(),
        "ibot_loss": c.ssl.ibot_loss.state_dict() if c.ssl.ibot_loss is not None else None,
        "optimizer": c.optimizer.state_dict(),
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
        "anomaly": c.guard.state_dict(),
        "config": cfg.to_flat(),
        "model": {"arch": cfg.shape()},
        "provenance": provenance,
        "hardware": hardware,
    }


def unpack(state: dict, c: Components, cfg: RunConfig, where: Placement) -> None:
    """Restore every component from a checkpoint dict (format checked)."""
    check_checkpoint_format(state)
    c.ssl.student.load_state_dict(state["student"])
    c.ssl.teacher.load_state_dict(state["teacher"])
    c.ssl.gram_teacher.load_state_dict(state["gram_teacher"])
    c.ssl.gram_snapshot_step = int(state.get("gram_snapshot_step", 0))
    c.ssl.dino_loss.load_state_dict(state["dino_loss"])
    if c.ssl.ibot_loss is not None:
        c.ssl.ibot_loss.load_state_dict(state["ibot_loss"])
    c.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and c.scaler.is_enabled():
        c.scaler.load_state_dict(state["scaler"])
    c.aug_generator.set_state(state["aug_generator"])
    restore_rng_state(state["rng"], where.device)
    c.guard.load_state_dict(state.get("anomaly", {}))
    c.progress.step = int(state["step"])
    data = state["data"]
    saved_world = int(data.get("world_size", 1))
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
    """Writes the run's checkpoints into its folder (rank 0 only): periodic ones rotated,
    emergency and final ones kept."""

    def __init__(self, run_dir: Path, cfg: RunConfig, where: Placement, *, provenance: dict, hardware: dict,
                 is_main: bool):
        self.run_dir, self.cfg, self.where = run_dir, cfg, where
        self.provenance, self.hardware, self.is_main = provenance, hardware, is_main

    def save(self, c: Components, kind: str = "periodic") -> Path | None:
        """Save a checkpoint of kind periodic / emergency; returns its path (None off rank 0)."""
        if not self.is_main:
            return None
        path = store.checkpoint_path(self.run_dir, c.progress.step, kind)
        start = time.perf_counter()
        size = store.save_checkpoint(path, pack(c, self.cfg, self.where, provenance=self.provenance,
                                                hardware=self.hardware))
        log.info("saved %s (%.1f MB, %.2fs)", path, size / 1e6, time.perf_counter() - start)
        if kind == "periodic":
            io = self.cfg.io
            for old in store.rotate_checkpoints(self.run_dir, io.ckpt_keep_last, io.ckpt_milestone_every):
                log.info("rotated out %s", old.name)
        return path

    def save_final(self, c: Components) -> Path | None:
        """A periodic checkpoint of the last step, linked as checkpoint_final_*."""
        path = self.save(c, "periodic")
        if path is None:
            return None
        final = store.checkpoint_path(self.run_dir, c.progress.step, "final")
        store.link_or_copy(path, final)
        log.info("final checkpoint %s", final)
        return final
