"""Per-step schedules: learning rate, weight decay, teacher momentum, teacher temperature.

Every schedule is a pure function of the optimizer step, so a resumed run recomputes the
exact value from the saved step alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, base: float, final: float, warmup_steps: int, total_steps: int | None) -> float:
    """Linear warm-up then cosine decay (seed 004).

    For t < W: base * t / W.  For t >= W: final + 0.5 (base - final)(1 + cos(pi (t - W) / (T - W))).
    With no total (an unlimited run) the cosine is undefined: warm-up, then constant `base`.
    Past T the value stays at `final`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base * step / warmup_steps
    if total_steps is None:
        return base
    if total_steps <= warmup_steps or step >= total_steps:
        return final
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, start: float, end: float, horizon: int) -> float:
    """Cosine ramp from `start` (step 0) to `end` (step >= horizon)."""
    if horizon <= 0 or step >= horizon:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / horizon))


def linear_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear ramp from `start` to `end` over `warmup_steps`, then constant `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class Schedules:
    """All schedule settings of a run; `at(step)` gives the values for that optimizer step.

    Weight decay and teacher momentum follow DINO (Caron et al. 2021): cosine from their
    start to their end value over the run (momentum towards 1.0); for an unlimited run over
    `horizon` steps, after which they hold.
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
