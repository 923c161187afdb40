"""Plain mistakes a user makes at the command line, each answered with one line that says
what to do (or, where the input is usable, a correct result): found by trying every
subcommand with wrong paths, wrong kinds of files, out-of-range numbers and re-runs."""
from __future__ import annotations

import errno
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _train_support import processed_root, train_args  # noqa: F401
from dinox.cli import main
from dinox.data.layout import read_index

REPO = Path(__file__).resolve().parent.parent
SMALL_SYNTH = ["--patients", "1", "--slices", "4", "--size", "32", "--workers", "1"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_file_system_failure_is_one_line_naming_the_path(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["synth", "--out", str(blocker / "sub"), *SMALL_SYNTH]) == 1
    err = one_line_error(capsys)
    assert err.startswith("error: cannot read or write") and str(blocker / "sub") in err


@pytest.mark.parametrize("argv, flag", [
    (["synth", "--out", "x", "--seed", "-5"], "--seed"),
    (["synth", "--out", "", "--patients", "1"], "--out"),
    (["demo", "--steps", "0"], "--steps"),
    (["eval", "probe", "--checkpoint", "c", "--data-root", "r", "--seed", "-1"], "--seed"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--collapse-std", "-1"], "--collapse-std"),
    (["train", "--device-memory", "-5"], "--device-memory"),
    (["train", "--device-memory", "inf"], "--device-memory"),
    (["eval", "retrieval", "--checkpoint", "c", "--min-ratio", "nan"], "--min-ratio"),
    (["eval", "retrieval", "--checkpoint", "c", "--min-ratio", "-1"], "--min-ratio"),
    (["demo", "--patients", "1"], "--patients"),
    (["demo", "--draws", "0"], "--draws"),
    (["eval", "retrieval", "--checkpoint", "c", "--min-x-untrained", "-2"], "--min-x-untrained"),
    # seeds past 2**32 - 1 were taken, then ended training (torch's int64 generator seed) and
    # the eval commands (scikit-learn's random_state) in a traceback
    (["train", "--seed", "99999999999999999999"], "--seed"),
    (["eval", "retrieval", "--checkpoint", "c", "--seed", "99999999999999999999"], "--seed"),
    (["eval", "probe", "--checkpoint", "c", "--seed", "4294967296"], "--seed"),
    (["demo", "--seed", "4294967296"], "--seed"),
    (["synth", "--out", "x", "--seed", "4294967296"], "--seed"),
    (["prep", "--input", "x", "--split-seed", "4294967296"], "--split-seed"),
    # a step budget past 10M sat silent in resolve() (the teacher-momentum fit walks every step)
    (["train", "--max-steps", "99999999999999999999999"], "--max-steps"),
    (["demo", "--steps", "10000001"], "--steps"),
    # the memory plan built 100,000 blocks on the meta device for 2.5 minutes before its verdict
    (["train", "--vit-depth", "1001"], "--vit-depth"),
])
def test_a_bad_flag_value_is_refused_in_one_line_before_any_work(argv, flag, capsys):
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"error: dinox {argv[0]}") and flag in err and f"(see dinox {argv[0]}" in err


def test_an_unknown_flag_is_reported_with_the_subcommand_it_was_given_to(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["phase5_view_retrieval_eval.py", "--checkpoint", "c", "--bogus", "1"])
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # what `python scripts/x.py` does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / "phase5_view_retrieval_eval.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = one_line_error(capsys)
    assert err.startswith("error: dinox eval retrieval: unrecognized arguments: --bogus 1")


def test_synth_refuses_to_mix_two_datasets_but_repeats_the_same_one(tmp_path, capsys):
    out = tmp_path / "dicom"
    assert main(["synth", "--out", str(out), *SMALL_SYNTH]) == 0
    assert main(["synth", "--out", str(out), *SMALL_SYNTH]) == 0      # the same files again
    capsys.readouterr()
    assert main(["synth", "--out", str(out), *SMALL_SYNTH, "--seed", "1"]) == 1
    assert "already holds another synthetic dataset (1 chest series, seed 0)" in one_line_error(capsys)
    assert len(json.loads((out / "labels.json").read_text())["series"]) == 1
    (out / "labels.json").unlink()                                   # as if interrupted before the labels
    (out / ".labels.json.otherhost.4242.tmp").write_text("{cut")     # killed while writing them
    assert main(["synth", "--out", str(out), *SMALL_SYNTH]) == 0
    assert not (out / ".labels.json.otherhost.4242.tmp").exists()
    assert not (out / ".synth_request.json").exists()                # gone with the labels written
    # interrupted while asked for another shape: its patient folders are named alike, its slices are not
    (out / "labels.json").unlink()
    (out / ".synth_request.json").write_text(json.dumps({"patients": 1, "slices": 32, "size": 256, "seed": 0,
                                                         "family": "chest", "slice_thickness": None}))
    assert main(["synth", "--out", str(out), *SMALL_SYNTH]) == 1
    assert ("holds an interrupted synthesis of another shape (--patients 1, --slices 32, --size 256, --seed 0, "
            "--family chest)") in one_line_error(capsys)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["synth", "--out", str(other), *SMALL_SYNTH]) == 1
    assert "already holds other files" in one_line_error(capsys)


