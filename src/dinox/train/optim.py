"""Optimisation: parameter groups, AdamW, the grad scaler, autocast, and the schedules.

Every schedule (learning rate, weight decay, teacher momentum, teacher temperature) is a
pure function of the optimizer step, so a resumed run recomputes the exact value from the
saved step alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dinox.config import RunConfig, teacher_momentum_fit
from dinox.run.schedules import cosine, linear_warmup, unlimited_momentum_end, warmup_cosine


@dataclass(frozen=True)
class Schedules:
    """All schedule settings of a run; `at(step)` gives the values for that optimizer step.

    Weight decay and teacher momentum follow DINO (Caron et al. 2021): cosine from their
    start to their end value over the run (momentum towards 1.0); for an unlimited run over
    `horizon` steps, after which they hold, the momentum short of 1.0 so that the teacher keeps
    learning (`unlimited_momentum_end`). On a short run the momentum is held flat where
    the cosine would leave the final teacher lagging (`teacher_momentum_fit`; recomputed
    from the recipe's values when a resume changes the run's length).
    """

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int | None
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    teacher_temp_start: float
    teacher_temp_warmup_steps: int
    horizon: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Schedules":
        o, s = cfg.optim, cfg.ssl
        momentum, momentum_end = s.momentum, s.momentum_end
        fit = teacher_momentum_fit(cfg)
        if fit is not None:
            momentum = momentum_end = fit.momentum
        if o.max_steps is None:
            momentum_end = unlimited_momentum_end(momentum, momentum_end)
        return cls(
            lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, max_steps=o.max_steps,
            weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
            momentum=momentum, momentum_end=momentum_end,
            teacher_temp=s.teacher_temp, teacher_temp_start=s.teacher_temp_start,
            teacher_temp_warmup_steps=s.teacher_temp_warmup_steps, horizon=o.horizon,
        )

    @property
    def span(self) -> int:
        return self.max_steps if self.max_steps is not None else self.horizon

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": warmup_cosine(step, self.lr, self.min_lr, self.warmup_steps, self.max_steps),
            "weight_decay": cosine(step, self.weight_decay, self.weight_decay_end, self.span),
            "teacher_momentum": cosine(step, self.momentum, self.momentum_end, self.span),
            "teacher_temp": linear_warmup(
                step, self.teacher_temp_start, self.teacher_temp, self.teacher_temp_warmup_steps
            ),
        }


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad and p.numel() > 0:   # an empty one stays: the checkpoints' order counts it
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "register_tokens")) or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, fused: bool = False) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999); lr and weight decay are set each step by `apply_schedule`."""
    return torch.optim.AdamW(param_groups(model), lr=0.0, betas=(0.9, 0.999), **({"fused": True} if fused else {}))


def apply_schedule(optimizer: torch.optim.Optimizer, sched: dict[str, float]) -> None:
    for group in optimizer.param_groups:
        group["lr"] = sched["lr"]
        if group.get("apply_wd"):
            group["weight_decay"] = sched["weight_decay"]


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients (a plain 0-d tensor, the same on every rank), after
    scaling them down to `max_norm` when it is above it (0: no clipping). FSDP2's sharded
    gradients are DTensors: the norm is reduced over their shards."""
    from dinox.run.distributed import whole

    grads = [p.grad for p in params]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    return whole(norm)


def autocast_dtype(amp: bool, device: torch.device, bf16_supported: bool) -> torch.dtype | None:
    """bf16 where the device has it (and always on the CPU, emulated where it lacks it:
    see `autocast_notice`), fp16 (with a scaler) elsewhere."""
    if not amp:
        return None
    if device.type == "cpu" or bf16_supported:
        return torch.bfloat16
    return torch.float16


def autocast_notice(amp: bool, device: torch.device, bf16_supported: bool) -> str | None:
    """A warning where --amp will cost time instead of saving it: bf16 on a CPU that
    emulates it (measured on one with AVX512-BF16: 1.28 s per step against 1.65-1.80 s
    in fp32, docs/recipes.md)."""
    if amp and device.type == "cpu" and not bf16_supported:
        return ("--amp on a CPU without native bf16 (AVX512-BF16 or AMX): bf16 is emulated here and usually "
                "slower than fp32; drop --amp on this machine")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def build_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is only needed (and only enabled) for fp16."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
