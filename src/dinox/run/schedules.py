"""The shapes of the training schedules, as pure functions of the optimizer step, and what
the teacher's EMA schedule makes of the final teacher.

`dinox.train.optim.Schedules` applies these shapes to a run's settings, with the teacher
momentum fitted to the run's length (`fit_teacher_momentum`); `dinox.config` reports the fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


def _ramp(step: int, start: float, end: float, warmup_steps: int) -> float:
    """The warm-up value at step t < W: linearly spaced from `start` at t = 0 to `end` at
    t = W - 1, like DINOv2's np.linspace(start, end, W) (so the last warm-up step already
    runs at the full value)."""
    if warmup_steps <= 1:
        return start
    return start + (end - start) * step / (warmup_steps - 1)


def warmup_cosine(step: int, base: float, final: float, warmup_steps: int, total_steps: int | None) -> float:
    """Linear warm-up then cosine decay (the warm-up research; DINOv2's CosineScheduler).

    For t < W: base * t / (W - 1).  For t >= W: final + 0.5 (base - final)(1 + cos(pi (t - W) / (T - W))).
    With no total (an unlimited run) the cosine is undefined: warm-up, then constant `base`.
    Past T the value stays at `final`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return _ramp(step, 0.0, base, warmup_steps)
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
    """Linear ramp from `start` (step 0) to `end` (step W - 1), then constant `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return _ramp(step, start, end, warmup_steps)


@dataclass(frozen=True)
class EMAMix:
    """What the final EMA teacher is made of after `steps` updates
    teacher <- m_t * teacher + (1 - m_t) * student_t (Caron et al. 2021, eq. 2).

    `untrained`: the weight the initial (untrained) network keeps, prod_t m_t.
    `lag`: how far, as a fraction of the run, the centre of mass of the students it
    averages lies behind the last step (the untrained network counted at step 0); 0 for a
    teacher that is the last student, 0.5 for a plain average over the run.
    """

    untrained: float
    lag: float


def ema_final_weights(momentum_at, steps: int) -> EMAMix:
    """The mix of the final teacher for the momentum schedule `momentum_at(step)`."""
    if steps <= 0:
        return EMAMix(1.0, 1.0)
    keep, weighted = 1.0, 0.0  # walking back from the last step: what the later updates keep
    for t in range(steps - 1, -1, -1):
        m = momentum_at(t)
        weighted += keep * (1.0 - m) * (t + 1)
        keep *= m
    centre = weighted / steps  # the untrained network sits at step 0 and adds nothing
    return EMAMix(untrained=keep, lag=1.0 - centre)


# The final EMA teacher should average the students of about the last quarter of the run.
# DINO's schedule (0.996 -> 1.0 over 125k steps) ends with the teacher centred 12 % of the
# run behind the student; the same shape over a few hundred steps leaves it centred more
# than half the run behind and still partly untrained (0.98 -> 1.0 over 220 steps: 62 %
# behind, 11 % untrained; 0.994 -> 1.0 over 384 steps: 75 %, 31 %). docs/recipes.md.
MAX_TEACHER_LAG = 0.25


# An unlimited run has no end at which DINO's momentum cosine may reach 1.0: held there, the
# teacher would stop learning for good once the run passes its horizon. It ramps to this
# instead, a teacher that averages the last ~10k students (DINO's cosine 0.994 -> 1.0 is above
# it only over the last 8 % of a run) and keeps following the student however long it trains.
UNLIMITED_MOMENTUM_END = 0.9999


def unlimited_momentum_end(start: float, end: float) -> float:
    """The momentum an unlimited run ramps to over its horizon: `end`, except that 1.0 (a
    frozen teacher) becomes UNLIMITED_MOMENTUM_END, or `start` where that is already higher."""
    return end if end < 1.0 else max(start, UNLIMITED_MOMENTUM_END)


@dataclass(frozen=True)
class TeacherFit:
    """A teacher momentum held flat at `momentum` instead of the planned cosine."""

    momentum: float
    planned: EMAMix
    fitted: EMAMix


@lru_cache(maxsize=64)  # resolve() and Schedules both ask; a long run costs one pass per step
def fit_teacher_momentum(start: float, end: float, steps: int | None) -> TeacherFit | None:
    """None where the cosine `start` -> `end` over `steps` keeps the final teacher within
    MAX_TEACHER_LAG of the student (always for an unlimited run); otherwise the momentum held
    flat at `start`, or lowered to the largest flat value within the bound."""
    if steps is None or steps <= 0:
        return None

    def mix(a: float, b: float) -> EMAMix:
        return ema_final_weights(lambda t: cosine(t, a, b, steps), steps)

    planned = mix(start, end)
    if planned.lag <= MAX_TEACHER_LAG:
        return None
    momentum = start
    if mix(momentum, momentum).lag > MAX_TEACHER_LAG:
        low, high = 0.0, momentum  # the lag grows with a flat momentum: bisect for the bound
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if mix(mid, mid).lag <= MAX_TEACHER_LAG else (low, mid)
        momentum = math.floor(low * 1e4) / 1e4  # four decimals, still within the bound
    return TeacherFit(momentum, planned, mix(momentum, momentum))
