from __future__ import annotations


import math

import pytest
import torch

from dinox.observe.anomaly import Anomaly, AnomalyGuard, nonfinite_diagnostics


def feed(guard, losses, start=1):
    found = []
    for i, loss in enumerate(losses, start):
        found += guard.check(i, loss)
    return found


def test_loss_spike_needs_full_window_and_reports_history():
    guard = AnomalyGuard(spike_factor=2.0, window=10)
    assert feed(guard, [1.0, 5.0]) == []  # window not full yet: no verdict
    guard = AnomalyGuard(spike_factor=2.0, window=10)
    assert feed(guard, [1.0] * 10) == []
    assert guard.check(11, 1.99) == []
    found = guard.check(12, 2.5)
    assert len(found) == 1
    spike = found[0]
    assert (spike.kind, spike.severity, spike.step) == ("loss_spike", "warning", 12)
    assert "step 12" in spike.message and "history=[1.0000" in spike.message and "1.9900" in spike.message
    assert spike.context["history"][-1] == 1.99 and len(spike.context["history"]) == 10
    assert not guard.should_halt(spike)
    assert AnomalyGuard(halt_on_anomaly=True).should_halt(spike)


def test_nonfinite_loss_is_fatal_and_kept_out_of_history():
    guard = AnomalyGuard(window=3)
    feed(guard, [2.0, 1.5])
    for bad in (float("nan"), float("inf"), float("-inf")):
        (a,) = guard.check(3, bad)
        assert (a.kind, a.severity) == ("nonfinite", "fatal")
        assert a.wants_checkpoint and guard.should_halt(a)
        assert "1.5" in a.message and "step 2" in a.message
    assert list(guard.history) == [2.0, 1.5]
    assert guard.last_good_loss == 1.5


def test_collapse_by_std_reported_once_per_episode():
    guard = AnomalyGuard(std_threshold=0.01)
    assert guard.check(1, 5.0, emb_std=0.2) == []
    (a,) = guard.check(2, 5.0, emb_std=0.001)
    assert (a.kind, a.severity) == ("collapse", "critical") and a.wants_checkpoint
    assert "0.001" in a.message and not guard.should_halt(a)
    assert guard.check(3, 5.0, emb_std=0.0005) == []  # same episode
    assert guard.check(4, 5.0) == []                  # nothing measured: state unchanged
    assert guard.collapse_active
    assert guard.check(5, 5.0, emb_std=0.05) == []    # recovered: re-armed
    assert not guard.collapse_active
    (b,) = guard.check(6, 5.0, emb_std=0.002)
    assert b.kind == "collapse" and b.step == 6


def test_std_and_rank_keep_separate_episodes_and_loss_none_skips_history():
    guard = AnomalyGuard(std_threshold=0.01, window=3)
    feed(guard, [2.0, 2.0, 2.0])
    (a,) = guard.check(4, 2.0, emb_std=0.001)
    assert guard.check(5, None, erank=50.0) == []     # a healthy eval rank does not re-arm std
    assert list(guard.history) == [2.0, 2.0, 2.0]      # loss=None leaves the history alone
    assert guard.check(6, 2.0, emb_std=0.001) == []
    (b,) = guard.check(7, None, erank=1.0)             # a newly collapsing signal is reported
    assert "effective rank 1" in b.message and "embedding std" not in b.message
    assert guard.check(8, 2.0, emb_std=0.5) == [] and guard.collapse_active  # rank still collapsed
    assert guard.check(9, None, erank=40.0) == [] and not guard.collapse_active


def test_collapse_grace_covers_the_collapsed_looking_start_only():
    guard = AnomalyGuard(std_threshold=0.01, collapse_grace_steps=100)
    assert guard.check(1, 9.0, emb_std=1e-5, erank=1.0) == []  # fresh init looks collapsed
    assert not guard.collapse_active
    assert guard.check(50, 9.0, emb_std=0.2, erank=20.0) == []
    (a,) = guard.check(60, 9.0, emb_std=0.001)                  # a fall after health: reported
    assert "embedding std" in a.message
    late = AnomalyGuard(std_threshold=0.01, collapse_grace_steps=100)
    assert late.check(99, 9.0, emb_std=1e-5) == []
    (b,) = late.check(100, 9.0, emb_std=1e-5)                   # never got off the ground
    assert b.kind == "collapse" and b.step == 100


def test_collapse_by_effective_rank_floor_and_fraction():
    guard = AnomalyGuard(rank_floor=1.5, rank_collapse_fraction=0.1)
    (a,) = guard.check(1, 5.0, erank=1.2)
    assert "floor" in a.message
    guard = AnomalyGuard(rank_floor=1.5, rank_collapse_fraction=0.1)
    assert guard.check(1, 5.0, erank=40.0) == []
    assert guard.check(2, 5.0, erank=20.0) == []
    assert guard.best_erank == 40.0
    (b,) = guard.check(3, 5.0, erank=3.9)
    assert "best 40" in b.message and b.context["best_erank"] == 40.0
    (c,) = AnomalyGuard().check(1, 5.0, emb_std=float("nan"))
    assert c.kind == "collapse"


