"""The training step and loop: student/teacher DINO with KoLeo and Gram anchoring.

One "step" is one optimizer step everywhere (checkpoint names, --max-steps, schedules,
logs); each step runs `accumulation_steps` micro-batches.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinox.data.augment import AugmentConfig, CTAugment
from dinox.data.dataset import CTSliceDataset, pad_collate
from dinox.losses.dino import DINOLoss, entropy
from dinox.losses.gram import gram_anchoring_loss
from dinox.losses.koleo import KoLeoLoss
from dinox.model.dino_model import build_dino_model
from dinox.run import checkpoint as ckpt
from dinox.observe.anomaly import AnomalyGuard, nonfinite_diagnostics
from dinox.config import TrainConfig
from dinox.train.data_stream import make_loader
from dinox.run.distributed import DistEnv
from dinox.run.device import DeviceInfo, MemoryWatch
from dinox.observe.metrics import MetricsLogger, format_progress
from dinox.observe.heatmaps import device_memory_metrics
from dinox.train.schedules import Schedules

log = logging.getLogger("dinox.train")

EXIT_OK = 0
EXIT_NONFINITE = 4
EXIT_SIGINT = 130


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        global_size=cfg.img_size,
        local_size=cfg.local_size,
        n_local=cfg.local_crops,
        global_scale=(cfg.global_scale_min, 1.0),
        local_scale=(cfg.local_scale_min, cfg.local_scale_max),
        distinct_global_windows=cfg.distinct_windows,
        standardize=cfg.standardize_views,
    )


def schedules_from(cfg: TrainConfig) -> Schedules:
    return Schedules(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
        weight_decay_end=cfg.weight_decay_end,
        momentum=cfg.momentum,
        momentum_end=cfg.momentum_end,
        teacher_temp=cfg.teacher_temp,
        teacher_temp_start=cfg.teacher_temp_start,
        teacher_temp_warmup_steps=cfg.teacher_temp_warmup_steps,
        horizon=cfg.horizon,
    )


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "register_tokens")) or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
    ]


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second signal
    gets the default behaviour (immediate stop)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.uninstall()
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving a checkpoint", name)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_OK


@dataclass
class StepResult:
    metrics: dict[str, float]
    finite: bool
    batch: torch.Tensor | None = None


@dataclass
class TrainState:
    step: int = 0
    consumed: int = 0


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        device_info: DeviceInfo,
        run_dir: Path,
        provenance: dict,
        dist: DistEnv,
        resume_state: dict | None = None,
        notices: list[str] | None = None,
    ):
        self.cfg = cfg
        self.device_info = device_info
        self.device = torch.device(device_info.torch_device)
        self.run_dir = run_dir
        self.provenance = provenance
        self.dist = dist
        self.notices = notices or []
        self.stop = StopRequest()

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.dataset = CTSliceDataset(cfg.data_root, "train", cfg.split_manifest, cfg.index_csv)
        self.val_dataset = self._maybe_val_dataset()

        self.student = build_dino_model(cfg).to(self.device)
        self.teacher = build_dino_model(cfg, drop_path=0.0).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.gram_teacher = copy.deepcopy(self.teacher.backbone)
        for module in (self.teacher, self.gram_teacher):
            module.requires_grad_(False)
            module.eval()
        self.dino_loss = DINOLoss(cfg.out_dim, student_temp=cfg.student_temp, center_momentum=cfg.center_momentum).to(
            self.device
        )
        self.koleo = KoLeoLoss()
        torch.manual_seed(cfg.seed + dist.rank)  # drop path differs per rank
        self.schedules = schedules_from(cfg)
        self.augment = CTAugment(augment_config(cfg))
        self.aug_generator = torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank)

        if cfg.compile:
            self.student.backbone.compile()  # in place: state_dict keys stay the same
        self.model = dist.wrap(self.student, self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student),
            lr=0.0,
            betas=(0.9, 0.999),
            **({"fused": True} if device_info.fused_adamw else {}),
        )
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.autocast_dtype == torch.float16
        )
        self.guard = AnomalyGuard(
            spike_factor=cfg.spike_factor,
            std_threshold=cfg.collapse_std,
            halt_on_anomaly=cfg.halt_on_anomaly,
            collapse_grace_steps=max(cfg.warmup_steps, 100),
        )
        self.memory_watch = MemoryWatch(device_info, grad_checkpoint=cfg.grad_checkpoint, amp=cfg.amp)
        self.state = TrainState()
        self.last_good_loss: float | None = None
        self.last_grad_norm: float | None = None
        self.gram_snapshot_step = 0
        if resume_state is not None:
            self._load_state(resume_state)
        self.metrics = MetricsLogger(run_dir, tensorboard=True, is_main=dist.is_main)
        if resume_state is not None and dist.is_main:
            self.metrics.truncate_after(self.state.step)

    # ---------------------------------------------------------------- setup helpers
    def _maybe_val_dataset(self) -> CTSliceDataset | None:
        if not (self.cfg.eval_every or self.cfg.monitor_every):
            return None
        try:
            return CTSliceDataset(self.cfg.data_root, "val", self.cfg.split_manifest, self.cfg.index_csv)
        except Exception as exc:  # an empty validation split must not stop training
            log.warning("no validation data for monitoring/eval (%s); using the training split", exc)
            return self.dataset

    def _autocast_dtype(self) -> torch.dtype | None:
        if not self.cfg.amp:
            return None
        if self.device.type == "cpu":
            return torch.bfloat16
        if self.device_info.bf16_supported:
            return torch.bfloat16
        return torch.float16

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:

        return {
            "format": "dinox-checkpoint",
            "format_version": 1,
            "step": self.state.step,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "gram_teacher": self.gram_teacher.state_dict(),
            "gram_snapshot_step": self.gram_snapshot_step,
            "dino_loss": self.dino_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "schedules": {"step": self.state.step, **self.schedules.at(self.state.step)},
            "rng": ckpt.capture_rng_state(self.device),
            "aug_generator": self.aug_generator.get_state(),
            "data": {
                "consumed": self.state.consumed,
                "consumed_global": self.state.consumed * self.dist.world_size,
                "seed": self.cfg.seed,
                "rank": self.dist.rank,
                "world_size": self.dist.world_size,
                "epoch": self.state.consumed // max(1, len(self.dataset) // self.dist.world_size),
            },
            "anomaly": self.guard.state_dict(),
            "last_good_loss": self.last_good_loss,
            "config": self.cfg.to_dict(),
            "model": {"arch": {k: getattr(self.cfg, k) for k in TrainConfig.SHAPE_FIELDS}},
            "provenance": self.provenance,
            "hardware": {**self.device_info.to_dict(), "preset": self.cfg.hardware_preset},
        }

    def _load_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.gram_teacher.load_state_dict(state["gram_teacher"])
        self.gram_snapshot_step = int(state.get("gram_snapshot_step", 0))
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.aug_generator.set_state(state["aug_generator"])
        ckpt.restore_rng_state(state["rng"], self.device)
        self.guard.load_state_dict(state.get("anomaly", {}))
        self.last_good_loss = state.get("last_good_loss")
        self.state.step = int(state["step"])
        data = state["data"]
        if int(data.get("world_size", 1)) == self.dist.world_size:
            self.state.consumed = int(data["consumed"])
        else:
            self.state.consumed = int(data.get("consumed_global", data["consumed"])) // self.dist.world_size
            log.warning("the number of processes changed (%s -> %d): the data order continues from the same "
                        "global position, the run is not bitwise reproducible across this change",
                        data.get("world_size", 1), self.dist.world_size)
        if self.dist.world_size > 1:
            # Only rank 0's RNG states are in the checkpoint: give every rank its own stream.
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.state.step * 101 + self.dist.rank)
            self.aug_generator.manual_seed(self.cfg.seed * 7919 + self.state.step * 101 + self.dist.rank)

    def save(self, kind: str = "periodic") -> Path | None:
        """Save a checkpoint (rank 0 only); returns its path."""
        if not self.dist.is_main:
            return None
        path = ckpt.checkpoint_path(self.run_dir, self.state.step, kind)
        start = time.perf_counter()
        size = ckpt.save_checkpoint(path, self.state_dict())
        log.info("saved %s (%.1f MB, %.2fs)", path, size / 1e6, time.perf_counter() - start)
        if kind == "periodic":
            for old in ckpt.rotate_checkpoints(self.run_dir, self.cfg.ckpt_keep_last, self.cfg.ckpt_milestone_every):
                log.info("rotated out %s", old.name)
        return path

    def save_final(self) -> Path | None:
        path = self.save("periodic")
        if path is None:
            return None
        final = ckpt.checkpoint_path(self.run_dir, self.state.step, "final")
        ckpt.link_or_copy(path, final)
        log.info("final checkpoint %s", final)
        return final

    # ---------------------------------------------------------------- one step
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_step(self, stacks: torch.Tensor, sched: dict[str, float], accumulate: bool) -> StepResult:
        cfg = self.cfg
        stacks = stacks.to(self.device, non_blocking=True)
        views = self.augment(stacks, self.aug_generator)
        n_global = len(views.global_views)
        global_batch = torch.cat(views.global_views)
        local_batch = torch.cat(views.local_views) if views.local_views else None

        with torch.no_grad(), self._autocast():
            teacher_out = self.teacher(global_batch)
            gram_patches = self.gram_teacher(global_batch)["patches"]
        teacher_logits = teacher_out["logits"].float()
        teacher_probs = self.dino_loss.teacher_probs(teacher_logits, sched["teacher_temp"], method=cfg.centering)
        teacher_chunks = list(teacher_probs.chunk(n_global))

        sync_context = self.dist.no_sync(self.model) if accumulate else contextlib.nullcontext()
        with sync_context:
            with self._autocast():
                student_out = self.model(global_batch, local_batch)
            student_logits = list(student_out["logits"].float().chunk(n_global))
            if local_batch is not None:
                student_logits += list(student_out["local_logits"].float().chunk(len(views.local_views)))
            loss_dino = self.dino_loss(student_logits, teacher_chunks)
            student_cls = student_out["cls"].float().chunk(n_global)
            loss_koleo = sum(self.koleo(c) for c in student_cls) / n_global
            loss_gram = gram_anchoring_loss(student_out["patches"].float(), gram_patches.float())
            loss = loss_dino + cfg.koleo_weight * loss_koleo + cfg.gram_weight * loss_gram
            finite = not self.dist.any_true(not bool(torch.isfinite(loss)), self.device)
            if finite:
                self.scaler.scale(loss / cfg.accumulation_steps).backward()
        if finite and cfg.centering == "centering":
            self.dino_loss.update_center(teacher_logits)

        with torch.no_grad():
            t_cls = F.normalize(teacher_out["cls"].float(), dim=-1)
            student_probs = torch.softmax(student_logits[0] / cfg.student_temp, dim=-1)
            metrics = {
                "loss": float(loss.detach()),
                "loss_dino": float(loss_dino.detach()),
                "loss_koleo": float(loss_koleo.detach()),
                "loss_gram": float(loss_gram.detach()),
                "Entropy_Teacher": float(entropy(teacher_probs)),
                "Entropy_Student": float(entropy(student_probs)),
                "embedding_std": float(t_cls.std(dim=0).mean()),
            }
        return StepResult(metrics, finite, stacks if not finite else None)

    def optimizer_step(self, micro_batches, sched: dict[str, float]) -> StepResult:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"]
            if group.get("apply_wd"):
                group["weight_decay"] = sched["weight_decay"]
        sums: dict[str, float] = {}
        before = self._step_snapshot()
        for i in range(cfg.accumulation_steps):
            stacks = next(micro_batches)
            result = self.micro_step(stacks, sched, accumulate=i < cfg.accumulation_steps - 1)
            self.state.consumed += stacks.shape[0]
            if not result.finite:
                self.optimizer.zero_grad(set_to_none=True)
                self._restore_snapshot(before)
                result.metrics.update(lr=sched["lr"])
                return result
            for key, value in result.metrics.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.accumulation_steps

        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.student.parameters() if p.grad is not None]
        if cfg.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if self.state.step < cfg.freeze_last_layer_steps:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_teacher(sched["teacher_momentum"])
        sums.update(grad_norm=grad_norm, **sched)
        return StepResult(sums, True)

    def _step_snapshot(self) -> tuple:
        """What a step changes before its update: restored when the step is abandoned (NaN),
        so the emergency checkpoint is exactly the state before the bad step."""
        return (self.state.consumed, self.aug_generator.get_state(), ckpt.capture_rng_state(self.device),
                self.dino_loss.center.clone())

    def _restore_snapshot(self, snapshot: tuple) -> None:
        consumed, generator_state, rng_state, center = snapshot
        self.state.consumed = consumed
        self.aug_generator.set_state(generator_state)
        ckpt.restore_rng_state(rng_state, self.device)
        self.dino_loss.center.copy_(center)

    @torch.no_grad()
    def _update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student (Caron et al. 2021, eq. 2)."""
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    def _maybe_refresh_gram_teacher(self) -> None:
        """Gram teacher = frozen snapshot of the EMA teacher, refreshed every K steps (DINOv3)."""
        if self.state.step - self.gram_snapshot_step >= self.cfg.gram_refresh_every:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self.gram_snapshot_step = self.state.step

    # ---------------------------------------------------------------- the loop
    def log_header(self) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.student.backbone.parameters())
        head_params = sum(p.numel() for p in self.student.head.parameters())
        log.info(
            "model %s: patch %d dim %d depth %d heads %d mlp %d | backbone %.2fM + head %.2fM parameters",
            cfg.config, cfg.vit_patch, cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.vit_mlp,
            n_params / 1e6, head_params / 1e6,
        )
        log.info(
            "batch: per-device %d x accumulation %d x %d device(s) = effective %d | %d training samples",
            cfg.batch_size, cfg.accumulation_steps, self.dist.world_size,
            cfg.effective_batch * self.dist.world_size, len(self.dataset),
        )
        log.info(
            "steps: %s | lr %.2e -> %.2e, warm-up %d | views: 2 x %dpx global + %d x %dpx local | amp %s | grad checkpoint %s",
            cfg.max_steps if cfg.max_steps is not None else "until stopped",
            cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.img_size, cfg.local_crops, cfg.local_size,
            self.autocast_dtype or "off (fp32)", cfg.grad_checkpoint,
        )
        log.info("Gram anchoring: weight %.3g, Gram teacher refreshed every %d steps (always on)",
                 cfg.gram_weight, cfg.gram_refresh_every)
        log.info("run directory: %s", self.run_dir)

    def release(self) -> None:
        """Drop the DDP wrapper while the process group is still alive.

        Otherwise the wrapper's reducer can hold the last reference to the gloo group and
        destroy it at garbage collection with the GIL held, joining a worker thread that
        waits for the GIL: the rank hangs at exit (seen with torchrun on CPU)."""
        self.dist.barrier()
        self.model = None
        gc.collect()

    def run(self) -> int:
        self.log_header()
        self.stop.install()
        try:
            return self._run()
        finally:
            self.stop.uninstall()
            self.metrics.close()

    def _run(self) -> int:
        cfg = self.cfg
        loader = make_loader(
            self.dataset,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            consumed=self.state.consumed,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
            collate_fn=pad_collate,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        micro_batches = iter(loader)
        start_time = time.perf_counter()
        last_line = 0.0
        window_start, window_steps = start_time, 0
        steps_per_s = samples_per_s = 0.0
        first_step = self.state.step
        if cfg.eval_every and self.state.step == 0:
            self._evaluate()

        while cfg.max_steps is None or self.state.step < cfg.max_steps:
            sched = self.schedules.at(self.state.step)
            self._maybe_refresh_gram_teacher()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            result = self.optimizer_step(micro_batches, sched)
            if not result.finite:
                return self._halt_nonfinite(result)
            self.state.step += 1
            step = self.state.step
            window_steps += 1
            now = time.perf_counter()
            if now - window_start >= 1.0 or window_steps >= 50:
                steps_per_s = window_steps / (now - window_start)
                samples_per_s = steps_per_s * cfg.effective_batch * self.dist.world_size
                window_start, window_steps = now, 0
            elif step - first_step <= 1:
                steps_per_s = 1.0 / max(now - start_time, 1e-9)
                samples_per_s = steps_per_s * cfg.effective_batch * self.dist.world_size
            metrics = dict(result.metrics)
            metrics.update(steps_per_s=steps_per_s, samples_per_s=samples_per_s, elapsed=now - start_time)
            metrics.update(device_memory_metrics(self.device))
            self.last_good_loss = metrics["loss"]
            self.last_grad_norm = metrics["grad_norm"]

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self.metrics.log(step, metrics)
            if self.dist.is_main and (step - first_step <= 3 or now - last_line >= cfg.log_interval
                                      or step == cfg.max_steps or self.stop.signum is not None):
                print(format_progress(step, metrics), flush=True)
                last_line = now
            warning = self.memory_watch.check()
            if warning and self.dist.is_main:
                log.warning(warning)

            halt = saved_emergency = False
            for anomaly in self.guard.check(step, metrics["loss"], emb_std=metrics["embedding_std"]):
                log_fn = log.critical if anomaly.severity != "warning" else log.warning
                log_fn(anomaly.message)
                if anomaly.kind == "collapse":
                    self.save("emergency")
                    saved_emergency = True
                halt = halt or self.guard.should_halt(anomaly)
            if self.dist.any_true(halt, self.device):
                if not saved_emergency:
                    self.save("emergency")
                log.error("halting on anomaly (--halt-on-anomaly); resume with --resume auto")
                return 5

            if cfg.eval_every and step % cfg.eval_every == 0:
                self._guarded(self._evaluate)
            if cfg.monitor_every and step % cfg.monitor_every == 0:
                self._guarded(self._monitor, steps_per_s, samples_per_s)
            finished = cfg.max_steps is not None and step >= cfg.max_steps
            if finished:
                break
            periodic = step % cfg.ckpt_every == 0
            if periodic:
                self.save("periodic")
            if self.dist.any_true(self.stop.signum is not None, self.device):
                if not periodic:
                    self.save("periodic")
                log.info("stopped at step %d; continue with --resume auto", step)
                return self.stop.exit_code

        final = self.save_final()
        if self.dist.is_main:
            print(f"training finished at step {self.state.step}; final checkpoint: {final}", flush=True)
        return EXIT_OK

    def _guarded(self, fn, *args) -> None:
        """Evaluation and monitoring are side work: a failure there is logged, never fatal."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - keep a multi-day run alive
            log.error("%s failed at step %d: %s: %s (training continues)",
                      fn.__name__.strip("_"), self.state.step, type(exc).__name__, exc)

    def _halt_nonfinite(self, result: StepResult) -> int:
        """NaN/Inf loss: the bad update was never applied; save that state and stop."""
        step = self.state.step + 1
        loss = result.metrics.get("loss", float("nan"))
        for anomaly in self.guard.check(step, loss):
            log.critical(anomaly.message)
        path = self.save("emergency")
        print(
            nonfinite_diagnostics(
                last_good_loss=self.last_good_loss,
                lr=result.metrics.get("lr", float("nan")),
                grad_norm=self.last_grad_norm,
                batch=result.batch,
            ),
            flush=True,
        )
        log.critical(
            "non-finite loss at step %d: training halted; emergency checkpoint (state before the bad update): %s",
            step, path,
        )
        return EXIT_NONFINITE

    def _evaluate(self) -> None:
        from dinox.eval.runner import evaluate_backbone

        if not self.dist.is_main or self.val_dataset is None:
            return
        result = evaluate_backbone(
            self.teacher.backbone,
            self.val_dataset,
            augment_config(self.cfg),
            n=self.cfg.eval_n,
            seed=1234,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        metrics = {
            "Eval/Retrieval_Top1": result["top1"],
            "Eval/Retrieval_Top5": result.get("top5", float("nan")),
            "Eval/Retrieval_Ratio": result["ratio"],
            "Eval/Effective_Rank": result["effective_rank"],
            "Eval/N": result["n"],
        }
        self.metrics.log(self.state.step, metrics)
        print(
            f"eval step={self.state.step} retrieval top1={result['top1']:.4f} ratio={result['ratio']:.2f} "
            f"(n={result['n']}) effective_rank={result['effective_rank']:.1f}",
            flush=True,
        )
        for anomaly in self.guard.check(self.state.step, None, erank=result["effective_rank"]):
            if anomaly.kind == "collapse":
                log.critical(anomaly.message)
                self.save("emergency")

    def _monitor(self, steps_per_s: float, samples_per_s: float) -> None:
        from dinox.observe.monitor_hook import run_monitor

        if not self.dist.is_main:
            return
        run_monitor(
            self.teacher.backbone,
            self.val_dataset or self.dataset,
            self.run_dir,
            self.state.step,
            self.device,
            out_dim=self.cfg.out_dim,
            img_size=self.cfg.img_size,
            steps_per_s=steps_per_s,
            samples_per_s=samples_per_s,
            autocast_dtype=self.autocast_dtype,
        )

