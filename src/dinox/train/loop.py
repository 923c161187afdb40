"""The training loop: the cadence of a run, and nothing of the method itself.

One "step" is one optimizer step everywhere (checkpoint names, --max-steps, schedules,
logs); each step runs `accumulation_steps` micro-batches through `DINOSSL.forward_backward`.
A step synchronises the host with the device once: the step's metrics, its finiteness and
the stop request travel in one tensor (all-reduced under DDP, so every rank takes the same
decisions from the same numbers).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from dinox.config import RunConfig
from dinox.data.augment import CTAugment
from dinox.data.dataset import CTSliceDataset, DataChanged, pad_collate
from dinox.errors import UserError
from dinox.observe.anomaly import NONFINITE_CHANGES, build_guard, nonfinite_diagnostics, respond
from dinox.observe.health import MemoryWatch, device_memory_metrics
from dinox.observe.metrics import MetricsLogger, MetricsUnwritable, Throughput, format_progress, run_header
from dinox.run.device import DeviceInfo
from dinox.run.distributed import DistEnv, all_reduce_
from dinox.run.logging import console
from dinox.run.rng import seed_all
from dinox.run.signals import EXIT_ANOMALY, EXIT_NONFINITE, StopRequest
from dinox.train.checks import InTrainingChecks
from dinox.train.data_stream import check_batch_fits, make_loader, stop_workers, validation_dataset
from dinox.train.optim import (Schedules, apply_schedule, autocast, autocast_dtype, autocast_notice, build_optimizer,
                               build_scaler, clip_gradients)
from dinox.train.runs import record_nonfinite_halt
from dinox.train.ssl import METRIC_NAMES, DINOSSL
from dinox.train.state import Checkpointer, Components, Placement, Progress, capture_step, restore_step, unpack

log = logging.getLogger("dinox.train")


@dataclass
class StepResult:
    metrics: dict[str, float]
    finite: bool
    stop_requested: bool = False
    batch: torch.Tensor | None = None  # the inputs of a non-finite step, for the diagnostics


class Trainer:
    batches = None   # the DataLoader iterator of the running loop
    def __init__(self, cfg: RunConfig, device_info: DeviceInfo, run_dir: Path, provenance: dict, dist: DistEnv,
                 resume_state: dict | None = None):
        self.cfg, self.device_info, self.run_dir, self.provenance, self.dist = cfg, device_info, run_dir, provenance, dist
        self.device, self.stop = torch.device(device_info.torch_device), StopRequest()
        seed, io = cfg.runtime.seed, cfg.io

        seed_all(seed)  # the same initial weights on every rank
        self.dataset = CTSliceDataset(io.data_root, "train", io.split_manifest, io.index_csv,
                                      context_mm=cfg.views.context_mm)
        check_batch_fits(len(self.dataset), cfg.optim.batch_size, dist.world_size, io.data_root)
        self.val_dataset = validation_dataset(cfg, self.dataset)
        self.ssl = DINOSSL(cfg, self.device, initialise=resume_state is None)
        report = self.ssl.init_report or (resume_state or {}).get("provenance", {}).get("init_from")
        if report is not None:  # the weights' origin stays on record through resumes
            provenance["init_from"] = report
        torch.manual_seed(seed + dist.rank)  # drop path differs per rank
        self.schedules = Schedules.from_config(cfg)
        self.augment = CTAugment(cfg.views.to_augment())
        self.autocast_dtype = autocast_dtype(cfg.runtime.amp, self.device, device_info.bf16_supported)
        self._autocast = lambda: autocast(self.device, self.autocast_dtype)
        slow_amp = autocast_notice(cfg.runtime.amp, self.device, device_info.bf16_supported)
        if slow_amp and dist.is_main:
            log.warning(slow_amp)
        sharded = cfg.runtime.parallel == "fsdp" and dist.enabled
        self.sharding = self.ssl.shard(self.autocast_dtype) if sharded else None
        if cfg.runtime.compile:
            self.ssl.student.backbone.compile()  # in place: state_dict keys stay the same
        self.model = self.ssl.student if sharded else dist.wrap(self.ssl.student, self.device)
        self.ssl.student_call = self.model
        self.optimizer = build_optimizer(self.ssl.student, fused=device_info.fused_adamw)
        self.scaler = build_scaler(self.device, self.autocast_dtype)
        guard = build_guard(cfg, dist.world_size, self.dataset.thinnest_slices_mm())
        self.memory_watch = MemoryWatch.for_rank(device_info, dist, cfg.runtime)
        self.parts = Components(Progress(), self.ssl, self.optimizer, self.scaler,
                                torch.Generator().manual_seed(seed * 7919 + dist.rank), guard)
        self.where = Placement(dist.rank, dist.world_size, self.device, len(self.dataset))
        if resume_state is not None:
            unpack(resume_state, self.parts, cfg, self.where)
        self.checkpointer = Checkpointer(run_dir, cfg, self.where, provenance=provenance, is_main=dist.is_main,
                                         hardware={**device_info.to_dict(), "preset": cfg.runtime.hardware_preset},
                                         sharded=sharded)
        self.checks = InTrainingChecks(self)
        self.metrics = MetricsLogger(run_dir, tensorboard=True, is_main=dist.is_main)
        if resume_state is not None and dist.is_main:
            logged_every = max(int(resume_state.get("config", {}).get("log_every") or 1), cfg.watch.log_every)
            self.metrics.truncate_after(self.progress.step, logged_every)

    progress = property(lambda self: self.parts.progress, doc="Steps done and samples consumed.")

    def save(self, kind: str = "periodic") -> Path | None:
        with self.stop.writing():
            return self.checkpointer.save(self.parts, kind)

    # ---------------------------------------------------------------- one step
    def train_step(self, micro_batches, sched: dict[str, float]) -> StepResult:
        """One optimizer step over `accumulation_steps` micro-batches; a non-finite step is
        undone (no update, data position and RNG restored) and reported."""
        optim, ssl = self.cfg.optim, self.ssl
        accumulation = optim.accumulation_steps
        apply_schedule(self.optimizer, sched)
        before = capture_step(self.parts, self.device)
        sums, bad, inputs = None, torch.zeros((), dtype=torch.bool, device=self.device), []

        def backward(loss: torch.Tensor) -> None:
            self.scaler.scale(loss / accumulation).backward()

        try:  # a failure before the update (a dead loader worker, out of memory) leaves no trace
            for i in range(accumulation):
                stacks = next(micro_batches).to(self.device, non_blocking=True)
                views = self.augment(stacks, self.parts.aug_generator)
                masks = ssl.draw_masks(2 * stacks.shape[0], self.parts.aug_generator, self.device)
                sync = self.dist.no_sync(self.model) if i < accumulation - 1 else contextlib.nullcontext()
                with sync:
                    values = ssl.forward_backward(views, sched, autocast=self._autocast, backward=backward,
                                                  masks=masks, step=self.progress.step)
                self.progress.consumed += stacks.shape[0]
                inputs.append(stacks)
                bad |= ~torch.isfinite(values["loss"])
                vector = torch.stack([values[name].float() for name in METRIC_NAMES]) / accumulation
                sums = vector if sums is None else sums + vector
        except Exception:
            self._undo_step(before)
            raise

        if self.progress.step < optim.freeze_backbone_steps:
            ssl.freeze_backbone_grads()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients([p for p in ssl.student.parameters() if p.grad is not None], optim.clip_grad)
        if not self.scaler.is_enabled():  # with fp16 the scaler skips non-finite gradients itself
            bad |= ~torch.isfinite(grad_norm)
        stop = torch.tensor(float(self.stop.signum is not None), device=self.device)
        packed = torch.cat([sums, grad_norm.float().reshape(1), bad.float().reshape(1), stop.reshape(1)])
        if self.dist.enabled:
            packed = all_reduce_(packed)
            packed[: len(METRIC_NAMES) + 1] /= self.dist.world_size
        host = packed.tolist()  # the step's one host synchronisation
        metrics = dict(zip((*METRIC_NAMES, "grad_norm"), host))
        finite, stop_requested = host[-2] == 0.0, host[-1] > 0.0
        if not finite:
            self._undo_step(before)
            return StepResult({**metrics, "lr": sched["lr"]}, False, stop_requested, torch.cat(inputs))
        if self.progress.step < optim.freeze_last_layer_steps:
            ssl.cancel_last_layer_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ssl.finish_step(sched["teacher_momentum"])
        return StepResult({**metrics, **sched}, True, stop_requested)

    def _undo_step(self, before: tuple) -> None:
        """Leave no trace of a step not applied: gradients, centres, data position, augmentation RNG."""
        self.optimizer.zero_grad(set_to_none=True)
        self.ssl.abandon_step()
        restore_step(self.parts, before, self.device)

    # ---------------------------------------------------------------- the loop
    def log_header(self) -> None:
        for line in run_header(self.cfg, world_size=self.dist.world_size, samples=len(self.dataset),
                               params=self.ssl.parameter_counts(), autocast_dtype=self.autocast_dtype,
                               sharding=self.sharding):
            log.info(line)
        log.info(self.dataset.stack_summary())
        log.info("run directory: %s", self.run_dir)

    def release(self) -> None:
        """Drop the DDP wrapper while the process group lives (its reducer could hang the exit)."""
        self.dist.barrier()
        self.model = self.ssl.student_call = None
        gc.collect()

    def run(self) -> int:
        self.log_header()
        self.stop.install()
        try:
            return self._run()
        finally:
            self.stop.uninstall()
            stop_workers(self.batches)
            self.metrics.close()

    def _run(self) -> int:
        cfg, o, w, dist = self.cfg, self.cfg.optim, self.cfg.watch, self.dist
        loader = make_loader(self.dataset, batch_size=o.batch_size, seed=cfg.runtime.seed,
                             consumed=self.progress.consumed, num_workers=cfg.runtime.num_workers,
                             pin_memory=cfg.runtime.pin_memory and self.device.type == "cuda",
                             collate_fn=pad_collate, rank=dist.rank, world_size=dist.world_size)
        micro_batches = self.batches = iter(loader)
        start = last_line = time.perf_counter()
        last_line -= w.log_interval
        throughput = Throughput(start, cfg.effective_batch * dist.world_size)
        first_step = self.progress.step
        if self.progress.step == 0:
            self.checks.run(0, start=True)

        while o.max_steps is None or self.progress.step < o.max_steps:
            sched = self.schedules.at(self.progress.step)
            self.ssl.maybe_refresh_gram_teacher(self.progress.step)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                result = self.train_step(micro_batches, sched)
            except DataChanged as exc:
                self._halt_data_changed(exc)
            except Exception as exc:
                if isinstance(exc, UserError):
                    raise
                log.error("step %d failed", self.progress.step + 1, exc_info=True)
                self._halt(f"{type(exc).__name__}: {(str(exc).strip() or '(no message)').splitlines()[-1]}")
            if not result.finite:
                return self._halt_nonfinite(result)
            self.progress.step += 1
            step, now = self.progress.step, time.perf_counter()
            metrics = {**result.metrics, **throughput.update(now, first_step_of_run=step - first_step <= 1),
                       "elapsed": now - start, **device_memory_metrics(self.device), **self.memory_watch.host_metrics()}
            if step % w.log_every == 0 or step == o.max_steps:
                try:
                    self.metrics.log(step, metrics)
                except MetricsUnwritable as exc:   # a full disk: save the work while there may be room
                    self._halt(str(exc))
            if dist.is_main and (step - first_step <= 3 or now - last_line >= w.log_interval
                                 or step == o.max_steps or result.stop_requested):
                console(format_progress(step, metrics, max_steps=o.max_steps))
                last_line = now
            if warning := self.memory_watch.check():   # any rank: each watches its own device
                log.warning(warning)
            guard = self.parts.guard
            anomalies = guard.check(step, metrics["loss"], emb_std=metrics["embedding_std"])
            anomalies += [a for a in [guard.check_entropy(step, metrics["Entropy_Teacher"])] if a is not None]
            wants_checkpoint, halt = respond(guard, anomalies, log, self.metrics)
            if wants_checkpoint or halt:
                self.save("emergency")
            try:  # a stop saves first: a scheduler's grace period may not cover an eval
                halt = halt or (not result.stop_requested and self.checks.run(step, throughput))
            except DataChanged as exc:
                self._halt_data_changed(exc)
            if halt:
                log.error("halting on anomaly (--halt-on-anomaly); resume with --resume auto%s", guard.summary())
                return EXIT_ANOMALY
            if o.max_steps is not None and step >= o.max_steps:
                break
            if step % cfg.io.ckpt_every == 0 or result.stop_requested:
                self.save("periodic")
            if result.stop_requested:
                log.info("stopped at step %d; continue with --resume auto%s", step, guard.summary())
                return self.stop.exit_code

        with self.stop.writing():
            final = self.checkpointer.save_final(self.parts)
        if dist.is_main:
            console(f"training finished at step {self.progress.step}; final checkpoint: {final}{self.parts.guard.summary()}")
        return self.stop.exit_code  # 0, or 130 for a Ctrl+C that came during the last step

    def _halt_data_changed(self, exc: DataChanged) -> NoReturn:
        """A volume changed under the run: stop with the dataset's reason (its message's last line)."""
        self._halt(str(exc).strip().splitlines()[-1].removeprefix(f"{DataChanged.__module__}.{DataChanged.__name__}: "))

    def _halt(self, reason: str) -> NoReturn:
        """A step that failed before its update: save the work so far (the step undone), stop with
        `reason` in one line (any traceback is in the log above). Not the first step (a checkpoint
        would hold the initial weights, a resume meet the same fault), nor under torchrun: the failing
        rank cannot save alone (the save gathers every rank); the last periodic checkpoint holds."""
        step, reason = self.progress.step, reason.rstrip(". ")   # "...: Killed." is followed by more
        if step == 0:
            raise UserError(f"the first step failed: {reason}; nothing was trained: fix it and run again") from None
        if self.dist.enabled:
            raise UserError(f"at step {step}: {reason}; then resume with --resume auto (from the last periodic "
                            f"checkpoint)") from None
        path = self.save("emergency")
        raise UserError(f"at step {step}: {reason}; the run's work up to step {step} is in {path}: then resume "
                        f"with --resume auto") from None

    def _halt_nonfinite(self, result: StepResult) -> int:
        """NaN/Inf loss: the bad update was never applied; save that state and stop."""
        step, guard = self.progress.step + 1, self.parts.guard
        if self.dist.is_main:
            log.critical(guard.nonfinite(step, result.metrics.get("loss", float("nan")), result.metrics.get("grad_norm")).message)
        if (path := self.save("emergency")) is None:  # off the main rank, which alone reports (with the path)
            return EXIT_NONFINITE
        record_nonfinite_halt(self.run_dir, path, step)
        console(nonfinite_diagnostics(last_good_loss=guard.last_good_loss, lr=result.metrics.get("lr"),
                                      grad_norm=result.metrics.get("grad_norm"), batch=result.batch))
        log.critical("non-finite loss or gradient at step %d: training halted; emergency checkpoint (state before the bad "
                     "update): %s; resume with a change (%s): --resume auto", step, path, NONFINITE_CHANGES)
        return EXIT_NONFINITE
