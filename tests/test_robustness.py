"""Defects found by trying to break a run (issue 16): branching from an older checkpoint,
choosing the run to resume, the run-folder lock, checkpoints without their sha256 record,
hostile or damaged processed roots, disk space, plain command-line mistakes, a changed data
manifest and the ETA of the progress line."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_support import losses, only_run, processed_root, read_metrics, train_args  # noqa: F401
from dinox.cli import main
from dinox.data.dataset import CTSliceDataset
from dinox.errors import UserError
from dinox.observe.metrics import format_progress
from dinox.run import checkpoint as ck
from dinox.run.checkpoint import (
    checkpoint_path,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    sidecar_path,
    verify_checkpoint,
)
from test_train import _spawn, _wait_for, assert_same_state, final_weights

FAST = ("--batch-size", "4", "--num-workers", "0", "--ckpt-every", "2")


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def inspect_state(step: int, weight: torch.Tensor | None = None) -> dict:
    """A small checkpoint with the entries `dinox inspect` requires."""
    w = weight if weight is not None else torch.full((4, 4), 0.5)
    return {"format": "dinox-checkpoint", "format_version": 1, "step": step,
            "student": {"backbone.w": w.clone()}, "teacher": {"backbone.w": w.clone()},
            "config": {"config": "vit-tiny"}}


# ----------------------------------------------------------------------------- 1. branching

def test_resume_from_older_checkpoint_starts_a_new_run_and_leaves_the_source_untouched(processed_root, tmp_path):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "4", *FAST)) == 0
    source = only_run(out)
    before = folder_digest(source)
    older = source / "checkpoint_00000002.pth"
    older_sha = hashlib.sha256(older.read_bytes()).hexdigest()

    assert main(train_args(processed_root, out, "--max-steps", "4", *FAST, "--resume", str(older))) == 0
    assert folder_digest(source) == before  # not a byte of the source run changed
    branch = next(p for p in run_dirs(out) if p != source)
    expected = {"run": str(source.resolve()), "step": 2, "sha256": older_sha}
    config = json.loads((branch / "config.json").read_text())
    recorded = config["provenance"]["resumed_from"]
    assert {k: recorded[k] for k in expected} == expected
    final = final_weights(branch)
    assert {k: final["provenance"]["resumed_from"][k] for k in expected} == expected
    # The branch's record is complete: the source's rows up to the step, then its own.
    assert sorted(losses(branch)) == [1, 2, 3, 4]
    assert [r for r in read_metrics(branch) if r["step"] <= 2] == [r for r in read_metrics(source) if r["step"] <= 2]
    # Same schedule, same data from step 2: the branch ends where the source ended.
    assert_same_state(final_weights(source), final)

    # --resume auto continues the run saved into last (the branch), in place.
    assert main(train_args(processed_root, out, "--max-steps", "6", *FAST, "--resume", "auto")) == 0
    assert len(run_dirs(out)) == 2
    assert (branch / "checkpoint_final_00000006.pth").is_file()
    assert sorted(losses(branch)) == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(branch / "checkpoint_final_00000006.pth")["provenance"]["resumed_from"]["step"] == 2
    assert folder_digest(source) == before


def test_resume_from_a_backup_folder_writes_under_out(processed_root, tmp_path):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "2", *FAST)) == 0
    backup = tmp_path / "backup"
    backup.mkdir()
    run = only_run(out)
    for name in ("checkpoint_00000002.pth", "checkpoint_00000002.pth.sha256", "checkpoint_final_00000002.pth"):
        shutil.copy2(run / name, backup / name)
    before = folder_digest(backup)
    elsewhere = tmp_path / "runs2"
    assert main(train_args(processed_root, elsewhere, "--max-steps", "4", *FAST, "--ckpt-keep-last", "1",
                           "--resume", str(backup / "checkpoint_00000002.pth"))) == 0
    assert folder_digest(backup) == before
    branch = only_run(elsewhere)
    assert (branch / "checkpoint_final_00000004.pth").is_file()
    recorded = json.loads((branch / "config.json").read_text())["provenance"]["resumed_from"]
    assert recorded["run"] == str(backup.resolve()) and recorded["step"] == 2


# ----------------------------------------------------------------------------- 2. which run

def _tiny_checkpoint(run: Path, step: int, saved_at: float) -> Path:
    path = checkpoint_path(run, step)
    save_checkpoint(path, {"step": step, "w": torch.ones(3)})
    os.utime(path, (saved_at, saved_at))
    return path


def test_resume_auto_chooses_the_run_saved_into_last_not_the_newest_name(tmp_path):
    now = time.time()
    # After a time-zone change the newer run got the earlier-sorting name.
    older_work = tmp_path / "20260102_090000"
    newer_work = tmp_path / "20260102_080000"
    _tiny_checkpoint(older_work, 500, now - 7200)
    latest = _tiny_checkpoint(newer_work, 40, now - 60)
    assert find_resume_checkpoint(tmp_path) == latest
    assert ck._runs_by_last_save(tmp_path) == [newer_work, older_work]


# ----------------------------------------------------------------------------- 3. the lock

def _hold_lock(run: Path) -> subprocess.Popen:
    code = ("import sys, time; from dinox.run import checkpoint; "
            f"lock = checkpoint.lock_run_dir({str(run)!r}); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_on_a_run_folder_is_refused_naming_the_holder(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "2", *FAST)) == 0
    run = only_run(out)
    assert not (run / ck.LOCK_NAME).exists()  # released at the end of the run
    before = folder_digest(run)
    holder = _hold_lock(run)
    try:
        capsys.readouterr()
        assert main(train_args(processed_root, out, "--max-steps", "4", *FAST, "--resume", "auto")) == 1
        err = one_line_error(capsys)
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "in use" in err
        assert str(run / ck.LOCK_NAME) in err
        assert folder_digest(run) == {**before, ck.LOCK_NAME: folder_digest(run)[ck.LOCK_NAME]}
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock is stale: the next launch takes it over and continues.
    assert main(train_args(processed_root, out, "--max-steps", "4", *FAST, "--resume", "auto")) == 0
    assert (run / "checkpoint_final_00000004.pth").is_file()
    assert not (run / ck.LOCK_NAME).exists()


def test_resume_auto_does_not_start_beside_a_live_run_without_checkpoints(processed_root, tmp_path, capsys):
    """A job launched twice (or a requeue racing its predecessor) before the first checkpoint:
    the second `--resume auto` finds nothing to resume, and must not start a parallel run."""
    out = tmp_path / "runs"
    first = ck.new_run_dir(out)
    holder = _hold_lock(first)
    try:
        capsys.readouterr()
        assert main(train_args(processed_root, out, "--max-steps", "2", *FAST, "--resume", "auto")) == 1
        err = one_line_error(capsys)
        assert f"pid {holder.pid}" in err and str(first) in err and "parallel run" in err
        assert run_dirs(out) == [first]
        # Without --resume auto a new run is what was asked for: it starts beside the live one.
        assert main(train_args(processed_root, out, "--max-steps", "2", *FAST)) == 0
        assert len(run_dirs(out)) == 2
    finally:
        holder.kill()
        holder.wait()


def test_a_training_process_holds_its_folder(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    proc = _spawn(train_args(processed_root, out, "--batch-size", "4", "--num-workers", "0", "--ckpt-every", "1",
                             "--ckpt-keep-last", "100000", "--max-steps", "100000"))  # nothing rotated away
    try:
        _wait_for(lambda: any(out.glob("*/checkpoint_00000001.pth.sha256")), proc)
        capsys.readouterr()
        # --max-steps 1: without the lock this launch would finish at once, beside the running one
        assert main(train_args(processed_root, out, "--max-steps", "1", *FAST, "--resume", "auto")) == 1
        assert f"pid {proc.pid}" in one_line_error(capsys)
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / ck.LOCK_NAME
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    with ck.lock_run_dir(tmp_path) as lock:
        assert json.loads(lock_file.read_text())["pid"] == os.getpid() == lock.holder["pid"]
        with pytest.raises(ck.RunLockedError, match=f"pid {os.getpid()}"):
            ck.lock_run_dir(tmp_path)
    assert not lock_file.exists()


# ----------------------------------------------------------------------------- 4. no record

def _flip_exponent_bit(path: Path, value: float) -> None:
    """Flip the top exponent bit of the first float32 `value` stored in `path`."""
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<f", value))
    assert at >= 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_checkpoint_without_record_is_still_checked_for_damage(tmp_path, capsys):
    weight = torch.full((64,), 0.5)
    weight[17] = 0.3141
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint(path, inspect_state(3, weight))
    sidecar_path(path).unlink()  # copied with `cp checkpoint_*.pth`
    assert verify_checkpoint(path)[0]
    _flip_exponent_bit(path, 0.3141)
    ok, reason = verify_checkpoint(path)   # the zip's own CRC-32 finds the changed bit
    assert not ok and "fails the zip's CRC-32 check" in reason
    assert main(["inspect", str(path)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    with pytest.raises(ck.CheckpointError, match="CRC-32"):
        load_checkpoint(path)

    # what the CRC cannot see: a value damaged before the save (its CRC is then right)
    weight[17] = 1.07e38
    wild = checkpoint_path(tmp_path, 5)
    save_checkpoint(wild, inspect_state(5, weight))
    sidecar_path(wild).unlink()
    ok, reason = verify_checkpoint(wild)
    assert not ok and "implausible value 1.07e+38 in" in reason and "['backbone.w']" in reason
    with pytest.raises(ck.CheckpointError, match="implausible value"):
        load_checkpoint(wild)

    incomplete = checkpoint_path(tmp_path, 4)
    state = inspect_state(4)
    del state["teacher"]
    save_checkpoint(incomplete, state)
    sidecar_path(incomplete).unlink()
    assert main(["inspect", "--json", str(incomplete)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["intact"] and "lacks the entries teacher" in report["reason"]


def test_emergency_checkpoint_with_nonfinite_weights_is_never_resumed(tmp_path, capsys, caplog):
    run = tmp_path / "20260101_000000"
    good = checkpoint_path(run, 4)
    save_checkpoint(good, inspect_state(4))
    poisoned = checkpoint_path(run, 6, "emergency")
    save_checkpoint(poisoned, inspect_state(6, torch.full((4, 4), float("nan"))))
    assert verify_checkpoint(poisoned)[0] is False  # the sha256 record matches, the weights are NaN
    with caplog.at_level(logging.WARNING, logger="dinox.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == good
    assert "non-finite" in caplog.text
    assert main(["inspect", str(poisoned)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "non-finite value (NaN or Inf) in student['backbone.w']" in out


def test_resume_path_to_nonfinite_checkpoint_is_a_one_line_error(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "2", *FAST)) == 0
    run = only_run(out)
    state = load_checkpoint(run / "checkpoint_00000002.pth")
    name = next(iter(state["student"]))
    state["student"][name] = state["student"][name].clone().fill_(float("inf"))
    bad = checkpoint_path(tmp_path / "elsewhere", 2, "emergency")
    save_checkpoint(bad, state)
    capsys.readouterr()
    assert main(train_args(processed_root, out, "--max-steps", "4", *FAST, "--resume", str(bad))) == 1
    assert "non-finite" in one_line_error(capsys)
    assert run_dirs(out) == [run]


# ----------------------------------------------------------------------------- 5, 6, 9. data

def copy_root(processed_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "processed"
    shutil.copytree(processed_root, root)
    return root


def rewrite_index(root: Path, edit) -> list[dict]:
    index = root / "_index" / "index.csv"
    with open(index, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    edit(rows)
    with open(index, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def manifest_of(root: Path) -> Path:
    return next((root / "_splits").glob("*.json"))


def train_ids(root: Path) -> list[str]:
    return json.loads(manifest_of(root).read_text())["train"]


@pytest.mark.parametrize("bad_path", ["/etc/hostname", "../outside.npy", "volumes/../../outside.npy"])
def test_index_paths_are_confined_to_the_root(processed_root, tmp_path, bad_path):
    root = copy_root(processed_root, tmp_path)
    (tmp_path / "outside.npy").write_bytes((root / "volumes" / f"{train_ids(root)[0]}.npy").read_bytes())
    victim = train_ids(root)[0]

    def point_outside(rows):
        next(r for r in rows if r["series_id"] == victim)["path"] = bad_path

    rows = rewrite_index(root, point_outside)
    line = 2 + [r["series_id"] for r in rows].index(victim)
    with pytest.raises(UserError) as info:
        CTSliceDataset(root, "train", manifest_of(root))
    message = str(info.value)
    assert f"line {line} (series {victim})" in message and "\n" not in message
    assert "absolute" in message or "leaves the processed root" in message


def _truncate(root: Path, sid: str) -> None:
    volume = root / "volumes" / f"{sid}.npy"
    volume.write_bytes(volume.read_bytes()[:-100])


def _set_slices(value: str):
    def edit(root: Path, sid: str) -> None:
        def change(rows):
            next(r for r in rows if r["series_id"] == sid)["num_slices"] = value
        rewrite_index(root, change)
    return edit


def _rewrite_volume(change):
    def edit(root: Path, sid: str) -> None:
        volume = root / "volumes" / f"{sid}.npy"
        np.save(volume, change(np.load(volume)))
    return edit


def _with_nan(vol):
    out = vol.astype(np.float32)
    out[0, 0, 0] = np.nan
    return out


@pytest.mark.parametrize("damage,expected", [
    (_truncate, "truncated"),
    (_rewrite_volume(_with_nan), "holds NaN or infinite values"),             # would train as 0 HU (water)
    (_rewrite_volume(lambda v: v.astype(np.float32) * 100), "outside the int16 HU range"),   # would wrap
    (_rewrite_volume(lambda v: v[:, ::2, ::2]), "but /"),                      # rows/cols against the index
    (_set_slices("eight"), "is not a whole number"),
    (_set_slices("5"), "holds 8 slices but"),    # fewer than the volume: data would be dropped
    (_set_slices("11"), "holds 8 slices but"),   # more: an index error hours into the run
])
def test_damaged_volume_is_named_before_training(processed_root, tmp_path, capsys, damage, expected):
    root = copy_root(processed_root, tmp_path)
    sid = train_ids(root)[0]
    damage(root, sid)
    with pytest.raises(UserError, match=expected) as info:
        CTSliceDataset(root, "train", manifest_of(root))
    assert sid in str(info.value) and "dinox prep --force" in str(info.value)
    out = tmp_path / "runs"
    capsys.readouterr()
    assert main(train_args(root, out, "--max-steps", "2", *FAST)) == 1
    err = one_line_error(capsys)
    assert expected in err and sid in err
    assert run_dirs(out) == []  # a failed start leaves no half-made run folder


def test_overlapping_split_is_refused(processed_root, tmp_path):
    root = copy_root(processed_root, tmp_path)
    manifest = manifest_of(root)
    split = json.loads(manifest.read_text())
    split["val"].append(split["train"][0])
    manifest.write_text(json.dumps(split))
    for part in ("train", "val"):
        with pytest.raises(UserError, match=f"in both train and val .e.g. {split['train'][0]}") as info:
            CTSliceDataset(root, part, manifest)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- 7. disk space

def test_disk_space_for_one_checkpoint_is_checked_at_start(processed_root, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 10_000_000, 10_000_000)  # 10 MB free

    monkeypatch.setattr(ck.shutil, "disk_usage", nearly_full)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "2", *FAST)) == 1
    err = one_line_error(capsys)
    assert "one checkpoint" in err and "--out" in err and "--ckpt-keep-last" not in err
    assert run_dirs(out) == []


def test_disk_space_warning_when_the_rotation_will_not_fit(tmp_path, monkeypatch):
    from dinox.train.runs import check_disk_space, checkpoint_tensor_bytes

    plan = {"backbone_params": 100_000_000, "head_params": 10_000_000}
    need = ck.space_needed(checkpoint_tensor_bytes(plan))
    assert checkpoint_tensor_bytes(plan) == 4 * (5 * 100_000_000 + 4 * 10_000_000)
    monkeypatch.setattr(ck, "free_space", lambda path: 3 * need + 1)
    assert check_disk_space(plan, tmp_path, keep_last=2) is None
    warning = check_disk_space(plan, tmp_path, keep_last=5)
    assert "room for about 3 more checkpoints" in warning and "lower --ckpt-keep-last to 2" in warning
    assert check_disk_space(plan, tmp_path, keep_last=5, existing=4) is None  # continued in place


# ----------------------------------------------------------------------------- 8. mistakes

def test_out_naming_a_file_is_a_one_line_error(processed_root, tmp_path, capsys):
    afile = tmp_path / "runs.txt"
    afile.write_text("not a folder")
    assert main(train_args(processed_root, afile, "--max-steps", "1", *FAST)) == 1
    assert "is a file, not a folder" in one_line_error(capsys)
    assert afile.read_text() == "not a folder"


def test_json_without_dry_run_is_an_error(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "1", "--json")) == 1
    assert "--dry-run" in one_line_error(capsys)
    assert not out.exists()


def test_dry_run_with_resume_plans_the_checkpoints_model(processed_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "1", *FAST)) == 0
    before = folder_digest(only_run(out))
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--out", str(out), "--resume", "auto", "--dry-run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["arch"]["vit_dim"] == 64 and summary["arch"]["vit_depth"] == 2  # not vit-tiny's 192 x 6
    assert folder_digest(only_run(out)) == before


# ----------------------------------------------------------------------------- 10. manifest

def test_resume_on_a_reprepped_root_warns_with_both_hashes(processed_root, tmp_path, capsys):
    root = copy_root(processed_root, tmp_path)
    out = tmp_path / "runs"
    assert main(train_args(root, out, "--max-steps", "2", *FAST)) == 0
    old = load_checkpoint(only_run(out) / "checkpoint_final_00000002.pth")["provenance"]["data_manifest_hash"]
    manifest = manifest_of(root)
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=4))  # same split, other bytes
    capsys.readouterr()
    assert main(train_args(root, out, "--max-steps", "3", *FAST, "--resume", "auto")) == 0
    new = load_checkpoint(only_run(out) / "checkpoint_final_00000003.pth")["provenance"]["data_manifest_hash"]
    assert old != new
    warning = [line for line in capsys.readouterr().out.splitlines() if "data manifest differs" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and old in warning[0] and new in warning[0]


# ----------------------------------------------------------------------------- 11. ETA

def test_progress_line_ends_with_an_eta_when_max_steps_is_set():
    metrics = {"loss": 3.45213, "lr": 1.2e-4, "steps_per_s": 2.0, "samples_per_s": 78.71, "elapsed": 81.29}
    line = format_progress(100, metrics, max_steps=7300)
    assert line == "step=   100 loss=3.4521 lr=1.2e-04 steps/s=2.00 samples/s=78.7 elapsed=81.3s eta=1h00m"
    assert format_progress(100, metrics, extra=["loss"], max_steps=100).endswith("loss=3.452 eta=0h00m")
    assert format_progress(10, {**metrics, "steps_per_s": 0.01}, max_steps=100_000).endswith("eta=2777h30m")
    assert "eta" not in format_progress(100, metrics)  # unlimited run
    assert "eta" not in format_progress(1, {"loss": 1.0}, max_steps=10)  # rate not known yet


def test_damaged_checkpoints_skipped_by_resume_are_set_aside(processed_root, tmp_path, capsys):
    """--resume auto skips a damaged newest checkpoint; once it holds the run folder it moves
    that file aside (kept, renamed .damaged), so later listings, rotation and inspect of the
    run no longer report it."""
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "4", "--ckpt-every", "2", "--ckpt-keep-last", "5",
                           *FAST)) == 0
    run = only_run(out)
    final = run / "checkpoint_final_00000004.pth"
    periodic = run / "checkpoint_00000004.pth"
    periodic.unlink()  # the final is a hard link of it: damage the final alone
    shutil.copyfile(final, periodic)
    data = bytearray(final.read_bytes())
    final.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    periodic.unlink()
    (run / "checkpoint_00000004.pth.sha256").unlink()
    assert main(train_args(processed_root, out, "--max-steps", "6", "--ckpt-every", "2", "--resume", "auto",
                           *FAST)) == 0
    names = {p.name for p in run.iterdir()}
    assert "checkpoint_final_00000004.pth" not in names and "checkpoint_final_00000004.pth.damaged" in names
    captured = capsys.readouterr()
    assert "set aside damaged checkpoint checkpoint_final_00000004.pth" in captured.out + captured.err
    assert all(verify_checkpoint(p)[0] for p in ck.list_checkpoints(run))


_STUCK_CLEANUP = """
import signal, sys, time
# as a terminal gives it (the suite may run as a background job, SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
from dinox.run.signals import interrupts_raise
with interrupts_raise():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("cleaning up", flush=True)
        time.sleep(float(sys.argv[1]))
        print("cleaned up", flush=True)
