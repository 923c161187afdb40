"""Training anomaly detection: loss spikes, feature collapse, non-finite loss.

The guard only detects and describes; the trainer acts on what it returns:

| kind         | severity | trainer action                                          |
|--------------|----------|---------------------------------------------------------|
| `loss_spike` | warning  | log and continue (halt if `halt_on_anomaly`)             |
| `collapse`   | critical | log, save an emergency checkpoint (halt if `halt_on_anomaly`) |
| `nonfinite`  | fatal    | save an emergency checkpoint, print diagnostics, halt    |

Collapse is reported once per episode: after a collapse report the guard stays quiet
about that signal until a later measurement of the same signal is healthy again. A run
that sits collapsed for 10k steps therefore writes one emergency checkpoint, not 10k.
The two signals (embedding std, effective rank) keep separate episodes, because they are
usually measured at different cadences (every step vs every evaluation): a healthy rank at
an evaluation must not re-arm a std that is still collapsed.

A freshly initialised ViT with layer scale (init 1e-5) maps every image to almost the same
class token (measured: std ~1e-5, effective rank ~1.0), which is indistinguishable from
collapse. `collapse_grace_steps` covers that start: before that step a signal that has never
been healthy is not reported; once healthy, a fall is reported at any step.

The per-step embedding std is judged on its mean over the last `std_window` steps (the
trainer's guard: 10), not on one reading: measured on the 2 x batch class tokens of one
step, it is noisy at a small batch. The tiny recipe at batch 8 reads 0.013-0.026 in health
with single steps down to 0.009 (chest seed 1: a "collapse" at step 87 and an emergency
checkpoint, while its retrieval rose from 6x to 18x chance); its 10-step mean stayed at
0.016 or more, where a run with centring disabled sat at 0.008.

"Healthy" has a margin (`HEALTHY_MARGIN`): a reading ends the grace, or an episode, only
at twice the collapse line or more. A tiny ViT starts near the line (embedding std
0.004-0.011 at step 1 for LayerScale 0.1-0.3, two to six blocks), and one reading of
0.0101 at step 1 must not make the next of 0.0099 a "collapse after health" (it did, on
every demo-sized run, with an emergency checkpoint at step 3-8); in the same way a
collapsed run hovering at the line is one episode, not one report per crossing.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from dinox.config import BASE_RECIPE, WatchConfig, prototypes_for_batch, recipe_for
from dinox.data.dataset import slice_gap
from dinox.errors import UserError
from dinox.observe.metrics import MetricsUnwritable, tensorboard_tag

AnomalyKind = Literal["loss_spike", "collapse", "nonfinite", "entropy_wall", "not_learning"]
Severity = Literal["warning", "critical", "fatal"]

SUMMARY_STEPS = 5      # steps of each alarm kind the run's last line names
HEALTHY_MARGIN = 2.0   # a healthy reading is at >= this multiple of the collapse line

_LEVELS = {"warning": logging.WARNING, "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


@dataclass
class Anomaly:
    kind: AnomalyKind
    severity: Severity
    step: int
    message: str
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> int:
        """The `logging` level to report this anomaly at."""
        return _LEVELS[self.severity]

    @property
    def wants_checkpoint(self) -> bool:
        """Whether the trainer should save an emergency checkpoint for post-mortem analysis."""
        return self.severity in ("critical", "fatal")

    def __str__(self) -> str:
        return f"[{self.severity.upper()}] {self.kind}: {self.message}"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _fmt_history(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


class AnomalyGuard:
    """Checks each step's loss (and, when measured, embedding std / effective rank).

    - loss spike: loss > `spike_factor` x median of the previous `window` finite losses; needs
      a full window, and is skipped while that median is <= 0 (a ratio test is meaningless there).
    - collapse: the mean of the last `std_window` embedding stds < `std_threshold` (judged
      once that many are in), or `erank < rank_floor`, or `erank < rank_collapse_fraction` x
      the best erank seen so far; non-finite measurements also count as collapse, at once.
    - non-finite: loss is NaN or +-Inf.
    """

    def __init__(self, spike_factor: float = 2.0, window: int = 10, std_threshold: float = 0.01,
                 rank_collapse_fraction: float = 0.1, rank_floor: float = 1.5,
                 halt_on_anomaly: bool = False, collapse_grace_steps: int = 0,
                 entropy_wall: "EntropyWall | None" = None, retrieval: "RetrievalProgress | None" = None,
                 std_window: int = 1, spike_advice: str = "", collapse_advice: str = ""):
        if window < 1 or std_window < 1 or spike_factor <= 1.0:
            raise ValueError("AnomalyGuard needs window >= 1, std_window >= 1 and spike_factor > 1")
        self.spike_factor = float(spike_factor)
        self.window = int(window)
        self.std_threshold = float(std_threshold)
        self.rank_collapse_fraction = float(rank_collapse_fraction)
        self.rank_floor = float(rank_floor)
        self.halt_on_anomaly = bool(halt_on_anomaly)
        self.collapse_grace_steps = int(collapse_grace_steps)
        self._ever_healthy = {"std": False, "rank": False}
        self.history: deque[float] = deque(maxlen=self.window)
        self._spiking = False   # inside a reported spike episode
        self.std_readings: deque[float] = deque(maxlen=int(std_window))
        self.best_erank: float | None = None
        self._collapsed = {"std": False, "rank": False}
        self.last_good_loss: float | None = None
        self.last_good_step: int | None = None
        self.entropy_wall = entropy_wall
        self.retrieval = retrieval
        self.spike_advice, self.collapse_advice = spike_advice, collapse_advice  # what to try, for the run
        # Per kind: how many alarms `respond` reported, the first steps and the last, for `summary`.
        # Bounded, as it rides in every checkpoint: a weeks-long run may raise thousands.
        self.raised: dict[str, dict] = {}

    def record(self, kind: str, step: int) -> None:
        """Keep an alarm for the run's last line (`summary`)."""
        entry = self.raised.setdefault(kind, {"count": 0, "steps": [], "last": int(step)})
        entry["count"] += 1
        entry["last"] = int(step)
        if len(entry["steps"]) < SUMMARY_STEPS:
            entry["steps"].append(int(step))

    @property
    def collapse_active(self) -> bool:
        """Inside a collapse episode (reported, not yet recovered)."""
        return any(self._collapsed.values())

    def check(self, step: int, loss: float | None, emb_std: float | None = None,
              erank: float | None = None) -> list[Anomaly]:
        """Anomalies at `step`. `loss=None` checks collapse only (e.g. after an evaluation)
        and leaves the loss history untouched."""
        found: list[Anomaly] = []
        if loss is not None:
            found += self._check_loss(step, float(loss))
        collapse = self._check_collapse(step, emb_std, erank)
        if collapse is not None:
            found.append(collapse)
        return found

    def nonfinite(self, step: int, loss: float, grad_norm: float | None = None) -> Anomaly:
        """The fatal anomaly of a step whose loss, or gradient norm, is not finite. The loss
        history is left as it was: the step was undone, and its loss (finite where only the
        gradient was not) is neither the last valid one nor part of the spike window."""
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm} (loss {loss:.4f})"
        return Anomaly("nonfinite", "fatal", step,
                       f"{what} at step {step}; last valid loss {self.last_good_loss} at step {self.last_good_step}",
                       {"loss": str(loss), "grad_norm": str(grad_norm), "last_good_loss": self.last_good_loss,
                        "last_good_step": self.last_good_step, "history": list(self.history)})

    def _check_loss(self, step: int, loss: float) -> list[Anomaly]:
        if not math.isfinite(loss):
            return [self.nonfinite(step, loss)]
        spike = self._check_spike(step, loss)
        self.history.append(loss)
        self.last_good_loss, self.last_good_step = loss, int(step)
        return [spike] if spike is not None else []

    def _check_spike(self, step: int, loss: float) -> Anomaly | None:
        """One report per episode: a jump to a new loss level stays above the line for several
        steps while the window takes it in, and that is one event, not one per step."""
        if len(self.history) < self.window:
            return None
        # the median, not the mean: a spike in the window would lift a mean and hide the next
        # one (10 x 10 then 100 put the line at 38 for ten steps); a lasting new level still
        # becomes the baseline once it fills half the window
        mean = statistics.median(self.history)
        if mean <= 0 or loss <= self.spike_factor * mean:
            self._spiking = False
            return None
        if self._spiking:
            return None
        self._spiking = True
        history = list(self.history)
        return Anomaly(
            "loss_spike", "warning", step,
            f"loss spike at step {step}: loss={loss:.4f} is {loss / mean:.2f}x the median "
            f"{mean:.4f} of the previous {len(history)} steps (threshold {self.spike_factor}x); "
            f"history={_fmt_history(history)}; training goes on (--halt-on-anomaly stops on a spike; reported "
            f"once until the loss is back under the line)"
            + (f"; if spikes recur, try {self.spike_advice}" if self.spike_advice else ""),
            {"loss": loss, "mean": mean, "ratio": loss / mean, "history": history})

    def _std_judged(self, emb_std: float | None) -> float | None:
        """The embedding std the collapse test judges: a non-finite reading at once, else the
        mean of the last `std_window` readings (None until that many are in)."""
        if emb_std is None:
            return None
        emb_std = float(emb_std)
        if not math.isfinite(emb_std):
            return emb_std
        self.std_readings.append(emb_std)
        if len(self.std_readings) < self.std_readings.maxlen:
            return None
        return sum(self.std_readings) / len(self.std_readings)

    def _check_collapse(self, step: int, emb_std: float | None, erank: float | None) -> Anomaly | None:
        reasons: dict[str, str] = {}
        healthy: dict[str, bool] = {}
        emb_std = self._std_judged(emb_std)
        if emb_std is not None:
            over = (f" (mean of the last {len(self.std_readings)} steps)"
                    if len(self.std_readings) > 1 and math.isfinite(emb_std) else "")
            if not math.isfinite(emb_std) or emb_std < self.std_threshold:
                reasons["std"] = f"embedding std {emb_std:.3g}{over} < {self.std_threshold:g}"
            healthy["std"] = math.isfinite(emb_std) and emb_std >= HEALTHY_MARGIN * self.std_threshold
        best_before = self.best_erank
        if erank is not None:
            erank = float(erank)
            if not math.isfinite(erank):
                reasons["rank"] = f"effective rank is {erank}"
            else:
                if erank < self.rank_floor:
                    reasons["rank"] = f"effective rank {erank:.3g} < floor {self.rank_floor:g}"
                elif best_before is not None and erank < self.rank_collapse_fraction * best_before:
                    reasons["rank"] = (f"effective rank {erank:.3g} < {self.rank_collapse_fraction:g} x "
                                       f"best {best_before:.3g}")
                healthy["rank"] = erank >= HEALTHY_MARGIN * max(
                    self.rank_floor, self.rank_collapse_fraction * (best_before or 0.0))
                self.best_erank = erank if best_before is None else max(best_before, erank)
        new = False
        for signal, measured in (("std", emb_std), ("rank", erank)):
            if measured is None:
                continue
            if signal not in reasons:
                if healthy.get(signal):   # between the line and the margin: no change of state
                    self._collapsed[signal] = False
                    self._ever_healthy[signal] = True
            elif self._ever_healthy[signal] or step >= self.collapse_grace_steps:
                new |= not self._collapsed[signal]
                self._collapsed[signal] = True
            else:
                del reasons[signal]
        if not new:
            return None
        reasons = list(reasons.values())
        return Anomaly(
            "collapse", "critical", step,
            f"feature collapse at step {step}: " + "; ".join(reasons)
            + " (reported once until the features recover)"
            + (f". Try: {self.collapse_advice}" if self.collapse_advice else ""),
            {"emb_std": emb_std, "erank": erank, "best_erank": best_before, "reasons": reasons})

    def check_entropy(self, step: int, teacher_entropy: float | None) -> Anomaly | None:
        """The entropy wall (see `EntropyWall`), when this guard has one."""
        if self.entropy_wall is None or teacher_entropy is None:
            return None
        return self.entropy_wall.check(step, float(teacher_entropy))

    def check_retrieval(self, step: int, mean_rank: float | None, n: int | None) -> Anomaly | None:
        """Features that do not find slices better than untrained ones (see `RetrievalProgress`)."""
        if self.retrieval is None:
            return None
        return self.retrieval.check(step, mean_rank, n)

    def summary(self) -> str:
        """The run's alarms for its last line ("" when none): a run that ends with exit 0 may
        have had one thousands of lines earlier."""
        if not self.raised:
            return ""
        return ("; alarms during the run: " + ", ".join(
            f"{kind} at step{'s' if e['count'] > 1 else ''} {', '.join(map(str, e['steps']))}"
            + (f" (+{e['count'] - len(e['steps'])} more, the last at step {e['last']})"
               if e["count"] > len(e["steps"]) else "") for kind, e in self.raised.items())
            + " (train.log has what each said)")

    def should_halt(self, anomaly: Anomaly) -> bool:
        """Fatal anomalies always halt; spikes and collapse only with `halt_on_anomaly`."""
        if anomaly.severity == "fatal":
            return True
        return self.halt_on_anomaly

    def state_dict(self) -> dict:
        """Plain Python values only (safe for `torch.load(weights_only=True)`)."""
        return {"history": list(self.history), "spiking": self._spiking, "std_readings": list(self.std_readings),
                "best_erank": self.best_erank,
                "collapsed": dict(self._collapsed), "ever_healthy": dict(self._ever_healthy),
                "last_good_loss": self.last_good_loss,
                "last_good_step": self.last_good_step,
                "raised": {k: {**e, "steps": list(e["steps"])} for k, e in self.raised.items()},
                "entropy_wall": self.entropy_wall.state_dict() if self.entropy_wall is not None else None,
                "retrieval": self.retrieval.state_dict() if self.retrieval is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(x) for x in state.get("history", [])), maxlen=self.window)
        self._spiking = bool(state.get("spiking", False))
        self.std_readings = deque((float(x) for x in state.get("std_readings", [])), maxlen=self.std_readings.maxlen)
        self.best_erank = state.get("best_erank")
        collapsed = state.get("collapsed", {})
        self._collapsed = {k: bool(collapsed.get(k, False)) for k in ("std", "rank")}
        healthy = state.get("ever_healthy", {})
        self._ever_healthy = {k: bool(healthy.get(k, False)) for k in ("std", "rank")}
        self.last_good_loss = state.get("last_good_loss")
        self.last_good_step = state.get("last_good_step")
        self.raised = {}
        raised = state.get("raised", {})
        if isinstance(raised, list):   # checkpoints before the bounded record: every (kind, step)
            for kind, step in raised:
                self.record(str(kind), int(step))
        else:
            self.raised = {str(k): {"count": int(e["count"]), "steps": [int(x) for x in e["steps"]],
                                    "last": int(e["last"])} for k, e in raised.items()}
        if self.entropy_wall is not None and state.get("entropy_wall"):
            self.entropy_wall.load_state_dict(state["entropy_wall"])
        if self.retrieval is not None and state.get("retrieval"):
            self.retrieval.load_state_dict(state["retrieval"])


