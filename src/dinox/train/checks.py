"""The side work of a training run at its cadence: view retrieval, nodule probes, monitoring.

All three look at the EMA teacher's backbone on rank 0. Under FSDP2 the backbone is
sharded, so every rank first takes part in gathering one whole copy (`DINOSSL.
inference_backbone`); the checks then run on rank 0 alone. A failing check is logged and
never stops the run; the effective rank from retrieval reaches every rank, so the collapse
guard takes the same decision everywhere.
"""
from __future__ import annotations

import logging

from dinox.observe.anomaly import respond
from dinox.run.distributed import broadcast_object
from dinox.run.rng import capture_rng_state, restore_rng_state

log = logging.getLogger("dinox.train")


def guarded(fn, step: int, *args):
    """Evaluation and monitoring are side work: a failure there is logged, never fatal
    (returns None then)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - keep a multi-day run alive
        log.error("%s failed at step %d: %s: %s (training continues)",
                  fn.__name__.strip("_"), step, type(exc).__name__, exc)
        return None


class InTrainingChecks:
    def __init__(self, trainer):
        self.t = trainer

    def due(self, step: int, *, start: bool = False) -> dict[str, bool]:
        """The checks due at `step`. The monitor also runs at a finite run's last step, so that
        a run shorter than --monitor-every (the 384-step validation run at the default 1000)
        still leaves its heatmaps, health report and loss curve."""
        w = self.t.cfg.watch
        if start:
            return {"eval": bool(w.eval_every), "probe": False, "monitor": False}
        return {"eval": bool(w.eval_every) and step % w.eval_every == 0,
                "probe": bool(w.probe_every) and step % w.probe_every == 0,
                "monitor": bool(w.monitor_every) and (step % w.monitor_every == 0
                                                      or step == self.t.cfg.optim.max_steps)}

    def run(self, step: int, throughput=None, *, start: bool = False) -> bool:
        """The checks due at `step`; True where an alarm of theirs asks the run to halt
        (`--halt-on-anomaly`; its emergency checkpoint is saved). Every RNG is put back
        afterwards: what the checks draw, and what the libraries they import on first use
        draw (scikit-learn's import draws from Python's `random`), must not depend on where
        a run was resumed."""
        due = self.due(step, start=start)
        if not any(due.values()):
            return False
        t = self.t
        rng = capture_rng_state(t.device)
        halt = False
        try:
            backbone = t.ssl.inference_backbone(on_this_rank=t.dist.is_main)
            if due["eval"]:
                halt = self._evaluate(backbone, step)
            if due["probe"] and t.dist.is_main:
                guarded(self._probe, step, backbone, step)
            if due["monitor"] and t.dist.is_main:
                guarded(self._monitor, step, backbone, step, throughput.steps_per_s, throughput.samples_per_s)
        finally:
            restore_rng_state(rng, t.device)
        return halt

    def _evaluate(self, backbone, step: int) -> bool:
        """The in-training retrieval and the alarms it feeds (collapse by effective rank, not
        learning); True where one asks the run to halt. The figures reach every rank, so every
        rank decides alike and takes part in the emergency save."""
        t = self.t
        result = guarded(self._retrieval, step, backbone, step) if t.dist.is_main and t.val_dataset is not None else None
        erank, mean_rank, n = broadcast_object((result["effective_rank"], result["mean_rank"], result["n"])
                                               if result else (None, None, None))
        if erank is None:
            return False
        guard = t.parts.guard
        found = [a for a in guard.check(step, None, erank=erank) if a.kind == "collapse"]
        found += [a for a in [guard.check_retrieval(step, mean_rank, n)] if a is not None]
        wants_checkpoint, halt = respond(guard, found, log, t.metrics)
        if wants_checkpoint or halt:
            t.save("emergency")
        note = guard.retrieval.off_note(n) if step == 0 and guard.retrieval is not None else None
        if note:
            log.info(note)
        return halt

    def _retrieval(self, backbone, step: int) -> dict:
        from dinox.observe.monitor_hook import run_retrieval

        t = self.t
        return run_retrieval(backbone, t.val_dataset, t.cfg.views.to_augment(), n=t.cfg.watch.eval_n, step=step,
                             device=t.device, autocast_dtype=t.autocast_dtype, metrics=t.metrics,
                             on_training_split=t.val_dataset is t.dataset)

    def _probe(self, backbone, step: int) -> None:
        from dinox.observe.monitor_hook import run_probe

        t = self.t
        run_probe(backbone, t.cfg, step=step, device=t.device, metrics=t.metrics)

    def _monitor(self, backbone, step: int, steps_per_s: float, samples_per_s: float) -> None:
        from dinox.observe.monitor_hook import run_monitor

        t = self.t
        run_monitor(backbone, t.val_dataset or t.dataset, t.run_dir, step, t.device,
                    augment_cfg=t.cfg.views.to_augment(), out_dim=t.cfg.model.out_dim, steps_per_s=steps_per_s,
                    samples_per_s=samples_per_s, autocast_dtype=t.autocast_dtype)