"""


@pytest.mark.parametrize("second_after,cleanup_s,code,last", [(0.3, 2.0, 0, "cleaned up"), (2.6, 60.0, 130, None)],
                         ids=["within-the-grace", "later"])
def test_a_repeated_stop_signal_is_the_same_request_at_first_and_stops_at_once_later(second_after, cleanup_s, code,
                                                                                  last):
    """`timeout` signals twice at once: the cleanup the first signal started (prep's index)
    goes on. A user who presses Ctrl-C again later, the cleanup stuck (a dead mount), gets the
    process ended with one line; it used to ignore every repeat, leaving only kill -9."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", _STUCK_CLEANUP, str(cleanup_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "cleaning up\n"
        time.sleep(second_after)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    if last:
        assert proc.returncode == code and out == f"{last}\n" and err == ""
    else:
        assert proc.returncode == code and out == ""
        assert err == "SIGINT received again: stopping at once, without finishing the cleanup\n"


def test_a_second_stop_signal_waits_for_the_checkpoint_being_written():
    """A second Ctrl+C (or a scheduler's TERM after its USR1) during a save must not cut
    the file short: it stops the run right after the save; elsewhere it stops at once."""
    import signal

    from dinox.run.signals import STOP_SIGNALS, StopRequest

    assert {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP} <= set(STOP_SIGNALS)
    stop = StopRequest()
    stop.install()
    try:
        stop._handle(signal.SIGUSR1, None)
        assert stop.signum == signal.SIGUSR1 and stop.exit_code == 0
        written = []
        with pytest.raises(KeyboardInterrupt):
            with stop.writing():
                stop._handle(signal.SIGTERM, None)      # held: the save goes on
                written.append("checkpoint")
        assert written == ["checkpoint"]
        stop.install()
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)          # outside a save: at once
    finally:
        stop.uninstall()


def test_a_second_stop_signal_says_what_it_left_and_exits_as_for_its_signal():
    """A run stopped at once by a second signal said only 'interrupted' and exited 130 for
    any signal, a second SIGTERM too: now one line says whether the checkpoint being written
    was kept and to resume, and the exit code is that of the second signal."""
    import signal

    from dinox.run.signals import EXIT_SIGHUP, EXIT_SIGTERM, HungUp, StopRequest, Terminated

    stop = StopRequest()
    stop.install()
    try:
        stop._handle(signal.SIGTERM, None)
        with pytest.raises(KeyboardInterrupt, match=r"second stop signal \(SIGTERM\), without saving.*--resume auto") as info:
            stop._handle(signal.SIGTERM, None)
        assert isinstance(info.value, Terminated) and info.value.exit_code == EXIT_SIGTERM
        stop.install()
        with pytest.raises(KeyboardInterrupt, match="SIGHUP") as info:
            stop._handle(signal.SIGHUP, None)
        assert isinstance(info.value, HungUp) and info.value.exit_code == EXIT_SIGHUP
        stop.install()
        with pytest.raises(KeyboardInterrupt, match="SIGINT.*right after the checkpoint being written was saved") as info:
            with stop.writing():
                stop._handle(signal.SIGINT, None)
        assert type(info.value) is KeyboardInterrupt   # dinox exits 130
    finally:
        stop.uninstall()


def test_a_stop_signal_the_process_was_started_ignoring_stays_ignored():
    """`nohup` ignores SIGHUP and a shell's background job SIGINT, so that the run outlives
    its terminal: the run must not turn them back into a stop."""
    import signal

    from dinox.run.signals import StopRequest

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = StopRequest()
    try:
        stop.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    finally:
        stop.uninstall()
        signal.signal(signal.SIGHUP, before)
    assert signal.getsignal(signal.SIGTERM) != stop._handle


# ----------------------------------------------------------------------------- data changed during a run

def test_a_volume_cut_or_removed_under_a_mapped_dataset_is_named_not_a_bus_error(processed_root, tmp_path):
    """Reading a mapped page that a truncation removed kills the process with SIGBUS; the
    dataset checks the file before each read instead."""
    from dinox.data.dataset import DataChanged

    root = copy_root(processed_root, tmp_path)
    data = CTSliceDataset(root, "train", manifest_of(root))
    sid, _ = data.locate(0)
    volume = root / "volumes" / f"{sid}.npy"
    first = data[0].clone()
    with open(volume, "r+b") as f:                       # cut in place: the mapping sees it
        f.truncate(volume.stat().st_size - 200)
    with pytest.raises(DataChanged, match="truncated") as info:
        data[0]
    assert sid in str(info.value) and "\n" not in str(info.value)
    volume.unlink()
    with pytest.raises(DataChanged, match="became unreadable"):
        data[1]
    rewritten = np.load(processed_root / "volumes" / f"{sid}.npy") + 1   # a rewrite of the same shape is read anew
    np.save(volume, rewritten)
    assert torch.equal(data[0], first + 1)


def test_a_volume_cut_during_training_stops_with_an_exact_emergency_checkpoint(processed_root, tmp_path, capsys,
                                                                            monkeypatch):
    """The run stops with one line naming the file, keeps the steps done in an emergency
    checkpoint, and, once the file is back, resumes to the same weights as a run never cut."""
    root = copy_root(processed_root, tmp_path)
    steps = ("--max-steps", "6", "--batch-size", "4", "--num-workers", "0", "--ckpt-every", "100")
    assert main(train_args(root, tmp_path / "whole", *steps)) == 0
    reference = final_weights(only_run(tmp_path / "whole"))

    plain, reads, cut = CTSliceDataset.__getitem__, [0], {}

    def cut_before_the_fourth_step(self, i):
        reads[0] += self.split == "train"
        if reads[0] == 13 and self.split == "train" and not cut:    # the fourth step's first sample: cut its volume
            sid, _ = self.locate(i)
            volume = root / "volumes" / f"{sid}.npy"
            cut.update(sid=sid, volume=volume, original=volume.read_bytes())
            with open(volume, "r+b") as f:
                f.truncate(len(cut["original"]) - 200)
        return plain(self, i)

    monkeypatch.setattr(CTSliceDataset, "__getitem__", cut_before_the_fourth_step)
    capsys.readouterr()
    out = tmp_path / "cut"
    code = main(train_args(root, out, *steps))
    monkeypatch.setattr(CTSliceDataset, "__getitem__", plain)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run = only_run(out)
    assert code == 1, err
    assert err.startswith("error: at step 3: volume") and cut["sid"] in err and "--resume auto" in err, err
    assert [p.name for p in run.glob("checkpoint_*.pth")] == [checkpoint_path(run, 3, "emergency").name]
    cut["volume"].write_bytes(cut["original"])
    assert main(train_args(root, out, *steps, "--resume", "auto")) == 0
    assert_same_state(final_weights(run), reference)


def test_a_step_that_fails_keeps_an_exact_emergency_checkpoint(processed_root, tmp_path, capsys, monkeypatch):
    """Any failure inside a step before its update (a dead loader worker, out of memory): the
    step is undone, saved as an emergency checkpoint, and the run stops with one line; the
    resumed run ends with the weights of a run that never failed."""
    steps = ("--max-steps", "6", "--batch-size", "4", "--num-workers", "0", "--ckpt-every", "100")
    assert main(train_args(processed_root, tmp_path / "whole", *steps)) == 0
    reference = final_weights(only_run(tmp_path / "whole"))

    plain, reads = CTSliceDataset.__getitem__, [0]

    def fail_in_the_fourth_step(self, i):
        reads[0] += self.split == "train"
        if reads[0] == 14 and self.split == "train":
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.\n")
        return plain(self, i)

    monkeypatch.setattr(CTSliceDataset, "__getitem__", fail_in_the_fourth_step)
    capsys.readouterr()
    out = tmp_path / "failed"
    code = main(train_args(processed_root, out, *steps))
    monkeypatch.setattr(CTSliceDataset, "__getitem__", plain)
    err = capsys.readouterr().err.strip().splitlines()
    run = only_run(out)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: at step 3: RuntimeError: DataLoader worker (pid 4242) is killed by signal: "
                             "Killed; the run's work"), err
    assert "--resume auto" in err[0]
    assert [p.name for p in run.glob("checkpoint_*.pth")] == [checkpoint_path(run, 3, "emergency").name]
    assert "step 4 failed" in (run / "train.log").read_text()
    assert main(train_args(processed_root, out, *steps, "--resume", "auto")) == 0
    assert_same_state(final_weights(run), reference)