class EntropyWall:
    """The DINO failure where nothing is learned: the teacher's targets stay near uniform,
    entropy ln(out_dim) (the "entropy wall"), so the student is asked to predict nothing.

    Critical when the teacher entropy, averaged over the last `window` steps at or after
    `start_step` (the end of the warm-ups), lies within `margin` (fraction) of ln(out_dim);
    reported once per episode, with `advice` (what to try, for the run's own settings). The
    mean, not every step: a run parked at the wall dips under the line for single steps (a
    tiny CPU run at 0.99 of it, every 10-30 steps), and a count of consecutive steps at the
    wall that a dip resets would never report one that dips more often than `window`. The
    episode ends only once that mean has stayed off the wall for `window` steps too: each
    report writes an emergency checkpoint (20.5 GB for a ViT-Giant), and one report per dip
    would rotate out the emergency checkpoints of earlier, real episodes within hours."""

    def __init__(self, out_dim: int, start_step: int, window: int = 50, margin: float = 0.02,
                 advice: str = ""):
        self.wall = math.log(out_dim)
        self.start_step, self.window, self.margin, self.advice = int(start_step), int(window), float(margin), advice
        self.recent: deque[float] = deque(maxlen=self.window)   # the last window's entropies
        self.reported = False
        self.away = 0   # steps off the wall (by the mean) since the report

    def check(self, step: int, teacher_entropy: float) -> Anomaly | None:
        if step < self.start_step:
            return None
        # a non-finite reading counts as off the wall (the non-finite guard reports it)
        self.recent.append(float(teacher_entropy) if math.isfinite(teacher_entropy) else 0.0)
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) < self.window or mean < (1.0 - self.margin) * self.wall:
            if self.reported:
                self.away += 1
                if self.away >= self.window:   # clearly left the wall: a return is a new episode
                    self.reported, self.away = False, 0
            return None
        self.away = 0
        if self.reported:
            return None
        self.reported = True
        return Anomaly(
            "entropy_wall", "critical", step,
            f"the teacher's entropy has averaged {mean:.3f}, within {self.margin:.0%} of the wall "
            f"ln(out_dim) = {self.wall:.3f}, over the last {self.window} steps after the warm-up: the targets are "
            f"near uniform and nothing is being learned. Try: {self.advice or 'see the user guide, Troubleshooting'}",
            {"teacher_entropy": mean, "wall": self.wall, "steps": self.window})

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "reported": self.reported, "away": self.away}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint of the consecutive-step count ("run") starts a new window
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=self.window)
        self.reported = bool(state.get("reported", False))
        self.away = int(state.get("away", 0))