def test_state_dict_round_trip_keeps_history_through_torch_save(tmp_path):
    guard = AnomalyGuard(window=4)
    feed(guard, [1.0, 1.0, 1.0, 1.0])
    guard.check(5, 1.0, emb_std=0.001, erank=30.0)
    path = tmp_path / "guard.pt"
    torch.save({"guard": guard.state_dict()}, path)
    state = torch.load(path, weights_only=True)["guard"]
    resumed = AnomalyGuard(window=4)
    resumed.load_state_dict(state)
    assert resumed.collapse_active and resumed.best_erank == 30.0
    (a,) = resumed.check(6, 3.0)  # history carried over: the first step after resume can spike
    assert a.kind == "loss_spike"
    fresh = AnomalyGuard(window=4)
    assert fresh.check(6, 3.0) == []


def test_nonfinite_diagnostics_formats_batch_statistics():
    batch = torch.tensor([[-1024.0, 0.0, 1000.0, float("nan")], [float("inf"), 24.0, 0.0, 0.0]])
    text = nonfinite_diagnostics(3.25, 1e-4, float("inf"), batch)
    assert "last valid loss: 3.25" in text
    assert "learning rate:   0.0001" in text
    assert "grad norm:       inf" in text
    assert "min=-1024 max=1000" in text
    assert "non-finite values: 2 of 8" in text
    int_batch = torch.zeros(2, 3, 4, 4, dtype=torch.int16)
    assert "non-finite values: 0 of 96" in nonfinite_diagnostics(None, None, None, int_batch)
    assert "last valid loss: n/a" in nonfinite_diagnostics(None, 1e-3, torch.tensor(2.0))


def test_anomaly_str_and_level():
    a = Anomaly("loss_spike", "warning", 3, "msg")
    assert str(a) == "[WARNING] loss_spike: msg"
    import logging
    assert a.level == logging.WARNING and not a.wants_checkpoint
    with pytest.raises(ValueError):
        AnomalyGuard(window=0)


def test_a_start_hovering_at_the_collapse_line_is_not_a_fall_after_health():
    # the vit-tiny start: embedding std 0.007-0.010 around the 0.01 line (issue 12's runs)
    guard = AnomalyGuard(std_threshold=0.01, collapse_grace_steps=100)
    for step, std in enumerate([0.0101, 0.0099, 0.0105, 0.0073, 0.0094, 0.0150], start=1):
        assert guard.check(step, 9.0, emb_std=std) == [], step
    assert guard.check(50, 9.0, emb_std=0.03) == []            # clearly healthy: the grace ends
    (a,) = guard.check(51, 9.0, emb_std=0.005)
    assert a.kind == "collapse"
    assert guard.check(52, 9.0, emb_std=0.012) == []           # back over the line, not past the margin
    assert guard.check(53, 9.0, emb_std=0.004) == []           # so still the same episode
    assert guard.check(54, 9.0, emb_std=0.05) == [] and not guard.collapse_active


# The trainer's per-step embedding std of the tiny recipe at batch 8 (chest seed 1, steps 70-95 of a
# healthy run whose retrieval rose from 6x to 18x chance): single readings dip under the 0.01 line.
HEALTHY_BATCH8_STDS = [0.0205, 0.0155, 0.0152, 0.0164, 0.0112, 0.0145, 0.0125, 0.0144, 0.0149, 0.0117, 0.0152,
                       0.0233, 0.0138, 0.0095, 0.0168, 0.0111, 0.0192, 0.0075, 0.0185, 0.0107, 0.0153, 0.0206]


def test_the_trainers_guard_judges_the_step_std_over_a_window_not_one_noisy_reading():
    from dinox.config import resolve
    from dinox.observe.anomaly import build_guard

    guard = build_guard(resolve({"config": "vit-tiny", "max_steps": 300}, hardware_preset="cpu").cfg)
    assert guard.collapse_grace_steps <= 110
    for step in range(100, 110):   # healthy once (a window mean at twice the line), past the grace
        assert guard.check(step, 12.0, emb_std=0.03) == []
    for step, std in enumerate(HEALTHY_BATCH8_STDS, start=110):   # single readings below the line
        assert guard.check(step, 12.0, emb_std=std) == [], (step, std)
    assert not guard.collapse_active
    found = [a for step in range(140, 152) for a in guard.check(step, 12.0, emb_std=0.004)]
    assert [a.kind for a in found] == ["collapse"]          # a sustained fall: reported, once
    assert "mean of the last 10 steps" in found[0].message
    resumed = build_guard(resolve({"config": "vit-tiny", "max_steps": 300}, hardware_preset="cpu").cfg)
    resumed.load_state_dict(guard.state_dict())
    assert list(resumed.std_readings) == list(guard.std_readings) and resumed.collapse_active