def test_a_first_step_that_fails_saves_nothing_and_does_not_suggest_a_resume(processed_root, tmp_path, capsys,
                                                                             monkeypatch):
    """Nothing was trained yet: a checkpoint would hold the initial weights and a resume would
    meet the same fault, so the one line says to fix it and run again, and no run folder is left,
    nor the runs folders the launch made (a folder the user made stays)."""
    def fail(self, i):
        raise ValueError("Expected more than 1 value per channel when training")

    monkeypatch.setattr(CTSliceDataset, "__getitem__", fail)
    capsys.readouterr()
    out = tmp_path / "made" / "runs"
    code = main(train_args(processed_root, out, "--max-steps", "3", "--batch-size", "4", "--num-workers", "0",
                           "--eval-every", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: the first step failed: ValueError: Expected more than 1 value"), err
    assert "fix it and run again" in err[0] and "--resume" not in err[0]
    assert not (tmp_path / "made").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(train_args(processed_root, mine / "runs", "--max-steps", "3", "--batch-size", "4",
                           "--num-workers", "0", "--eval-every", "0")) == 1
    assert list(tmp_path.glob("mine/**")) == [mine]


def test_a_disk_that_filled_during_the_run_costs_an_old_checkpoint_not_the_run(processed_root, tmp_path,
                                                                               monkeypatch, capsys):
    """Another process fills the disk: the periodic save rotates out the oldest kept
    checkpoint early and saves, rather than stop the run at that step."""
    real, failed = ck.save_checkpoint, []

    def full_once_at_step_5(path, state):
        if Path(path).name == "checkpoint_00000005.pth" and not failed:
            failed.append(path)
            raise ck.NoSpaceError("not enough disk space to save checkpoint_00000005.pth: need 3 MB, 1 MB free")
        return real(path, state)

    monkeypatch.setattr(ck, "save_checkpoint", full_once_at_step_5)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "6", "--batch-size", "4", "--num-workers", "0",
                           "--ckpt-every", "1", "--ckpt-keep-last", "3")) == 0
    run = only_run(out)
    assert failed and "rotated out checkpoint_00000002.pth early to make room" in capsys.readouterr().out
    names = {p.name for p in run.glob("checkpoint_*.pth")}
    assert {"checkpoint_00000005.pth", "checkpoint_final_00000006.pth"} <= names
    assert "checkpoint_00000002.pth" not in names
    # With one checkpoint kept there is nothing to rotate early: the save fails as before.
    failed.clear()
    assert main(train_args(processed_root, tmp_path / "one", "--max-steps", "6", "--batch-size", "4",
                           "--num-workers", "0", "--ckpt-every", "1", "--ckpt-keep-last", "1")) == 1