class RetrievalProgress:
    """The failure no loss shows: the run trains, the teacher leaves the entropy wall, the
    class tokens spread, and yet they find a slice's other view no better than the untrained
    network did (docs/recipes.md, "Data of another shape": limb CT of thin coverage; chest at
    1.25 mm with adjacent slices).

    Judged on the in-training view retrieval: the mean rank of the right key, as a share of
    chance ((n + 1) / 2), against the untrained network's at step 0. A warning, once, when at
    or after `start_step` it is still above `fraction` of that. The mean rank, not the hits:
    it counts every query, so one draw of it moves little, where hits of a few percent are
    binomial counts. Measured on 16 draws (final / untrained mean rank): the recipe checks that
    learned 0.15-0.49, those that did not (0.8-1.7x their untrained hits) 0.61-0.90."""

    def __init__(self, start_step: int, fraction: float = 0.6, min_n: int = 100, advice: str = ""):
        self.start_step, self.fraction, self.min_n, self.advice = int(start_step), float(fraction), int(min_n), advice
        self.untrained: float | None = None     # mean rank / chance at step 0
        self.reported = False

    def check(self, step: int, mean_rank: float | None, n: int | None) -> Anomaly | None:
        if mean_rank is None or not n or n < self.min_n or not math.isfinite(mean_rank):
            return None
        level = mean_rank / ((n + 1) / 2.0)
        if step == 0:   # ties count against the query: identical untrained tokens read ~2x chance
            self.untrained = min(level, 1.0)
            return None
        if self.untrained is None or step < self.start_step or self.reported or level <= self.fraction * self.untrained:
            return None
        self.reported = True
        untrained_rank = self.untrained * (n + 1) / 2.0
        return Anomaly(
            "not_learning", "warning", step,
            f"view retrieval at step {step}: the right view's mean rank is {mean_rank:.0f} of {n} "
            f"({level / self.untrained:.0%} of the untrained network's {untrained_rank:.0f} at step 0; runs that "
            f"learned reach 50 % or less): the features barely tell these slices apart better than untrained ones "
            f"(a failure the losses need not show). Try: {self.advice or 'see docs/recipes.md'}",
            {"mean_rank": mean_rank, "n": n, "level": level, "untrained": self.untrained})

    def off_note(self, n: int | None) -> str | None:
        """Why this check cannot run on retrievals of `n` slices (None where it can), for the
        log at the untrained measurement: a check that is silently off reads as a pass."""
        if n is None or n >= self.min_n:
            return None
        return (f"the not-learning check is off for this run: the in-training retrieval compares {n} slices "
                f"and one of fewer than {self.min_n} says too little (give a larger --eval-n, or more "
                f"validation series)")

    def state_dict(self) -> dict:
        return {"untrained": self.untrained, "reported": self.reported}

    def load_state_dict(self, state: dict) -> None:
        self.untrained = state.get("untrained")
        self.reported = bool(state.get("reported", False))