def test_spike_and_collapse_messages_say_what_to_try_for_the_runs_settings():
    from dinox.config import resolve
    from dinox.observe.anomaly import build_guard

    cfg = resolve({"config": "vit-tiny", "max_steps": 200, "clip_grad": 0.0, "centering": "centering",
                   "center_momentum": 0.9999, "koleo_weight": 0.0}, hardware_preset="cpu").cfg
    guard = build_guard(cfg)
    (spike,) = feed(guard, [1.0] * 10 + [5.0])
    assert "training goes on" in spike.message and "--clip-grad 3, now off" in spike.message
    assert f"--lr (now {cfg.optim.lr:g})" in spike.message and "\n" not in spike.message
    (collapse,) = [a for step in range(100, 111) for a in guard.check(step, 1.0, emb_std=0.001)]
    assert "--centering sinkhorn" in collapse.message and "--center-momentum 0.9" in collapse.message
    assert "--koleo-weight" in collapse.message and "dinox monitor" in collapse.message


def test_alarms_are_marked_in_the_metrics_and_named_in_the_runs_last_line(tmp_path):
    import json
    import logging

    from dinox.observe.anomaly import respond
    from dinox.observe.metrics import MetricsLogger

    guard = AnomalyGuard(std_threshold=0.01, window=3)
    assert guard.summary() == ""
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        respond(guard, feed(guard, [1.0, 1.0, 1.0, 5.0]), logging.getLogger("test"), metrics)
        checkpoint, halt = respond(guard, guard.check(9, 1.0, emb_std=0.001), logging.getLogger("test"), metrics)
    assert checkpoint and not halt
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{**rows[0], "step": 4, "Anomaly/Loss_Spike": 1.0}, {**rows[1], "step": 9, "Anomaly/Collapse": 1.0}]
    resumed = AnomalyGuard(window=3)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.summary() == guard.summary() == ("; alarms during the run: loss_spike at step 4, collapse at step 9 "
                                                    "(train.log has what each said)")


def test_the_record_of_alarms_stays_bounded_over_a_long_run_and_reads_old_checkpoints():
    """Every alarm rides in each checkpoint's guard state: a weeks-long run's thousands of spikes
    must not grow it; the last line still counts them all and names the last."""
    guard = AnomalyGuard()
    for step in range(10, 100_010, 10):
        guard.record("loss_spike", step)
    guard.record("collapse", 7)
    assert len(str(guard.state_dict()["raised"])) < 300
    assert guard.summary() == ("; alarms during the run: loss_spike at steps 10, 20, 30, 40, 50 (+9995 more, the last "
                               "at step 100000), collapse at step 7 (train.log has what each said)")
    resumed = AnomalyGuard()
    resumed.load_state_dict(guard.state_dict())
    assert resumed.summary() == guard.summary()
    old = AnomalyGuard()   # a checkpoint written before the bounded record: every (kind, step)
    old.load_state_dict({"raised": [["loss_spike", 4], ["collapse", 9], ["loss_spike", 12]]})
    assert old.summary() == ("; alarms during the run: loss_spike at steps 4, 12, collapse at step 9 "
                             "(train.log has what each said)")


def test_an_alarm_on_a_full_disk_still_asks_for_its_emergency_checkpoint():
    """The alarm's metrics mark meets the full disk first: raising there skipped the save
    (and, under torchrun, left rank 0 alone outside the collective save)."""
    import logging

    from dinox.observe.anomaly import respond
    from dinox.observe.metrics import MetricsUnwritable

    class FullDisk:
        def log(self, step, values):
            raise MetricsUnwritable("no space left on the device")

    guard = AnomalyGuard(std_threshold=0.01, window=3)
    assert respond(guard, guard.check(9, 1.0, emb_std=0.001), logging.getLogger("test"), FullDisk()) == (True, False)
    assert guard.raised == {"collapse": {"count": 1, "steps": [9], "last": 9}}


def test_a_jump_to_a_new_loss_level_is_one_spike_not_one_per_step():
    guard = AnomalyGuard(spike_factor=2.0, window=10)
    found = feed(guard, [1.0] * 10 + [5.0] * 6)
    assert [a.step for a in found] == [11]      # the window takes the new level in: one event
    assert "reported once until the loss is back under the line" in found[0].message
    resumed = AnomalyGuard(spike_factor=2.0, window=10)
    resumed.load_state_dict(guard.state_dict())
    assert feed(resumed, [5.0] * 3, start=17) == []
    # back under the line, then a new spike: a new episode
    assert [a.step for a in feed(resumed, [5.0] * 10 + [20.0], start=20)] == [30]


