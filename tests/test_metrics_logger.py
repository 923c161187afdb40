from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dinox.observe.metrics import MetricsLogger, format_progress, tensorboard_tag


def read_lines(path):
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def test_log_writes_jsonl_with_nulls_for_nonfinite(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 3.5, "lr": torch.tensor(1e-4), "loss_dino": float("nan"),
                       "grad_norm": float("inf"), "note": "warmup"})
        logger.log(2, {"loss": 3.25})
    recs = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    first = recs[0]
    assert first["loss"] == 3.5 and first["lr"] == pytest.approx(1e-4)
    assert first["loss_dino"] is None and first["grad_norm"] is None
    assert first["note"] == "warmup"
    assert first["time"] > 1.6e9 and first["wall"] >= 0
    assert recs[1]["wall"] >= first["wall"]


def test_tensorboard_tags_read_back(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in (10, 20):
            logger.log(step, {"loss": 3.0 / step, "loss_dino": 2.0, "entropy_teacher": 8.9,
                              "lr": 1e-4, "loss_koleo": float("nan")})
        logger.log(20, {"top1": 0.5, "Custom/Tag": 1.0}, prefix="Val")
    acc = scalar_tags(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"Train/Loss", "Train/Loss_DINO", "Train/Entropy_Teacher", "Train/LR",
            "Val/Top1", "Custom/Tag"} <= tags
    assert "Train/Loss_KoLeo" not in tags  # a non-finite value is not a scalar point
    loss = acc.Scalars("Train/Loss")
    assert [e.step for e in loss] == [10, 20]
    assert loss[1].value == pytest.approx(0.15)


def test_tag_naming():
    assert tensorboard_tag("loss") == "Train/Loss"
    assert tensorboard_tag("loss_gram", "Train") == "Train/Loss_Gram"
    assert tensorboard_tag("entropy_student") == "Train/Entropy_Student"
    assert tensorboard_tag("Val/ratio") == "Val/ratio"


def test_resume_truncates_and_appends(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # partial line of a crashed write
    # TensorBoard orders event files by name (creation second, host, pid, a per-process counter);
    # a real resume is a later process, so let the clock move on as it would.
    time.sleep(1.1)
    with MetricsLogger(tmp_path, elapsed_offset=100.0) as logger:
        assert logger.truncate_after(3) == 3
        logger.log(4, {"loss": 40.0})
    recs = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["loss"] == 40.0 and recs[-1]["wall"] >= 100.0
    steps = [(e.step, e.value) for e in scalar_tags(tmp_path).Scalars("Train/Loss")]
    assert steps == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # one events file per launch: the resume opened no writer before it knew its purge step
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2


def test_records_survive_a_crash(tmp_path):
    code = textwrap.dedent(f"""
        import os
        from dinox.observe.metrics import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r}, tensorboard=False)
        logger.log(1, {{"loss": 2.0}})
        logger.log(2, {{"loss": 1.5}})
        os._exit(3)
    """)
    res = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert res.returncode == 3
    assert [r["loss"] for r in read_lines(tmp_path / "metrics.jsonl")] == [2.0, 1.5]


def test_non_main_rank_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, is_main=False) as logger:
        logger.log(1, {"loss": 1.0})
        assert logger.truncate_after(0) == 0
    assert not run.exists()


def test_format_progress():
    line = format_progress(100, {"loss": 3.45213, "lr": 1.2e-4, "steps_per_s": 1.234,
                                 "samples_per_s": 78.71, "elapsed": 81.29})
    assert line == "step=   100 loss=3.4521 lr=1.2e-04 steps/s=1.23 samples/s=78.7 elapsed=81.3s"
    assert format_progress(7, {"loss": float("nan")}) == "step=     7 loss=nan"
    extra = format_progress(5, {"loss": 1.0, "mem_peak_gb": 9.8765}, extra=["mem_peak_gb", "absent"])
    assert extra == "step=     5 loss=1.0000 mem_peak_gb=9.877"


def test_run_header_names_the_objective():
    from dinox.config import resolve
    from dinox.observe.metrics import run_header

    def objective(flags):
        cfg = resolve(flags, hardware_preset="cpu", device_kind="cpu").cfg
        lines = run_header(cfg, world_size=1, samples=10, params=(1, 1), autocast_dtype=None)
        return next(line for line in lines if line.startswith("objective:"))

    assert objective({"config": "vit-tiny"}) == (
        "objective: DINO over 1024 prototypes (fixed norms), Sinkhorn-Knopp targets, teacher temperature 0.02 flat, "
        "student 0.1 | iBOT 1 | KoLeo 0.005 | dense 1 (temperature 0.2)")
    assert objective({"config": "vit-tiny", "dense_weight": 0.0}).endswith("| KoLeo 0.005 | dense off")
    assert objective({"config": "vit-tiny", "dense_teacher_scale": 2}).endswith(
        "| dense 1 (temperature 0.2, teacher keys at 2x)")
    warmed = objective({"config": "vit-tiny", "centering": "centering", "teacher_temp_start": 0.04,
                        "teacher_temp": 0.07, "teacher_temp_warmup_steps": 30})
    assert "EMA-centred targets (centre momentum 0.9), teacher temperature 0.04 -> 0.07 over 30 steps" in warmed


def test_tensorboard_thread_errors_are_left_to_the_main_threads_one_line(tmp_path, monkeypatch):
    """TensorBoard's writer thread re-raises a failed write in the main thread, where the run
    answers it in one line; its own traceback is not printed. Other threads' errors are."""
    import threading
    from types import SimpleNamespace

    from dinox.observe import metrics

    passed = []
    monkeypatch.setattr(metrics, "_other_excepthook", passed.append)
    MetricsLogger(tmp_path).close()
    assert threading.excepthook is metrics._tensorboard_thread_hook

    class _AsyncWriterThread(threading.Thread):
        pass

    full = SimpleNamespace(thread=_AsyncWriterThread(), exc_value=OSError(28, "No space left on device"))
    other = SimpleNamespace(thread=threading.Thread(), exc_value=OSError(28, "No space left on device"))
    threading.excepthook(full)
    threading.excepthook(other)
    assert passed == [other]