def not_learning_advice(cfg, thinnest_slices_mm: float | None = None) -> str:
    """What to try when the features do not learn to find slices (`RetrievalProgress`).

    First the 2.5D context: a short run learns most of its retrieval from how slice z
    differs from its neighbours (docs/recipes.md, "Data of another shape"), so neighbours
    nearer than ~10 mm (thin slices, or a small --context-mm) get the recipe's 10 mm, and a
    run that already has them a wider one (limb CT of 1.75-5 mm slices: 1.4x its untrained
    network at 5 mm, 6.6x at 10 mm; "A 10 mm context")."""
    tips = []
    ctx, recipe = cfg.views.context_mm, float(BASE_RECIPE["context_mm"])
    # how far the thinnest series' neighbours are from slice z (the stack's own rule)
    near = (slice_gap(ctx, thinnest_slices_mm) * thinnest_slices_mm if thinnest_slices_mm else ctx)
    if near < recipe:
        why = (f"the stacks hold slices {thinnest_slices_mm:g} mm apart, nearly one image three times"
               if thinnest_slices_mm is not None and thinnest_slices_mm < 3.0 and near == thinnest_slices_mm
               else f"the stacks' neighbours are about {near:g} mm from slice z" if near
               else "the stacks hold the adjacent slices")
        tips.append(f"a 2.5D context of {recipe:g} mm (--context-mm {recipe:g}, now {ctx:g}): "
                    f"{why}, and the recipe learns mostly from how slice z differs from them")
    else:
        tips.append(f"a wider 2.5D context (--context-mm {2 * near:g}, now {ctx:g}): an anatomy that changes "
                    f"slowly along z needs neighbours further from slice z to differ from it")
    tips.append("more steps where the run is short (the retrieval of a run that learns keeps rising)")
    tips.append("a look at the data: views of slices that barely change along z (long, thin coverage of "
                "slowly changing anatomy) are what the recipe has failed to tell apart (docs/recipes.md, "
                "\"Data of another shape\" and \"Thin slices\")")
    return "; ".join(tips)