def test_a_run_parked_at_the_entropy_wall_is_one_episode_however_often_it_dips():
    """Each entropy-wall report writes an emergency checkpoint (20.5 GB for a ViT-Giant; the
    newest 3 are kept): a run left at the wall, dipping under the line for single steps (as a
    tiny CPU run at 0.99 of the wall did every 10-30 steps), must write one, not one per dip."""
    from dinox.observe.anomaly import EntropyWall

    wall, window = math.log(64), 20
    guard = AnomalyGuard(entropy_wall=EntropyWall(64, start_step=0, window=window))
    entropy = [0.97 * wall if step % 25 == 0 else 0.99 * wall for step in range(1, 2001)]
    hits = [a for step, h in enumerate(entropy, 1) if (a := guard.check_entropy(step, h)) is not None]
    assert [a.step for a in hits] == [window] and hits[0].wants_checkpoint
    state = guard.state_dict()   # the episode survives a resume
    resumed = AnomalyGuard(entropy_wall=EntropyWall(64, start_step=0, window=window))
    resumed.load_state_dict(state)
    assert resumed.check_entropy(2001, 0.99 * wall) is None
    # off the wall for a whole window: a later return to it is a new episode, reported again
    for step in range(2002, 2002 + window):
        assert resumed.check_entropy(step, 0.5 * wall) is None
    again = [resumed.check_entropy(step, 0.99 * wall) for step in range(2002 + window, 2002 + 2 * window)]
    assert [a.step for a in again if a is not None] == [2001 + 2 * window]


def test_a_run_at_the_entropy_wall_that_dips_more_often_than_the_window_is_still_reported():
    """A count of consecutive steps at the wall, reset by any dip, never reached a window of 50
    on a run that dips under the line every 10 steps: the mean over the window is judged."""
    from dinox.observe.anomaly import EntropyWall

    wall = math.log(64)
    guard = AnomalyGuard(entropy_wall=EntropyWall(64, start_step=0, window=50))
    entropy = [0.97 * wall if step % 10 == 0 else 0.99 * wall for step in range(1, 1001)]
    hits = [a for step, h in enumerate(entropy, 1) if (a := guard.check_entropy(step, h)) is not None]
    assert [a.step for a in hits] == [50] and "averaged 4.1" in hits[0].message
    # a run that learns dips under the line and stays there: never reported
    learning = AnomalyGuard(entropy_wall=EntropyWall(64, start_step=0, window=50))
    falling = [wall * max(0.5, 1.0 - step / 400) for step in range(1, 1001)]
    assert all(learning.check_entropy(step, h) is None for step, h in enumerate(falling, 1))



def test_a_spike_does_not_lift_the_line_that_finds_the_next():
    """With the mean, one spike of 100 among losses of 10 put the line at 38 for ten steps,
    and a loss of 25 (2.5x the level) passed unreported."""
    guard = AnomalyGuard(spike_factor=2.0, window=10)
    for step in range(1, 11):
        assert guard.check(step, 10.0) == []
    (first,) = guard.check(11, 100.0)
    assert first.kind == "loss_spike" and "the median 10.0000" in first.message
    assert guard.check(12, 10.0) == []
    assert [a.kind for a in guard.check(15, 25.0)] == ["loss_spike"]


def test_a_step_undone_for_its_gradient_leaves_the_loss_history_alone():
    guard = AnomalyGuard(spike_factor=2.0, window=10)
    for step in range(1, 11):
        guard.check(step, 5.0)
    history = list(guard.history)
    anomaly = guard.nonfinite(11, 14.0, grad_norm=float("inf"))
    assert anomaly.kind == "nonfinite" and anomaly.severity == "fatal"
    assert anomaly.message.startswith("gradient norm is inf (loss 14.0000) at step 11; last valid loss 5.0 at step 10")
    assert list(guard.history) == history and (guard.last_good_loss, guard.last_good_step) == (5.0, 10)
    assert guard.nonfinite(11, float("nan")).message.startswith("loss is nan at step 11")


def test_not_learning_compares_with_chance_where_identical_untrained_tokens_read_worse():
    """Ties count against the query: untrained tokens that are all alike read ~2x chance, and a
    run that ranks no better than chance was under 0.6 x that line."""
    from dinox.observe.anomaly import RetrievalProgress
    progress = RetrievalProgress(10)
    assert progress.check(0, 480.0, 480) is None      # every rank n: 2x chance
    alarm = progress.check(20, 239.4, 480)           # chance itself
    assert alarm is not None and alarm.kind == "not_learning"