def test_a_full_disk_under_the_metrics_saves_the_work_and_says_where(processed_root, tmp_path, monkeypatch,
                                                                      capsys):  # noqa: F811
    """The metrics fail to write (the disk filled between checkpoints): the run saves an
    emergency checkpoint while there may still be room, and stops in one line naming the run
    folder; a resume continues from it."""
    import errno

    from dinox.observe.metrics import MetricsLogger

    class Full:
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = lambda self: None

    real_log = MetricsLogger.log

    def log(self, step, metrics, prefix="Train"):
        if step == 3 and prefix == "Train":
            self._file = Full()
        return real_log(self, step, metrics, prefix)

    monkeypatch.setattr(MetricsLogger, "log", log)
    out = tmp_path / "runs"
    args = train_args(processed_root, out, "--batch-size", "4", "--max-steps", "5", "--ckpt-every", "100")
    assert main(args) == 1
    said = capsys.readouterr().err.strip().splitlines()[-1]
    run = only_run(out)
    assert said.startswith(f"error: at step 3: cannot write the run's metrics in {run} (No space left on device)")
    assert f"the run's work up to step 3 is in {run / 'checkpoint_emergency_00000003.pth'}" in said
    monkeypatch.undo()
    assert main(args + ["--resume", "auto"]) == 0
    assert ck.load_checkpoint(run / "checkpoint_final_00000005.pth")["step"] == 5