def _ct(path: Path, nan: bool = False, low: float = -1000.0) -> Path:
    data = np.linspace(low, 1000.0, 4 * 16 * 16, dtype=np.float32).reshape(16, 16, 4)
    if nan:
        data[0, 0, :] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0])), str(path))
    return path


def test_plus_infinity_is_the_top_of_the_scale_not_air():
    """+inf is a value past the top (a float conversion saturating behind metal): as air it
    would put a hole where the densest voxel is."""
    from dinox.data.nifti_io import fill_non_finite

    vol = np.array([[-500.0, np.inf], [np.nan, -np.inf]], dtype=np.float32)
    filled, notes, lowest = fill_non_finite(vol)
    assert filled.tolist() == [[-500.0, 3071.0], [-1024.0, -1024.0]] and lowest == -500.0
    assert notes == ["2 NaN or -inf voxels (50 % of the volume) set to -1024 HU (air), as outside the field of view",
                     "1 +inf voxels (25 % of the volume) set to 3071 HU (the top of the scale), as past it"]


def test_nan_voxels_are_air_and_reported_and_do_not_defeat_the_hu_check(tmp_path, capsys):
    _ct(tmp_path / "ok" / "scan.nii.gz", nan=True)
    assert main(["prep", "--input", str(tmp_path / "ok"), "--output", str(tmp_path / "p1"), "--workers", "1"]) == 0
    report = json.loads((tmp_path / "p1" / "prep_report.json").read_text())
    assert any("4 NaN or -inf voxels" in n for n in report["series_notes"]["scan"])
    vol = np.load(tmp_path / "p1" / "volumes" / "scan.npy")
    assert vol.min() == -1024 and vol.max() == 1000
    # values 0..1000 are no CT in HU: one NaN must not make the scan pass as one
    _ct(tmp_path / "mask" / "mask.nii.gz", nan=True, low=0.0)
    assert main(["prep", "--input", str(tmp_path / "mask"), "--output", str(tmp_path / "p2"), "--workers", "1"]) == 1
    assert "do not look like CT in HU" in one_line_error(capsys)


def test_same_named_nifti_files_prepared_in_turn_are_all_indexed_once(tmp_path):
    for k, patient in enumerate(("pat1", "pat2")):   # two scans: one scan in two copies is indexed once
        _ct(tmp_path / "in" / patient / "image.nii.gz", low=-1000.0 - k)
    root = tmp_path / "processed"
    prep = ["prep", "--output", str(root), "--workers", "1", "--input"]
    assert main([*prep, str(tmp_path / "in" / "pat1")]) == 0
    assert main([*prep, str(tmp_path / "in" / "pat2")]) == 0       # not "already done" under pat1's id
    assert main([*prep, str(tmp_path / "in")]) == 0                # pat1 keeps its id: no second copy
    rows = read_index(root / "_index" / "index.csv")
    sources = sorted(Path(r["source"]).parent.name for r in rows)
    assert sources == ["pat1", "pat2"]
    assert len({r["patient_id"] for r in rows}) == 2
    split = json.loads(next((root / "_splits").glob("*.json")).read_text())
    assert not set(split["train"]) & set(split["val"])


