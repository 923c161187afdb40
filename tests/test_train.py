"""End-to-end trainer runs on a tiny model: step accounting, exact resume, signals, mismatch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_support import losses, only_run, processed_root, read_metrics, train_args  # noqa: F401
from dinox.cli import main
from dinox.run.checkpoint import load_checkpoint


def final_weights(run_dir: Path) -> dict:
    final = sorted(run_dir.glob("checkpoint_final_*.pth"))[-1]
    return load_checkpoint(final)


def tensors(obj, prefix: str = "") -> dict[str, object]:
    """Every leaf of a checkpoint by its path (tensors and plain values)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(tensors(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, value in enumerate(obj):
            out.update(tensors(value, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


# What legitimately differs between an uninterrupted and a resumed run.
RUN_SPECIFIC = ("provenance.", "config.resume", "config.out")


def assert_same_state(a: dict, b: dict) -> None:
    """Every tensor and value of two checkpoints equal: networks, optimizer moments, centre,
    RNG states, data position, anomaly history."""
    flat_a, flat_b = tensors(a), tensors(b)
    keys = {k for k in flat_a.keys() | flat_b.keys() if not k.startswith(RUN_SPECIFIC)}
    assert {k for k in flat_a if k in keys} == {k for k in flat_b if k in keys}
    different = []
    for key in sorted(keys):
        x, y = flat_a[key], flat_b[key]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            different.append(key)
    assert not different, f"{len(different)} of {len(keys)} entries differ: {different[:8]}"


def test_steps_are_optimizer_steps_with_accumulation(processed_root, tmp_path):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "3", "--accumulation-steps", "2",
                           "--batch-size", "4", "--num-workers", "0")) == 0
    run = only_run(out)
    assert sorted(losses(run)) == [1, 2, 3]
    state = final_weights(run)
    assert state["step"] == 3
    assert state["data"]["consumed"] == 3 * 2 * 4  # 3 optimizer steps x 2 micro-batches x 4 samples
    assert {p.name for p in run.glob("checkpoint_*.pth")} == {"checkpoint_00000003.pth", "checkpoint_final_00000003.pth"}
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["accumulation_steps"] == 2 and config["effective_batch"] == 8
    assert config["provenance"]["data_manifest_hash"]
    assert "git_commit" in config["provenance"]
    assert (run / "train.log").read_text().count("effective 8") == 1


@pytest.mark.parametrize("workers,accumulation", [(0, 1), (1, 2)])
def test_resume_is_bitwise_exact(processed_root, tmp_path, workers, accumulation):
    common = ("--batch-size", "4", "--accumulation-steps", str(accumulation), "--num-workers", str(workers),
              "--ckpt-every", "2")
    straight = tmp_path / "straight"
    assert main(train_args(processed_root, straight, "--max-steps", "4", *common)) == 0
    # The same 4-step run, stopped after step 2 and resumed: same schedule, same data order.
    split = tmp_path / "split"
    assert main(train_args(processed_root, split, "--max-steps", "4", *common)) == 0
    run = only_run(split)
    for path in run.glob("checkpoint_*0004.pth*"):
        path.unlink()
    (run / "checkpoint_final_00000004.pth").unlink(missing_ok=True)
    assert main(train_args(processed_root, split, "--max-steps", "4", "--resume",
                           str(run / "checkpoint_00000002.pth"), *common)) == 0
    assert_same_state(final_weights(only_run(straight)), final_weights(run))
    assert losses(only_run(straight)) == losses(run)


@pytest.mark.parametrize("precision", [(), ("--amp",)], ids=["fp32", "amp"])
def test_resume_is_exact_with_drop_path_local_crops_and_accumulation(processed_root, tmp_path, precision):
    """The big presets' settings: drop path on (it draws from the global torch RNG), local
    crops, accumulation, and bf16 autocast as they train. The resumed run's final checkpoint
    equals the uninterrupted one in every tensor, RNG states included, so a further
    continuation would not diverge either."""
    # a frozen Gram snapshot (taken at the warm-up's end, step 2) crosses the resume, as on the big presets
    common = ("--batch-size", "4", "--accumulation-steps", "2", "--drop-path", "0.1", "--local-crops", "2",
              "--local-size", "16", "--ckpt-every", "3", "--max-steps", "6", "--gram-refresh-every", "100",
              *precision)
    straight = tmp_path / "straight"
    assert main(train_args(processed_root, straight, *common)) == 0
    split = tmp_path / "split"
    assert main(train_args(processed_root, split, *common)) == 0
    run = only_run(split)
    for path in run.glob("checkpoint_*0006.pth*"):  # periodic and final of step 6, and their records
        path.unlink()
    assert main(train_args(processed_root, split, *common, "--resume", "auto")) == 0
    assert_same_state(final_weights(only_run(straight)), final_weights(run))
    assert losses(only_run(straight)) == losses(run)


def _as_from_a_terminal() -> None:
    """The child's stop signals as a terminal launch leaves them: this suite may itself run
    as a background job, whose SIGINT (or under nohup, SIGHUP) the run would then ignore."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _spawn(args: list[str], new_group: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dinox.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True, start_new_session=new_group,
                            preexec_fn=_as_from_a_terminal)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early (rc={proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_sigkill_after_checkpoint_then_resume_auto_is_exact(processed_root, tmp_path):
    common = ("--batch-size", "8", "--num-workers", "1", "--ckpt-every", "2", "--max-steps", "10")
    straight = tmp_path / "straight"
    assert main(train_args(processed_root, straight, *common)) == 0

    killed = tmp_path / "killed"
    proc = _spawn(train_args(processed_root, killed, *common))
    _wait_for(lambda: any(killed.glob("*/checkpoint_00000002.pth.sha256")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(killed)
    assert not list(run.glob("checkpoint_final_*")), "the run finished before it could be killed"
    assert main(train_args(processed_root, killed, *common, "--resume", "auto")) == 0
    assert_same_state(final_weights(only_run(straight)), final_weights(run))
    assert losses(only_run(straight)) == losses(run)


@pytest.mark.parametrize("sig,code,workers", [(signal.SIGTERM, 0, 0), (signal.SIGINT, 130, 0), (signal.SIGTERM, 0, 1),
                                              (signal.SIGUSR1, 0, 0), (signal.SIGHUP, 0, 0)])
def test_signal_saves_and_resume_auto_continues(processed_root, tmp_path, sig, code, workers):
    """With a DataLoader worker the signal goes to the whole process group, as `timeout`,
    `kill -- -PGID` and schedulers send it: the worker must not die before the save."""
    out = tmp_path / "runs"
    proc = _spawn(train_args(processed_root, out, "--batch-size", "4", "--num-workers", str(workers),
                             "--ckpt-every", "1000"), new_group=workers > 0)
    _wait_for(lambda: any(out.glob("*/metrics.jsonl")) and len(read_metrics(only_run(out))) >= 2, proc)
    if workers:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, output
    run = only_run(out)
    saved = sorted(run.glob("checkpoint_0*.pth"))
    assert len(saved) == 1, output
    step = load_checkpoint(saved[0])["step"]
    assert step >= 2
    assert main(train_args(processed_root, out, "--batch-size", "4", "--num-workers", "0",
                           "--max-steps", str(step + 1), "--resume", "auto")) == 0
    assert max(losses(run)) == step + 1
    assert load_checkpoint(run / f"checkpoint_final_{step + 1:08d}.pth")["step"] == step + 1


def test_ctrl_c_during_the_last_step_finishes_and_still_exits_130(processed_root, tmp_path, monkeypatch):
    """The run finishes its last step and writes its final checkpoint, and the exit code
    still says it was interrupted, so that `dinox train ... && next-command` stops."""
    from dinox.train.loop import Trainer

    step_once = Trainer.train_step

    def last_step_interrupted(self, *args, **kwargs):
        result = step_once(self, *args, **kwargs)
        if self.progress.step == 1:  # inside step 2 of 2
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", last_step_interrupted)
    out = tmp_path / "runs"
    # Python's own Ctrl+C handler, as a terminal launch has it: run as a background job, this
    # suite starts with SIGINT ignored, and the run keeps an ignored signal ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(train_args(processed_root, out, "--batch-size", "4", "--max-steps", "2")) == 130
    finally:
        signal.signal(signal.SIGINT, before)
    assert load_checkpoint(only_run(out) / "checkpoint_final_00000002.pth")["step"] == 2


def test_demo_with_a_loader_worker_exits_when_done(tmp_path):
    """The DataLoader worker leaves the process group (so a group-wide stop signal spares
    it), and a worker still alive at exit must not keep the process waiting: the demo (one
    training step) ends promptly. Run as `python -m dinox`, with a folder of the user's own
    beside the run folders (the demo finds its run among run folders only)."""
    (tmp_path / "demo" / "runs" / "zz_backup").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "dinox", "demo", "--patients", "2", "--slices", "3",
                             "--size", "32", "--steps", "1", "--eval-n", "4", "--num-workers", "1", "--no-probe",
                             "--root", str(tmp_path / "demo")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the demo did not exit after its last step") from None
    assert "[demo] TensorBoard" in output and proc.returncode in (0, 2), output


def test_resume_with_other_model_shape_names_fields_and_flags(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "1", "--batch-size", "4")) == 0
    args = train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4", "--resume", "auto")
    args[args.index("--vit-dim") + 1] = "96"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "vit_dim: checkpoint 64, requested 96" in err
    assert "--vit-dim 64" in err and "--config vit-tiny" in err
    assert "Traceback" not in err


def test_resume_logs_changed_free_settings(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "1", "--batch-size", "4")) == 0
    capsys.readouterr()
    assert main(train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4",
                           "--log-every", "2", "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "changed on resume: log_every: 1 -> 2" in printed
    assert "changed on resume: max_steps: 1 -> 2" in printed


@pytest.mark.parametrize("damage", ["delete", "cut"])
def test_resume_says_when_metrics_rows_are_missing(processed_root, tmp_path, capsys, damage):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "4", "--batch-size", "4", "--ckpt-every", "4")) == 0
    run = only_run(out)
    metrics = run / "metrics.jsonl"
    if damage == "delete":
        metrics.unlink()
    else:
        kept = metrics.read_text().splitlines(keepends=True)[:2]
        metrics.write_text("".join(kept))
    capsys.readouterr()
    assert main(train_args(processed_root, out, "--max-steps", "6", "--batch-size", "4", "--resume", "auto")) == 0
    printed = "".join(capsys.readouterr())
    held = "no rows" if damage == "delete" else f"rows only up to step {json.loads(kept[-1])['step']}"
    assert f"metrics.jsonl holds {held} but the checkpoint is at step 4" in printed
    assert [row["step"] for row in read_metrics(run)][-2:] == [5, 6]
    capsys.readouterr()
    assert main(train_args(processed_root, out, "--max-steps", "7", "--batch-size", "4", "--resume", "auto")) == 0
    assert "rows between are missing" not in "".join(capsys.readouterr())   # an intact file: no warning


def test_nonfinite_loss_halts_with_emergency_checkpoint(processed_root, tmp_path, monkeypatch, capsys):
    from dinox.train import loop

    original = loop.Trainer.train_step

    def poisoned(self, micro_batches, sched):
        if self.progress.step == 2:
            micro_batches = (stacks.float() * float("nan") for stacks in micro_batches)
        return original(self, micro_batches, sched)

    monkeypatch.setattr(loop.Trainer, "train_step", poisoned)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "5", "--batch-size", "4", "--accumulation-steps", "2",
                           "--ckpt-every", "2")) == loop.EXIT_NONFINITE
    printed = capsys.readouterr().out
    assert "last valid loss" in printed and "grad norm" in printed and "batch non-finite values" in printed
    assert "training halted" in printed and "resume with a change (a lower --lr" in printed  # what to do
    run = only_run(out)
    emergency = load_checkpoint(run / "checkpoint_emergency_00000002.pth")
    assert emergency["step"] == 2  # the state before the bad update (step 3)
    periodic = load_checkpoint(run / "checkpoint_00000002.pth")  # --ckpt-every 2: saved right after step 2
    assert emergency["data"]["consumed"] == periodic["data"]["consumed"] == 2 * 2 * 4
    assert torch.equal(emergency["dino_loss"]["center"], periodic["dino_loss"]["center"])
    assert torch.equal(emergency["aug_generator"], periodic["aug_generator"])
    assert all(torch.isfinite(v).all() for v in emergency["student"].values() if v.is_floating_point())
    assert not list(run.glob("checkpoint_final_*"))
    # A requeue with nothing changed would replay the same NaN: refused, saying what to change.
    again = train_args(processed_root, out, "--max-steps", "5", "--batch-size", "4", "--accumulation-steps", "2",
                       "--ckpt-every", "2", "--resume", "auto")
    capsys.readouterr()
    assert main(again) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite step 3" in err and "checkpoint_00000002.pth" in err, err
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert main([*again, "--lr", "4e-4"]) == 0  # with a change it resumes (and, unpoisoned, finishes)
    assert (run / "checkpoint_final_00000005.pth").is_file()


def test_loss_spike_warns_and_continues(processed_root, tmp_path, monkeypatch, capsys):
    from dinox.train import loop

    original = loop.Trainer.train_step

    def spiking(self, micro_batches, sched):
        result = original(self, micro_batches, sched)
        if self.progress.step == 11:
            result.metrics["loss"] *= 10
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", spiking)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "13", "--batch-size", "4")) == 0
    printed = capsys.readouterr().out
    assert "loss spike at step 12" in printed
    assert max(losses(only_run(out))) == 13


def test_collapse_saves_emergency_checkpoint(processed_root, tmp_path, monkeypatch, capsys):
    from dinox.train import loop

    original = loop.Trainer.train_step

    def collapsing(self, micro_batches, sched):
        result = original(self, micro_batches, sched)
        result.metrics["embedding_std"] = 0.5 if self.progress.step < 3 else 1e-5
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", collapsing)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "14", "--batch-size", "4")) == 0
    printed = capsys.readouterr().out
    assert printed.lower().count("feature collapse") == 1
    # the guard judges the mean of the last 10 readings: steps 1-3 read 0.5, so the first
    # window of collapsed readings only (steps 4-13) ends at step 13
    assert [p.name for p in only_run(out).glob("checkpoint_emergency_*.pth")] == ["checkpoint_emergency_00000013.pth"]


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--config", "vit-tiny", "--device", "cpu", "--max-steps", "1",
                 "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1


def test_eval_without_a_validation_split_says_it_scores_the_training_split(processed_root, tmp_path, capsys):  # noqa: F811
    """A manifest with no val series (prep --val-fraction 0) runs; its in-training eval is
    marked as scoring slices the run trains on, in the printed line and in metrics.jsonl."""
    manifest = next((processed_root / "_splits").glob("*.json"))
    split = json.loads(manifest.read_text())
    everything = tmp_path / "all_train.json"
    everything.write_text(json.dumps({"train": split["train"] + split["val"], "val": []}))
    argv = train_args(processed_root, tmp_path / "runs", "--max-steps", "2", "--batch-size", "4",
                      "--eval-every", "2", "--eval-n", "16")
    argv[argv.index("--split-manifest") + 1] = str(everything)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(on the training split: the run has no validation split)" in out
    rows = [r for r in read_metrics(only_run(tmp_path / "runs")) if "Eval/Retrieval_Ratio" in r]
    assert rows and all(r.get("Eval/On_Training_Split") == 1.0 for r in rows)


def test_a_batch_larger_than_the_training_data_is_refused_before_any_step(processed_root, tmp_path, capsys):
    """The endless stream would fill each batch with repeats of the same slices, silently;
    the run is refused in one line naming the most that fits, and leaves no run folder."""
    from dinox.data.dataset import CTSliceDataset

    manifest = next((processed_root / "_splits").glob("*.json"))
    slices = len(CTSliceDataset(processed_root, "train", manifest))
    out = tmp_path / "runs"
    code = main(train_args(processed_root, out, "--max-steps", "1", "--batch-size", str(slices + 1)))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--batch-size {slices + 1} is more than the {slices} training slices" in err
    assert f"give --batch-size {slices} or less" in err
    assert not out.exists() or not any(out.iterdir())


def test_the_loader_workers_are_stopped_when_the_loop_ends(processed_root, tmp_path, monkeypatch):
    """Not left to the garbage collector: a frame of the loop can outlive it (through a
    traceback a plotting library keeps), and the workers then never get the stop message."""
    from dinox.train.loop import Trainer

    seen = []
    release = Trainer.release

    def check(self):
        seen.append([w.is_alive() for w in self.batches._workers])
        release(self)

    monkeypatch.setattr(Trainer, "release", check)
    assert main(train_args(processed_root, tmp_path / "runs", "--batch-size", "4", "--num-workers", "1",
                           "--max-steps", "4", "--monitor-every", "2")) == 0
    assert seen == [[False]]


def test_the_monitor_runs_at_the_last_step_of_a_run_shorter_than_its_cadence():
    """The seeds' 384-step validation run at the default --monitor-every 1000 left no heatmaps,
    health report or loss curve (the guide's "monitoring outputs SHALL be saved for Phase 6a").
    The last step of a finite run is monitored; an unlimited run and --monitor-every 0 are not."""
    from types import SimpleNamespace

    from dinox.train.checks import InTrainingChecks

    def due(step, max_steps, every=1000):
        cfg = SimpleNamespace(watch=SimpleNamespace(eval_every=0, probe_every=0, monitor_every=every),
                              optim=SimpleNamespace(max_steps=max_steps))
        return InTrainingChecks(SimpleNamespace(cfg=cfg)).due(step)["monitor"]

    assert due(384, 384) and not due(383, 384) and not due(100, 384)
    assert due(1000, 5000) and due(5000, 5000) and due(1500, 1500) and not due(1400, 1500)
    assert not due(384, None) and due(1000, None)
    assert not due(384, 384, every=0)