def build_guard(cfg, world_size: int = 1, thinnest_slices_mm: float | None = None) -> AnomalyGuard:
    """The run's anomaly guard: loss, collapse, the entropy wall after the warm-ups, and
    retrieval progress from half the run on (at least 100 steps after the warm-ups)."""
    watch, steps = cfg.watch, cfg.optim.max_steps
    warmed_up = max(cfg.optim.warmup_steps, cfg.ssl.teacher_temp_warmup_steps)
    wall = EntropyWall(cfg.model.out_dim, start_step=warmed_up, advice=entropy_wall_advice(cfg, world_size),
                       window=min(100, max(20, (steps or 1000) // 10)))
    progress = RetrievalProgress(start_step=max(warmed_up + 100, steps // 2 if steps else 4 * warmed_up),
                                 advice=not_learning_advice(cfg, thinnest_slices_mm))
    return AnomalyGuard(spike_factor=watch.spike_factor, std_threshold=watch.collapse_std,
                        halt_on_anomaly=watch.halt_on_anomaly, collapse_grace_steps=max(cfg.optim.warmup_steps, 100),
                        entropy_wall=wall, retrieval=progress, std_window=10, spike_advice=spike_advice(cfg),
                        collapse_advice=collapse_advice(cfg))


def check_collapse_line(collapse_std: float, embed_dim: int, rows: int) -> None:
    """Refuse a collapse line that no reading can reach.

    The statistic (`dinox.eval.rank.normalized_std`: the mean per-dimension std of the
    L2-normalised class tokens of a micro-batch's `rows` global views) is at most
    sqrt(rows / (rows - 1)) / sqrt(D): the per-dimension variances of unit vectors sum to at
    most 1, and the unbiased std adds the factor. Above that every reading is under the line,
    and every run would be reported as collapsed once its grace ends (with an emergency
    checkpoint).
    """
    ceiling = math.sqrt(rows / max(rows - 1, 1) / embed_dim)
    if collapse_std > ceiling:
        raise UserError(
            f"--collapse-std {collapse_std:g} cannot be reached: for {rows} class tokens of width {embed_dim} a "
            f"step's embedding std is at most {ceiling:.3g}, so every run would be reported as collapsed; give a "
            f"value below it (default {WatchConfig.collapse_std:g})")


# What a resume after a non-finite loss should change (the halt's last line, and the refusal of a
# resume that changes nothing).
NONFINITE_CHANGES = "a lower --lr, --clip-grad, --no-amp, a longer --warmup-steps"


def spike_advice(cfg) -> str:
    """What to try where loss spikes recur, for the run's settings."""
    o = cfg.optim
    tips = [f"a lower --lr (now {o.lr:g})"]
    if not o.clip_grad:
        tips.append("gradient clipping (--clip-grad 3, now off)")
    elif o.clip_grad > 3.0:
        tips.append(f"tighter gradient clipping (--clip-grad 3, now {o.clip_grad:g})")
    return " or ".join(tips) + " (a resume takes them: --resume auto)"


def collapse_advice(cfg) -> str:
    """What to try against collapsed features, for the run's settings (the emergency
    checkpoint is the state to look at: `dinox monitor`, `dinox eval retrieval`)."""
    s, o = cfg.ssl, cfg.optim
    tips = []
    if s.centering == "centering":
        tips.append("--centering sinkhorn (targets that cannot all fall on one prototype)")
        if s.center_momentum > 0.99:
            tips.append(f"a centre that follows the batch (--center-momentum 0.9, now {s.center_momentum:g})")
    if s.koleo_weight <= 0:
        tips.append("KoLeo, which spreads the class tokens (--koleo-weight 0.005, now 0)")
    tips.append(f"a lower --lr (now {o.lr:g})")
    return ("; ".join(tips) + " (a resume from the emergency checkpoint takes them: --resume PATH); "
            "`dinox monitor --checkpoint` on that checkpoint shows its features")


def entropy_wall_advice(cfg, world_size: int = 1) -> str:
    """What to try against a teacher stuck at the entropy wall, for a RunConfig's settings
    (the user guide's troubleshooting advice made concrete), the measured levers first.

    On the scaled-down big-preset recipe (docs/recipes.md, "Taking the learning combination
    apart") the teacher left the wall only with LayerScale 0.1 (the untrained class tokens
    then differ), BN in the head, views that share their intensity statistics and a flat
    teacher temperature of 0.04 together, at prototypes sized to the batch, and stayed at or
    near it without any one of the four; Sinkhorn-Knopp alone did not move it (it stays among
    the later tips as DINOv3's choice at scale).
    """
    m, s, o, v = cfg.model, cfg.ssl, cfg.optim, cfg.views
    new_model = []  # these change the model's shape, which a resume refuses
    if 0 < m.layerscale < 0.01:
        new_model.append(f"--layerscale 0.1 (now {m.layerscale:g}: every untrained class token is then the same, "
                         "and AdamW opens the LayerScale gains by at most about the learning rate per step)")
    if not m.head_bn and cfg.effective_batch <= 64:
        new_model.append("--head-bn true (diverse targets at initialisation for small batches)")
    fitted = prototypes_for_batch(cfg.effective_batch * world_size, m.out_dim)  # the rule resolve() applies
    if fitted < m.out_dim:
        new_model.append(f"fewer prototypes (--out-dim {fitted}, now {m.out_dim})")
    if s.ibot_weight == 0:
        new_model.append("iBOT (--ibot-weight 1.0: many patch targets per image)")
    resumable = []
    if v.distinct_windows or not v.standardize_views:
        resumable.append("views that share their intensity statistics (--distinct-windows false "
                         "--standardize-views true)")
    if s.teacher_temp > 0.04:
        resumable.append(f"a sharper teacher (--teacher-temp 0.04, now {s.teacher_temp:g})")
    if s.centering == "centering":
        resumable.append("--centering sinkhorn (DINOv3's choice; it cannot settle on uniform targets)")
    if o.lr > 5e-4:
        resumable.append(f"a lower --lr (now {o.lr:g})")
    # Not where the preset's recipe has none: the tiny recipe drops them because they cost a
    # short run its retrieval (docs/recipes.md, "Local crops in a short run").
    recipe_locals = int(recipe_for(m.preset)["local_crops"])
    if v.local_crops == 0 and recipe_locals:
        resumable.append(f"local crops (--local-crops {recipe_locals}, the recipe's)")
    tips = []
    if new_model:
        tips.append("; ".join(new_model) + " (these change the model: start a new run with them)")
    if resumable:
        tips.append("; ".join(resumable) + " (these can resume from the emergency checkpoint: --resume PATH)")
    return "; ".join(tips)  # empty: EntropyWall points to the user guide instead


def respond(guard: AnomalyGuard, anomalies: list[Anomaly], logger, metrics=None) -> tuple[bool, bool]:
    """The policy of what anomalies trigger: log each at its level, mark it in the metrics
    (`Anomaly/<Kind>` = 1 at its step: a point on TensorBoard's plots and a metrics.jsonl row)
    and keep it for the run's last line (`guard.summary`); returns (save an emergency
    checkpoint, halt). A collapse always gets a checkpoint for the post-mortem (so does the
    entropy wall: every critical anomaly); halting follows `guard.should_halt` (fatal always,
    others with --halt-on-anomaly), and a halt saves a checkpoint too."""
    checkpoint = halt = False
    for anomaly in anomalies:
        logger.log(anomaly.level, anomaly.message)
        guard.record(anomaly.kind, int(anomaly.step))
        if metrics is not None:
            # A full disk here must not skip the emergency save below (nor, under torchrun, take
            # rank 0 alone out of that collective save): the run's own metrics rows meet it too,
            # and halt the run with a save.
            try:
                metrics.log(anomaly.step, {tensorboard_tag(anomaly.kind, prefix="Anomaly"): 1.0})
            except MetricsUnwritable:
                pass
        checkpoint = checkpoint or anomaly.wants_checkpoint
        halt = halt or guard.should_halt(anomaly)
    return checkpoint, halt


def nonfinite_diagnostics(last_good_loss: float | None, lr: float | None, grad_norm: float | None,
                          batch=None) -> str:
    """Multi-line report printed when the loss goes non-finite (why the run halted).

    `batch` is the input tensor of the failing step (any dtype/device), or None.
    """
    def num(x) -> str:
        if x is None:
            return "n/a"
        x = float(x.item() if hasattr(x, "item") else x)
        return f"{x:.6g}"

    lines = ["non-finite loss: diagnostics",
             f"  last valid loss: {num(last_good_loss)}",
             f"  learning rate:   {num(lr)}",
             f"  grad norm:       {num(grad_norm)}"]
    if batch is None:
        lines.append("  batch: n/a")
        return "\n".join(lines)
    try:
        x = batch.detach().float()
        finite = x.isfinite()
        n_bad = int((~finite).sum().item())
        vals = x[finite]
        lines.append(f"  batch: shape={tuple(batch.shape)} dtype={batch.dtype} device={batch.device}")
        if vals.numel():
            std = vals.std().item() if vals.numel() > 1 else 0.0
            lines.append(f"  batch stats (finite values): min={vals.min().item():.6g} "
                         f"max={vals.max().item():.6g} mean={vals.mean().item():.6g} std={std:.6g}")
        lines.append(f"  batch non-finite values: {n_bad} of {x.numel()}")
    except Exception as e:  # diagnostics must never mask the original failure
        lines.append(f"  batch: statistics unavailable ({type(e).__name__}: {e})")
    return "\n".join(lines)