@pytest.fixture(scope="module")
def one_step_checkpoint(processed_root, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("runs")
    assert main(train_args(processed_root, out, "--batch-size", "4", "--num-workers", "0", "--max-steps", "2")) == 0
    return next(out.glob("*/checkpoint_final_*.pth"))


def test_export_overwrite_replaces_an_earlier_export_and_a_file_is_named_as_such(one_step_checkpoint, tmp_path,
                                                                                capsys):
    out = tmp_path / "export"
    assert main(["export", str(one_step_checkpoint), "--out", str(out)]) == 0
    (out / "mine.txt").write_text("kept")
    assert main(["export", str(one_step_checkpoint), "--out", str(out), "--format", "safetensors",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "backbone.safetensors", "ct_preprocessing.json",
                                                     "mine.txt"]
    capsys.readouterr()
    assert main(["export", str(one_step_checkpoint), "--out", str(out / "mine.txt"), "--overwrite"]) == 1
    assert "is a file; give a folder" in one_line_error(capsys)


def test_export_overwrite_refuses_a_run_folder_and_a_folder_no_export_wrote(one_step_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_step_checkpoint.parent, run)
    notes = tmp_path / "notes"
    notes.mkdir()
    for folder in (run, notes):
        (folder / "README.md").write_text("my notes")
    config = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert main(["export", str(one_step_checkpoint), "--out", str(run), "--format", "safetensors", "--overwrite"]) == 1
    err = one_line_error(capsys)
    assert "is a training run folder" in err and "config.json, README.md" in err and "give a new folder" in err
    assert (run / "config.json").read_bytes() == config and (run / "README.md").read_text() == "my notes"
    assert main(["export", str(one_step_checkpoint), "--out", str(notes), "--overwrite"]) == 1
    err = one_line_error(capsys)
    assert "not an earlier dinox export (no ct_preprocessing.json)" in err and "README.md" in err
    assert sorted(p.name for p in notes.iterdir()) == ["README.md"] and (notes / "README.md").read_text() == "my notes"


def _enospc_at(name: str):
    """An os.replace that fails as a full disk does for a temporary file of `name` (the
    others go through): the write of that file ran out of room."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if f".{name}." in Path(src).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)
    return replace


def _torch_save_out_of_room(obj, f):
    """torch.save on a full disk: part of the zip written, then a RuntimeError whose context
    is the writer's OSError."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as file:
            return _torch_save_out_of_room(obj, file)
    f.write(b"PK\x03\x04" + bytes(4096))
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize("fmt", ["hf", "dinov2-hub"])
def test_an_export_that_runs_out_of_disk_leaves_no_partial_file_and_says_where(fmt, one_step_checkpoint, tmp_path,
                                                                               capsys, monkeypatch):
    """A full disk (measured on a 3 MB tmpfs): the hf export left its hidden temporary
    .model.safetensors.<pid>.tmp (the size of the model, keeping the disk full) and said
    "cannot read or write: No space left on device" without the folder; the hub export left
    a half-written backbone.pth under its final name and ended in a traceback (torch.save's
    RuntimeError). Now every file is written whole or not at all, the export's files go, the
    one line names the folder, and the same command with --overwrite completes it."""
    import torch

    from dinox.model import weights

    out = tmp_path / "export"
    if fmt == "hf":
        monkeypatch.setattr(weights.os, "replace", _enospc_at("model.safetensors"))
    else:
        monkeypatch.setattr(torch, "save", _torch_save_out_of_room)
    capsys.readouterr()
    assert main(["export", str(one_step_checkpoint), "--out", str(out), "--format", fmt]) == 1
    err = one_line_error(capsys)
    assert f"cannot write the export into {out} (No space left on device)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["ct_preprocessing.json"]   # no temporary, no partial file
    monkeypatch.undo()
    assert main(["export", str(one_step_checkpoint), "--out", str(out), "--format", fmt, "--overwrite"]) == 0
    assert "README.md" in {p.name for p in out.iterdir()}


class _ReachedDefault(Exception):
    """The signal reached the handler the process had before the command: without the
    command's own, SIGTERM ends dinox at once, without a word and without cleaning up."""


@pytest.fixture
def sigterm_marker():
    import signal

    def reached(signum, frame):
        raise _ReachedDefault(signal.Signals(signum).name)

    before = signal.signal(signal.SIGTERM, reached)
    try:
        yield reached
    finally:
        signal.signal(signal.SIGTERM, before)


def _kill_self(*args, **kwargs):
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    raise AssertionError("SIGTERM did not stop the command")


@pytest.mark.parametrize("command", ["retrieval", "probe", "monitor", "inspect", "export"])
def test_after_training_commands_stopped_by_sigterm_say_so_in_one_line_and_exit_143(
        command, one_step_checkpoint, processed_root, tmp_path, capsys, monkeypatch, sigterm_marker):  # noqa: F811
    """SIGTERM (`kill`, `timeout`, a scheduler's stop) and a closed terminal's SIGHUP ended
    `dinox eval`, `monitor`, `inspect` and `export` at once: no word, no cleanup (a hidden
    temporary of the model's size in an export folder), the exit status only the signal's.
    Measured on 100 series: `eval retrieval --n 4096` killed at 12 s printed nothing. Now they
    unwind as Ctrl-C does and say what is left, exit 143 (129 for SIGHUP, the same path)."""
    import signal

    import dinox.commands.inspect as inspect_command
    from dinox.eval import probe, runner
    from dinox.model import weights
    from dinox.observe import monitor_hook

    ckpt, out = str(one_step_checkpoint), tmp_path / "out"
    target, argv = {
        "retrieval": ((runner, "evaluate_draws"), ["eval", "retrieval", "--checkpoint", ckpt, "--n", "8"]),
        "probe": ((probe, "probe_backbone"), ["eval", "probe", "--checkpoint", ckpt]),
        "monitor": ((monitor_hook, "run_monitor"), ["monitor", "--checkpoint", ckpt]),
        "inspect": ((inspect_command, "summarize"), ["inspect", ckpt, ckpt]),
        "export": ((weights, "write_hf_folder"), ["export", ckpt]),
    }[command]
    monkeypatch.setattr(*target, _kill_self)
    if command != "inspect":
        argv += ["--out", str(out)] + (["--device", "cpu", "--data-root", str(processed_root)]
                                       if command != "export" else [])
    capsys.readouterr()
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is sigterm_marker
    if command == "export":
        assert "--overwrite" in err and sorted(p.name for p in out.iterdir()) == ["ct_preprocessing.json"]
    elif command == "inspect":
        assert "after 0 of 2 checkpoint(s)" in err
    else:
        assert "run the same command again" in err and not any(out.rglob("*.json"))


def test_a_folder_or_an_export_given_as_checkpoint_says_what_it_is(one_step_checkpoint, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", str(one_step_checkpoint), "--out", str(export)]) == 0
    capsys.readouterr()
    assert main(["eval", "retrieval", "--checkpoint", str(export)]) == 1
    assert "is a weights file (backbone weights, as `dinox export` writes), not a training checkpoint" \
        in one_line_error(capsys)
    renamed = tmp_path / "checkpoint_00000001.pth"        # a safetensors file under a checkpoint's name
    renamed.write_bytes((export / "model.safetensors").read_bytes())
    assert main(["eval", "retrieval", "--checkpoint", str(renamed)]) == 1
    assert "is a safetensors file, not a PyTorch file" in one_line_error(capsys)
    assert main(["train", "--resume", str(one_step_checkpoint.parent.parent)]) == 1
    assert f"such as {one_step_checkpoint}" in one_line_error(capsys)
    assert main(["inspect", str(export / "model.safetensors"), str(tmp_path / "gone.pth")]) == 1
    out = capsys.readouterr().out
    assert "NOT A CHECKPOINT (is a weights file" in out and "MISSING (no such file)" in out and "DAMAGED" not in out


def test_relaunching_a_finished_run_leaves_it_untouched(one_step_checkpoint, processed_root, capsys):  # noqa: F811
    """A requeued job (`--resume auto` with the run's own --max-steps) finds its run finished:
    exit 0, nothing rewritten (others may have recorded the checkpoints' hashes)."""
    run = one_step_checkpoint.parent
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(train_args(processed_root, run.parent, "--batch-size", "4", "--num-workers", "0",
                           "--max-steps", "2", "--resume", "auto")) == 0
    assert "the run is finished, nothing to train or rewrite" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()} == before
    assert [p.name for p in run.parent.iterdir()] == [run.name]
    # the periodic checkpoint of the last step, named by path: finished too (it rewrote both files)
    (periodic,) = run.glob("checkpoint_00000002.pth")
    assert main(train_args(processed_root, run.parent, "--batch-size", "4", "--num-workers", "0",
                           "--max-steps", "2", "--resume", str(periodic))) == 0
    assert "the run is finished, nothing to train or rewrite" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()} == before


def test_resume_past_max_steps_or_with_another_init_is_refused(one_step_checkpoint, processed_root, tmp_path,
                                                                capsys):  # noqa: F811
    base = train_args(processed_root, tmp_path / "runs", "--batch-size", "4", "--num-workers", "0",
                      "--resume", str(one_step_checkpoint))
    assert main([*base, "--max-steps", "1"]) == 1
    assert "is at step 2, past --max-steps 1" in one_line_error(capsys)
    assert main([*base, "--init-from", str(one_step_checkpoint)]) == 1
    assert "--init-from" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_eval_results_of_two_checkpoints_in_one_out_folder_are_both_kept(tmp_path, capsys):
    from dinox.commands.eval import _write_result

    first = _write_result(tmp_path, "view_retrieval_step3_N4.json", {"checkpoint": "runs/a/c.pth", "ratio": 1})
    again = _write_result(tmp_path, "view_retrieval_step3_N4.json", {"checkpoint": "runs/a/c.pth", "ratio": 2})
    other = _write_result(tmp_path, "view_retrieval_step3_N4.json", {"checkpoint": "runs/b/c.pth", "ratio": 3})
    assert first == again and other != first and "holds the result of another checkpoint" in capsys.readouterr().out
    assert json.loads(first.read_text())["ratio"] == 2 and json.loads(other.read_text())["ratio"] == 3


def test_view_settings_that_cannot_work_are_refused(processed_root, tmp_path, capsys):  # noqa: F811
    argv = train_args(processed_root, tmp_path / "runs", "--local-crops", "2", "--dry-run")
    assert main([*argv, "--local-size", "64"]) == 1            # globals are 32 px here
    assert "larger than the global views" in one_line_error(capsys)
    assert main([*argv, "--local-size", "16", "--local-scale", "0.4", "0.1"]) == 1
    assert "0 < min <= max <= 1" in one_line_error(capsys)
    no_locals = train_args(processed_root, tmp_path / "runs", "--dry-run")
    assert main([*no_locals, "--local-scale", "0.4", "0.1"]) == 1   # named by its flag without local crops too
    assert "--local-scale 0.4 0.1 must be" in one_line_error(capsys)
    assert main([*no_locals, "--layerscale", "-1"]) == 1
    assert "--layerscale -1.0 must be >= 0" in one_line_error(capsys)


def test_resume_auto_over_only_damaged_checkpoints_refuses_to_start_over(one_step_checkpoint, processed_root,
                                                                         tmp_path, capsys):  # noqa: F811
    import shutil

    out = tmp_path / "runs"
    run = out / one_step_checkpoint.parent.name
    shutil.copytree(one_step_checkpoint.parent, run)
    for path in run.glob("checkpoint_*.pth"):
        path.write_bytes(path.read_bytes()[:1000])
    capsys.readouterr()
    code = main(train_args(processed_root, out, "--batch-size", "4", "--num-workers", "0", "--max-steps", "3",
                           "--resume", "auto"))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume auto: all 2 checkpoint(s) under") and "are damaged or unusable" in err
    assert [p.name for p in out.iterdir()] == [run.name]         # no new run started from step 0


def test_a_changed_byte_in_a_checkpoint_without_a_record_is_found(one_step_checkpoint, tmp_path, capsys):
    import zipfile

    intact = tmp_path / "copy.pth"                             # copied without its .sha256 record
    intact.write_bytes(one_step_checkpoint.read_bytes())
    with zipfile.ZipFile(intact) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(intact.read_bytes())
    # the member's data follow its 30-byte local header, its name and its extra field
    start = member.header_offset + 30 + int.from_bytes(data[member.header_offset + 26:member.header_offset + 28],
                                                       "little") + int.from_bytes(
        data[member.header_offset + 28:member.header_offset + 30], "little")
    data[start + member.file_size // 2] ^= 0x10
    changed = tmp_path / "changed.pth"
    changed.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(intact)]) == 0
    assert main(["inspect", str(changed)]) == 1
    assert "fails the zip's CRC-32 check" in capsys.readouterr().out
    assert main(["eval", "retrieval", "--checkpoint", str(changed)]) == 1
    err = one_line_error(capsys)
    assert "is damaged" in err and "CRC-32" in err


def test_a_resume_from_another_folder_finds_a_relative_data_root(processed_root, tmp_path, monkeypatch,
                                                                 capsys):  # noqa: F811
    monkeypatch.chdir(processed_root.parent)
    argv = train_args(processed_root, tmp_path / "runs", "--batch-size", "4", "--num-workers", "0")
    argv[argv.index("--data-root") + 1] = processed_root.name      # relative to the folder the run starts in
    assert main([*argv, "--max-steps", "1"]) == 0
    first = next((tmp_path / "runs").glob("*/checkpoint_final_*.pth"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(first), "--max-steps", "2", "--out", str(tmp_path / "runs2"),
                 "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "is not found from this folder; reading it where the run recorded it" in out
    assert next((tmp_path / "runs2").glob("*/checkpoint_final_00000002.pth"))


def test_a_manifest_without_a_val_list_is_warned_about(processed_root, tmp_path, caplog):  # noqa: F811
    import logging

    argv = train_args(processed_root, tmp_path / "runs", "--dry-run")
    i = argv.index("--split-manifest") + 1
    sides = json.loads(Path(argv[i]).read_text())
    train_only = tmp_path / "train_only.json"
    train_only.write_text(json.dumps({"train": sides["train"]}))
    argv[i] = str(train_only)
    with caplog.at_level(logging.WARNING, logger="dinox.train"):
        assert main(argv) == 0
    assert 'has no "val" list' in caplog.text


def test_an_output_folder_that_cannot_be_written_is_told_from_a_full_disk(tmp_path):
    from dinox.train.runs import _unwritable

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is a file, not a folder" in _unwritable(blocker / "runs")
    assert _unwritable(tmp_path / "new" / "runs") is None


def test_a_probe_that_cannot_run_says_what_to_change():
    from dinox.eval import probe

    passed, line = probe.verdict({"tasks": {}, "skipped": {"slice_nodule": "one class only on the training side"},
                                  "split": {"train_patients": 1, "test_patients": 1}}, 0.6)
    assert not passed and "1 training and 1 test patients" in line and "--split patients" in line


def test_a_missing_default_split_names_the_manifests_the_root_has(processed_root, tmp_path, capsys):  # noqa: F811
    argv = [a for a in train_args(processed_root, tmp_path / "runs", "--max-steps", "1")]
    i = argv.index("--split-manifest")
    del argv[i:i + 2]
    (name,) = [p.name for p in (processed_root / "_splits").glob("*.json")]
    if name == "val10_seed0.json":
        pytest.skip("the fixture's split is the default one")
    assert main(argv) == 1
    assert f"the folder has {name}: pass --split-manifest" in one_line_error(capsys)


def test_dry_run_on_a_missing_device_warns(processed_root, tmp_path, capsys):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    argv = train_args(processed_root, tmp_path / "runs", "--dry-run")
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 0
    assert "warning: requested --device cuda but no CUDA device is available" in capsys.readouterr().err


def test_an_explicit_labels_json_that_is_not_json_is_an_error(tmp_path):
    from dinox.data.annotations import NODULES_TABLE, write_table
    from dinox.errors import UserError
    from dinox.eval import probe

    row = {"series_id": "S", "patient_id": "P", "source": "synth", "reader": "truth", "kind": "nodule",
           "nodule_id": "N", "slice_index": 1, "row0": 1, "col0": 1, "row1": 2, "col1": 2, "center_row": 1.5,
           "center_col": 1.5}
    (tmp_path / NODULES_TABLE).parent.mkdir(parents=True)
    write_table(tmp_path / NODULES_TABLE, [row])
    bad = tmp_path / "labels.json"
    bad.write_text("not json")
    with pytest.raises(UserError, match="not readable JSON"):
        probe.load_labels(tmp_path, labels_json=bad)
    segment = [0, 1, 1, 2, 2, 2, 1.0, 1.0]
    for content, says in (([1, 2], 'no "series" list'),
                          ({"series": [["S"]]}, "series entry 0 is not an object"),
                          ({"series": [{"series_uid": "S", "vessels": [[1, 2, 3]]}]}, "not segments of 8 numbers"),
                          ({"series": [{"series_uid": "OTHER", "vessels": [segment]}]}, "none of the label table"),
                          ({"series": [{"series_uid": "OTHER"}]}, "none of the label table")):
        bad.write_text(json.dumps(content))
        with pytest.raises(UserError, match=says):
            probe.load_labels(tmp_path, labels_json=bad)
    bad.write_text(json.dumps({"series": [{"series_uid": "S", "vessels": [segment]}]}))
    assert probe.load_labels(tmp_path, labels_json=bad).vessels["S"].shape == (1, 8)
    with pytest.raises(UserError, match=r"is a folder; give the labels\.json file `dinox synth` wrote \(.*labels\.json\)"):
        probe.load_labels(tmp_path, labels_json=tmp_path)
    lidc = [{**row, "source": "lidc-xml", "reader": f"r{k}"} for k in range(4)]
    write_table(tmp_path / NODULES_TABLE, lidc)
    with pytest.raises(UserError, match="no series has more than 4 readers"):
        probe.load_labels(tmp_path, min_readers=9)


def test_the_seed_scripts_name_a_missing_dependency_in_one_line(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import _shim
    import dinox.cli

    def missing(argv):
        raise ModuleNotFoundError("No module named 'tqdm'", name="tqdm")

    monkeypatch.setattr(dinox.cli, "main", missing)
    assert _shim.dinox_main(["inspect"]) == 1
    assert "needs the Python package 'tqdm'" in one_line_error(capsys)


def test_an_index_csv_without_data_root_gives_its_own_root_or_asks_for_one(processed_root, tmp_path, capsys):  # noqa: F811
    """The index's volume paths are relative to the root above its _index/: train used
    data/processed instead, and failed on a manifest there."""
    argv = train_args(processed_root, tmp_path / "runs", "--dry-run")
    i = argv.index("--data-root")
    del argv[i:i + 2]
    loose = tmp_path / "myindex.csv"
    loose.write_text((processed_root / "_index" / "index.csv").read_text())
    assert main([*argv, "--index-csv", str(loose)]) == 1
    assert "is not in a processed root's _index/ folder" in one_line_error(capsys)
    from dinox.data.layout import root_of_index

    assert root_of_index(processed_root / "_index" / "index.csv") == processed_root


def test_retrieval_on_a_handful_of_queries_warns_that_the_figure_is_noise(one_step_checkpoint, processed_root,
                                                                         tmp_path, capsys):  # noqa: F811
    main(["eval", "retrieval", "--checkpoint", str(one_step_checkpoint), "--data-root", str(processed_root),
          "--n", "6", "--draws", "1", "--out", str(tmp_path)])
    assert "warning: only" in capsys.readouterr().out


def test_a_demo_batch_larger_than_its_data_names_the_demo_flags(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path / "demo"), "--patients", "2", "--slices", "4", "--size", "32",
                 "--steps", "1", "--batch-size", "500"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--batch-size 500 is more than the demo data's" in err and "--patients or --slices" in err


def test_series_too_large_for_the_machine_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A slice count beyond any CT series, or series whose build would not fit in the free
    memory, get one line before anything is written (the system would otherwise kill a
    worker without a word); the demo checks its data before it prints its first step."""
    from dinox.data import synth

    assert main(["synth", "--out", str(tmp_path / "a"), "--patients", "1", "--slices", "100000", "--size", "64"]) == 1
    assert "--slices must be between 3" in one_line_error(capsys) and not (tmp_path / "a").exists()
    monkeypatch.setattr(synth, "available_memory_bytes", lambda: 10 ** 8)   # 100 MB free (as synth sees it)
    assert main(["synth", "--out", str(tmp_path / "b"), "--patients", "4", "--slices", "200", "--size", "128",
                 "--workers", "2"]) == 1
    err = one_line_error(capsys)
    assert "needs about 0.5 GB to build 2 series at once, and 0.1 GB is free" in err and "fewer --workers" in err
    assert main(["demo", "--root", str(tmp_path / "demo"), "--size", "8"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: --size must be between 32 and 2048") and "[demo]" not in out


def _exit_without_a_word(item):
    import os

    os._exit(9)   # what a worker killed by the system looks like to the pool


def test_a_worker_killed_by_the_system_is_one_line_naming_the_remedy():
    from dinox.data.parallel import process_map
    from dinox.errors import UserError

    with pytest.raises(UserError, match="synth: a worker process was killed .*fewer --workers"):
        list(process_map(_exit_without_a_word, range(2), 2, "synth", False))


@pytest.mark.parametrize("argv", [
    ["export", "c.pth", "--out", ""],
    ["eval", "retrieval", "--checkpoint", "c.pth", "--out", " "],
    ["eval", "probe", "--checkpoint", "", "--data-root", "r"],
    ["monitor", "--checkpoint", "c.pth", "--data-root", ""],
    ["train", "--data-root", ""],
    ["inspect", ""],                   # was read as ".": "NOT A CHECKPOINT (is a folder ...)"
    ["demo", "--root", ""],            # was read as ".": the demo's folders in the current one
])
def test_an_empty_path_is_refused_rather_than_read_as_the_current_folder(argv, capsys):
    assert main(argv) == 1
    assert "expected a path, got an empty string" in one_line_error(capsys)


def test_a_global_view_of_one_patch_is_refused_naming_the_smallest_size(processed_root, tmp_path, capsys):  # noqa: F811
    argv = train_args(processed_root, tmp_path / "runs", "--dry-run")
    assert main([*argv, "--img-size", "8", "--vit-patch", "8"]) == 1
    assert "gives a 1x1 patch grid with --vit-patch 8" in one_line_error(capsys)
    assert main([*argv, "--img-size", "16", "--vit-patch", "8"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("flag, width", [("--vit-dim", "100000000000"), ("--head-hidden", "100000000000"),
                                         ("--head-hidden", "99999999999999999999")])
def test_a_model_too_wide_for_torch_to_size_is_a_wont_fit_line(flag, width, processed_root, tmp_path,  # noqa: F811
                                                               capsys):
    """--vit-dim 1000000000 (a 3e9 x 1e9 qkv weight) ended the dry run, and a training launch,
    in a traceback: 'RuntimeError: Storage size calculation overflowed' from the meta build; a
    width past int64 itself in 'TypeError: ... Overflow when unpacking long long'."""
    argv = train_args(processed_root, tmp_path / "runs", "--dry-run")
    assert main([*argv, flag, width]) == 3
    err = one_line_error(capsys)
    assert "the model fits no device" in err and f"{flag} {width}" in err and "--vit-dim 1408" in err


def test_a_checkpoint_missing_its_network_or_with_a_bad_step_is_named_damaged(one_step_checkpoint, tmp_path,
                                                                               capsys):
    import torch

    state = torch.load(one_step_checkpoint, weights_only=True)
    no_teacher = tmp_path / "checkpoint_00000002.pth"
    torch.save({k: v for k, v in state.items() if k != "teacher"}, no_teacher)
    bad_step = tmp_path / "checkpoint_00000003.pth"
    torch.save({**state, "step": "abc"}, bad_step)
    assert main(["export", str(no_teacher), "--out", str(tmp_path / "e1")]) == 1
    assert "is damaged: lacks the teacher network (incomplete)" in one_line_error(capsys)
    assert main(["export", str(bad_step), "--out", str(tmp_path / "e2")]) == 1
    assert "records step 'abc', not a whole number" in one_line_error(capsys)
    assert main(["inspect", str(bad_step)]) == 1
    assert "DAMAGED (records step 'abc'" in capsys.readouterr().out


def test_ctrl_c_while_the_subcommands_are_imported_is_one_word(monkeypatch, capsys):
    import dinox.cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(dinox.cli.importlib, "import_module", interrupted)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_nifti_without_its_ending_or_with_complex_voxels_says_why(tmp_path, capsys):
    plain = _ct(tmp_path / "a" / "scan.nii")
    plain.rename(plain.with_suffix(""))                  # "scan": no .nii ending
    assert main(["prep", "--input", str(tmp_path / "a"), "--output", str(tmp_path / "pa"), "--workers", "1"]) == 1
    capsys.readouterr()
    report = json.loads((tmp_path / "pa" / "prep_report.json").read_text())
    (skip,) = report["files_skipped"]
    assert skip["reason"] == ("not a DICOM file: a NIfTI volume named without .nii; rename it to end in .nii to "
                              "prepare it")
    (tmp_path / "b").mkdir()
    data = np.linspace(-1000.0, 1000.0, 16 * 16 * 4).reshape(16, 16, 4).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0])), str(tmp_path / "b" / "k.nii.gz"))
    assert main(["prep", "--input", str(tmp_path / "b"), "--output", str(tmp_path / "pb"), "--workers", "1"]) == 1
    capsys.readouterr()
    report = json.loads((tmp_path / "pb" / "prep_report.json").read_text())
    assert "complex voxels (complex64): not CT in HU" in json.dumps(report)


def test_weights_or_a_configuration_that_do_not_fit_each_other_are_one_line(one_step_checkpoint, processed_root,
                                                                            tmp_path, capsys):  # noqa: F811
    """An edited checkpoint (a tensor cut, a shape field of the wrong type) with a valid
    record loads, then fails to fit its model: every command says so in one line, and
    inspect no longer calls it intact. A checkpoint of a newer dinox is 'not readable here'."""
    import torch

    from dinox.run.checkpoint import save_checkpoint

    state = torch.load(one_step_checkpoint, weights_only=True)
    cut = tmp_path / "cut" / "checkpoint_00000002.pth"
    cut.parent.mkdir()
    teacher = dict(state["teacher"])
    teacher["backbone.pos_embed"] = teacher["backbone.pos_embed"][:, :3]
    save_checkpoint(cut, {**state, "teacher": teacher})
    typed = tmp_path / "typed" / "checkpoint_00000002.pth"
    typed.parent.mkdir()
    save_checkpoint(typed, {**state, "config": {**state["config"], "vit_dim": "64"}})
    newer = tmp_path / "newer" / "checkpoint_00000002.pth"
    newer.parent.mkdir()
    save_checkpoint(newer, {**state, "format_version": 99})

    assert main(["export", str(cut), "--out", str(tmp_path / "e1")]) == 1
    said = one_line_error(capsys)
    assert f"checkpoint {cut}: its teacher network does not fit the model its configuration describes" in said
    assert "shape of backbone.pos_embed (1, 3, " in said
    assert main(["eval", "retrieval", "--checkpoint", str(cut), "--data-root", str(processed_root), "--n", "8",
                 "--device", "cpu", "--out", str(tmp_path / "ev")]) == 1
    assert "its teacher network does not fit" in one_line_error(capsys)
    assert main(train_args(processed_root, tmp_path / "runs", "--batch-size", "4", "--max-steps", "3",
                           "--resume", str(cut))) == 1
    said = one_line_error(capsys)
    assert f"checkpoint {cut}: its teacher network does not fit" in said and said.count(str(cut)) == 1
    assert main(["export", str(typed), "--out", str(tmp_path / "e2")]) == 1
    assert "its configuration is damaged (vit_dim is '64', not an integer)" in one_line_error(capsys)
    assert main(train_args(processed_root, tmp_path / "runs2", "--batch-size", "4", "--max-steps", "3",
                           "--resume", str(typed))) == 1
    assert "the checkpoint's configuration is damaged (vit_dim is '64', not an integer)" in one_line_error(capsys)

    assert main(["inspect", str(cut), str(typed), str(newer), str(one_step_checkpoint)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED (its teacher network does not fit the model its configuration describes" in out
    assert "DAMAGED (" in out.split(str(typed))[1] and "vit_dim is '64'" in out
    assert "NOT READABLE HERE (" in out and "format version 99 is newer than this dinox reads" in out
    assert out.split(str(one_step_checkpoint))[1].splitlines()[1].strip().startswith("status:       intact")


def test_ctrl_c_during_the_demos_probes_stops_the_demo(tmp_path):
    """The probe subcommand answers Ctrl+C with 130: the demo stops there, rather than report
    'probes: not available' and go on to a verdict."""
    from dinox.commands import demo

    with pytest.raises(SystemExit) as stopped:
        demo._probe(lambda argv: 130, tmp_path / "checkpoint_final_00000001.pth", tmp_path, tmp_path / "m.json",
                    "chest")
    assert stopped.value.code == 130


def test_the_seed_scripts_run_their_own_checkout_not_an_installed_dinox(tmp_path):
    """An older dinox installed elsewhere (earlier on sys.path than the checkout) must not
    answer for the checkout's scripts."""
    other = tmp_path / "site" / "dinox"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "cli.py").write_text("def main(argv):\n    print('the other dinox')\n    return 7\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_checkpoint.py"), "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "the other dinox" not in done.stdout
    assert "checkpoint" in done.stdout


def test_a_collapse_line_no_reading_can_reach_is_refused_before_any_work(capsys):
    """The collapse statistic is at most sqrt(n / (n - 1) / D) for n class tokens of width D:
    vit-tiny (D 192) at its batch of 8 can read 0.07 but never 0.08, which used to report
    every run as collapsed after its grace (with an emergency checkpoint)."""
    from dinox.errors import UserError
    from dinox.observe.anomaly import check_collapse_line

    assert main(["train", "--config", "vit-tiny", "--batch-size", "8", "--collapse-std", "0.08", "--dry-run"]) == 1
    err = one_line_error(capsys)
    assert "--collapse-std 0.08 cannot be reached: for 16 class tokens of width 192" in err
    assert "at most 0.0745" in err     # sqrt(16 / 15 / 192)
    assert main(["train", "--config", "vit-tiny", "--batch-size", "8", "--collapse-std", "0.07", "--dry-run"]) == 0
    check_collapse_line(0.01, 1536, rows=2)       # the seeds' 0.01 is reachable at ViT-Giant2's width
    check_collapse_line(0.0255, 1536, rows=256)
    with pytest.raises(UserError, match="at most 0.0256"):
        check_collapse_line(0.026, 1536, rows=256)


def test_a_non_positive_temperature_is_named_with_the_recipes_values(capsys):
    assert main(["train", "--config", "vit-tiny", "--teacher-temp", "0", "--dry-run"]) == 1
    err = one_line_error(capsys)
    assert "temperatures must be positive: --teacher-temp 0," in err
    assert "(the recipes: teacher 0.04, vit-tiny 0.02; student 0.1)" in err
