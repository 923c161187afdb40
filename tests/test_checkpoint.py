"""Checkpoint store: names, atomic saves under SIGKILL, integrity, rotation, resume
selection, disk-full handling, refusal of pickled code, RNG round trips, `dinox inspect`."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import runpy
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict, namedtuple
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinox.cli import main as cli_main
from dinox.errors import UserError
from dinox.model.weights import safe_torch_load
from dinox.run import checkpoint as ck
from dinox.run.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    new_run_dir,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
    sidecar_path,
    to_safe,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent


def make_state(step: int = 1, n: int = 1000) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "format": "dinox-checkpoint",
        "format_version": 1,
        "step": step,
        "student": {"backbone.blocks.0.attn.qkv.weight": torch.randn(n, generator=g),
                    "head.mlp.0.weight": torch.full((4, 4), 2.0)},
        "teacher": {"backbone.blocks.0.attn.qkv.weight": torch.ones(4),
                    "head.mlp.0.weight": torch.zeros(2)},
        "dino_loss": {"center": torch.arange(8, dtype=torch.float32).reshape(1, 8)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(n)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "scaler": None,
        "data": {"epoch": 0, "position": step * 8, "seed": 0},
        "config": {"config": "vit-tiny", "vit_patch": 16, "vit_dim": 192},
        "provenance": {"git_commit": "a1b2c3d-dirty", "data_manifest_hash": "1234abcd"},
    }


def save(run_dir: Path, step: int, kind: str = "periodic", n: int = 1000) -> Path:
    path = checkpoint_path(run_dir, step, kind)
    save_checkpoint(path, make_state(step, n))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- names

def test_names_and_run_dirs(tmp_path):
    assert checkpoint_path(tmp_path, 384).name == "checkpoint_00000384.pth"
    assert checkpoint_path(tmp_path, 384, "final").name == "checkpoint_final_00000384.pth"
    assert checkpoint_path(tmp_path, 7, "emergency").name == "checkpoint_emergency_00000007.pth"
    with pytest.raises(ValueError):
        checkpoint_path(tmp_path, 1, "best")
    assert ck.parse_checkpoint_name("checkpoint_final_00000384.pth") == (384, "final")
    assert ck.parse_checkpoint_name("checkpoint_123456789.pth") == (123456789, "periodic")
    assert ck.parse_checkpoint_name(".checkpoint_00000384.pth.host.12.tmp") is None
    assert ck.parse_checkpoint_name("checkpoint_00000384.pth.sha256") is None

    now = datetime(2026, 1, 3, 12, 0, 0)
    runs = [new_run_dir(tmp_path, now=now) for _ in range(12)]
    assert [r.name for r in runs[:3]] == ["20260103_120000", "20260103_120000_1", "20260103_120000_2"]
    later = new_run_dir(tmp_path, now=datetime(2026, 1, 3, 12, 0, 1))
    (tmp_path / "not_a_run").mkdir()
    assert ck.list_run_dirs(tmp_path) == runs + [later]  # _10 after _9, numeric


def test_save_load_roundtrip_with_sidecar(tmp_path):
    path = checkpoint_path(tmp_path, 5)
    state = make_state(5)
    state["metrics"] = {"loss": np.float32(1.5), "hist": np.arange(4, dtype=np.int16)}
    written = save_checkpoint(path, state)

    assert written == path.stat().st_size
    record = json.loads(sidecar_path(path).read_text())
    assert record == {"sha256": digest(path), "size": written}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    plain = torch.load(path, weights_only=True)  # no dinox needed to read it
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["student"]["backbone.blocks.0.attn.qkv.weight"],
                       state["student"]["backbone.blocks.0.attn.qkv.weight"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded["metrics"]["loss"] == 1.5 and isinstance(loaded["metrics"]["loss"], float)
    assert torch.equal(plain["metrics"]["hist"], torch.arange(4, dtype=torch.int16))
    assert verify_checkpoint(path) == (True, "sha256 and size match the record written at save time")


def test_save_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save(tmp_path, 1)
    assert any(s.endswith(".tmp") and "checkpoint_00000001.pth" in s for s in synced)
    assert str(tmp_path.resolve()) in synced


def test_overwrite_same_name_replaces_sidecar(tmp_path):
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint(path, make_state(3, n=100))
    save_checkpoint(path, make_state(4, n=5000))
    assert verify_checkpoint(path)[0]
    assert load_checkpoint(path)["step"] == 4


def test_to_safe_converts_numpy_and_names_bad_keys():
    safe = to_safe({"a": np.ones(3, dtype=np.float32), "b": [np.int64(2), np.bool_(True)],
                    "c": OrderedDict(x=torch.nn.Parameter(torch.ones(1))), "d": (torch.float16,)})
    assert torch.equal(safe["a"], torch.ones(3)) and safe["b"] == [2, True]
    assert type(safe["b"][0]) is int and type(safe["b"][1]) is bool
    assert type(safe["c"]) is OrderedDict and type(safe["c"]["x"]) is torch.Tensor
    with pytest.raises(TypeError, match=r"state\['config'\]\['out'\]: pathlib\..*Path"):
        to_safe({"config": {"out": Path("/tmp")}})
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\]"):
        to_safe({"rng": [1, {2, 3}]})
    with pytest.raises(TypeError, match=r"state\['p'\]"):
        to_safe({"p": namedtuple("P", "x")(1)})
    with pytest.raises(TypeError, match="object"):
        to_safe({"arr": np.array([object()])})


def test_module_state_dict_keeps_its_version_metadata(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, {"student": module.state_dict()})
    loaded = load_checkpoint(path)["student"]
    assert loaded._metadata == module.state_dict()._metadata
    module.load_state_dict(loaded)


def test_save_refuses_unsafe_state_before_writing(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    with pytest.raises(TypeError, match=r"state\['config'\]\['fn'\]"):
        save_checkpoint(path, {"config": {"fn": print}})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- atomicity

CHILD = textwrap.dedent("""
    import itertools, sys, time, torch
    from dinox.run import checkpoint as ck
    run_dir, start, pause_in = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def pausing(original, ready=lambda *args: True):
        # announce, then stall, once `ready` holds during the third save
        def wrapper(*args, **kwargs):
            if state["step"] == start + 2 and not paused and ready(*args):
                paused.append(1)
                print("paused", flush=True)
                time.sleep(60)
            return original(*args, **kwargs)
        return wrapper

    paused = []
    if pause_in == "write":
        ck._HashingWriter.write = pausing(ck._HashingWriter.write, lambda w, _: w.size > 20_000_000)
    elif pause_in == "sidecar":
        ck._write_sidecar = pausing(ck._write_sidecar)
    state = {"step": 0, "w": torch.randn(12_500_000)}  # 50 MB
    print("ready", flush=True)
    for step in itertools.count(start):
        state["step"] = step
        state["w"][0] = step
        print("saving", step, flush=True)
        ck.save_checkpoint(ck.checkpoint_path(run_dir, step), state)
        print("saved", step, flush=True)
        ck.rotate_checkpoints(run_dir, keep_last=2, milestone_every=3)
""")


@pytest.mark.parametrize("pause_in", ["write", "sidecar", "random"])
def test_sigkill_during_saves_never_leaves_a_damaged_final_name(tmp_path, pause_in):
    """Kill a saving process mid-write, between the rename and the sidecar, and at random
    moments: every file under a final name must verify and load, and the newest completed
    checkpoint must survive."""
    rng = random.Random(pause_in)
    run_dir = tmp_path / "20260103_120000"
    run_dir.mkdir()
    rounds = 2 if pause_in == "random" else 1
    saved_all: list[int] = []
    for round_ in range(rounds):
        start = round_ * 100
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(start), pause_in],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        target = "paused" if pause_in != "random" else f"saving {start + rng.randint(1, 3)}"
        while (line := child.stdout.readline().strip()) != target:
            assert line, "child exited early"
            if line.startswith("saved"):
                saved_all.append(int(line.split()[1]))
        if pause_in == "random":
            try:
                child.wait(timeout=rng.uniform(0.0, 0.25))  # inside or just after that save
            except subprocess.TimeoutExpired:
                pass
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        saved_all += [int(ln.split()[1]) for ln in rest.splitlines() if ln.startswith("saved")]

        finals = list_checkpoints(run_dir)
        for path in finals:
            ok, reason = verify_checkpoint(path)
            assert ok, f"{path.name}: {reason}"
            state = load_checkpoint(path)
            assert state["step"] == ck.parse_checkpoint_name(path)[0] == int(state["w"][0])
        assert checkpoint_path(run_dir, max(saved_all)) in finals  # newest completed survives
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    if pause_in == "write":
        assert checkpoint_path(run_dir, 2) not in finals
        assert [(tmp_path / "20260103_120000" / n).stat().st_size > 20_000_000 for n in leftovers] == [True]
    if pause_in == "sidecar":
        assert checkpoint_path(run_dir, 2) in finals and not sidecar_path(checkpoint_path(run_dir, 2)).exists()
        assert "no checksum record" in verify_checkpoint(checkpoint_path(run_dir, 2))[1]
    # the next save clears the temporaries of killed saves
    save_checkpoint(checkpoint_path(run_dir, 999), {"step": 999})
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert find_resume_checkpoint(tmp_path) == checkpoint_path(run_dir, 999)


# ----------------------------------------------------------------------------- damage

def test_an_edited_record_or_a_checkpoint_copied_over_another_is_told_from_damage(tmp_path):
    """The sha256 record and the file disagree, but the file is a whole zip (every CRC-32
    matches): refused all the same, with why and how to use it anyway."""
    import json

    edited, other, replaced = (save(tmp_path, s, n=20_000) for s in (1, 2, 3))
    record = json.loads(sidecar_path(edited).read_text())
    sidecar_path(edited).write_text(json.dumps({**record, "sha256": "0" * 64}))
    replaced.write_bytes(save(tmp_path / "elsewhere", 9, n=30_000).read_bytes())
    padding = save(tmp_path, 4, n=20_000)   # a byte of a zip header's padding: no tensor changed
    data = bytearray(padding.read_bytes())
    with zipfile.ZipFile(padding) as archive:   # torch pads a local header's extra field to align the data
        padded = [(m.header_offset + 30 + len(m.filename), int.from_bytes(data[m.header_offset + 28:][:2], "little"))
                  for m in archive.infolist()]
    start, extra = next((start, extra) for start, extra in padded if extra > 4)
    data[start + 4] ^= 0xFF   # the first byte of padding after the extra field's 4-byte header
    padding.write_bytes(bytes(data))
    for path, what in ((edited, "sha256 differs"), (replaced, "size is"), (padding, "sha256 differs")):
        ok, reason = verify_checkpoint(path)
        assert not ok and reason.startswith(what), reason
        assert "every member of the file passes the zip's CRC-32" in reason
        assert f"delete {sidecar_path(path).name}" in reason and "damaged" not in reason
        with pytest.raises(CheckpointError, match=r" does not match its integrity record: "):
            ck.load_checkpoint(path)
    sidecar_path(edited).unlink()   # as the message says
    assert verify_checkpoint(edited)[0]
    assert verify_checkpoint(other)[0]
    sidecar_path(padding).unlink()
    assert verify_checkpoint(padding)[0]


def test_a_checkpoint_set_aside_for_its_edited_record_is_named_as_it_now_is(tmp_path, caplog):
    """`--resume auto` sets aside the checkpoints after the one it takes that fail their check;
    for a record mismatch of a whole file the advice names the renamed files, not the old ones."""
    import json

    first, second = save(tmp_path, 1), save(tmp_path, 2)
    record = json.loads(sidecar_path(second).read_text())
    sidecar_path(second).write_text(json.dumps({**record, "sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="dinox"):
        moved = ck.set_aside_damaged_after(first)
    assert [p.name for p in moved] == ["checkpoint_00000002.pth.damaged"]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert ("rename it back to checkpoint_00000002.pth, delete checkpoint_00000002.pth.damaged.sha256 and resume "
            "from it") in message and "set aside damaged" not in message
    assert (tmp_path / "checkpoint_00000002.pth.damaged.sha256").exists()


def test_truncated_and_flipped_files_are_detected(tmp_path):
    good = save(tmp_path, 1, n=20_000)
    truncated = save(tmp_path, 2, n=20_000)
    flipped = save(tmp_path, 3, n=20_000)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    data = bytearray(flipped.read_bytes())
    weights = make_state(3, 20_000)["student"]["backbone.blocks.0.attn.qkv.weight"]
    data[data.index(weights[:8].numpy().tobytes()) + 4] ^= 0xFF   # a byte inside a tensor
    flipped.write_bytes(bytes(data))

    assert verify_checkpoint(good)[0]
    ok, reason = verify_checkpoint(truncated)
    assert not ok and "size" in reason
    ok, reason = verify_checkpoint(flipped)
    assert not ok and "sha256" in reason
    with pytest.raises(CheckpointError, match=r" is damaged: sha256 differs .*\(bytes damaged\)"):
        ck.load_checkpoint(flipped)
    with pytest.raises(CheckpointError, match=r"checkpoint_00000003\.pth is damaged.*earlier checkpoint.*checkpoint_00000002"):
        load_checkpoint(flipped)
    # without the sidecar a truncated file still fails, through the full load
    sidecar_path(truncated).unlink()
    ok, reason = verify_checkpoint(truncated)
    assert not ok and "truncated: its zip directory is missing" in reason
    with pytest.raises(CheckpointError, match=r"checkpoint_00000002\.pth is truncated.*earlier checkpoint.*"
                                              r"checkpoint_00000001"):
        load_checkpoint(truncated)
    sidecar_path(good).unlink()
    ok, reason = verify_checkpoint(good)
    assert ok and "no checksum record" in reason
    assert load_checkpoint(good)["step"] == 1
    empty = checkpoint_path(tmp_path, 4)
    empty.touch()
    assert verify_checkpoint(empty) == (False, "empty file (0 bytes)")
    assert verify_checkpoint(tmp_path / "missing.pth") == (False, "no such file")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("content, says", [
    (b"step,loss\n1,6.9\n", r"is a text file \('step,loss'\.\.\.\), not a PyTorch file"),
    (b"\x00\x01\x02\x03binary", r"is not a PyTorch file \(it starts with b'\\x00"),
    (b"", r"is empty \(0 bytes\)"),
    (pickle.dumps([1, 2], protocol=4), r"is a plain Python pickle, not a PyTorch file"),
])
def test_a_file_that_is_no_torch_save_says_what_it_is(tmp_path, content, says, recwarn):
    """torch's own reason for a text file is "KeyError: 101"; the message says what the bytes are."""
    path = checkpoint_path(tmp_path, 7)
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says + r".*; use an earlier checkpoint of the run instead, or a copy"):
        load_checkpoint(path)
    other = tmp_path / "notes.pth"          # not named like a run's checkpoint: no advice about the run
    other.write_bytes(content)
    with pytest.raises(CheckpointError, match=says + r"[^;]*$"):
        load_checkpoint(other)
    with pytest.raises(UserError, match=says):
        safe_torch_load(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]   # torch's internals stay quiet


def test_the_legacy_torch_save_format_still_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(2))


def test_find_resume_skips_damaged_with_warning_and_falls_back(tmp_path, caplog):
    assert find_resume_checkpoint(tmp_path / "nowhere") is None
    old_run = tmp_path / "20260101_000000"
    new_run = tmp_path / "20260102_000000"
    empty_run = tmp_path / "20260103_000000"
    for d in (old_run, new_run, empty_run):
        d.mkdir()
    save(old_run, 50)
    save(new_run, 100)
    newest = save(new_run, 200)
    assert find_resume_checkpoint(tmp_path) == newest  # empty newer run is ignored

    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="dinox.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == checkpoint_path(new_run, 100)
    assert "checkpoint_00000200.pth" in caplog.text and "skipping damaged" in caplog.text

    checkpoint_path(new_run, 100).write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinox.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == checkpoint_path(old_run, 50)
    assert "no intact checkpoint" in caplog.text


def test_resume_preference_between_kinds(tmp_path, caplog):
    run = tmp_path / "20260101_000000"
    save(run, 384)
    final = save(run, 384, "final")
    assert find_resume_checkpoint(tmp_path) == final
    emergency = save(run, 390, "emergency")
    with caplog.at_level(logging.WARNING, logger="dinox.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == emergency
    assert "emergency" in caplog.text
    save(run, 390)
    assert find_resume_checkpoint(tmp_path) == checkpoint_path(run, 390)
    assert [p.name for p in list_checkpoints(run)] == [
        "checkpoint_00000384.pth", "checkpoint_final_00000384.pth",
        "checkpoint_emergency_00000390.pth", "checkpoint_00000390.pth"]


# ----------------------------------------------------------------------------- rotation

def test_rotation_keeps_newest_milestones_final_and_emergency(tmp_path):
    for step in range(100, 1100, 100):
        save(tmp_path, step, n=10)
    save(tmp_path, 250, "emergency", n=10)
    save(tmp_path, 1000, "final", n=10)
    deleted = rotate_checkpoints(tmp_path, keep_last=3, milestone_every=500)
    assert sorted(ck.parse_checkpoint_name(p)[0] for p in deleted) == [100, 200, 300, 400, 600]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [checkpoint_path(tmp_path, s).name for s in (500, 700, 800, 900, 1000)]
        + [f"{checkpoint_path(tmp_path, s).name}.sha256" for s in (500, 700, 800, 900, 1000)]
        + ["checkpoint_emergency_00000250.pth", "checkpoint_emergency_00000250.pth.sha256",
           "checkpoint_final_00001000.pth", "checkpoint_final_00001000.pth.sha256"])
    assert [p.name for p in rotate_checkpoints(tmp_path, keep_last=0)] == [
        f"checkpoint_{s:08d}.pth" for s in (500, 700, 800, 900)]  # keep_last<1 -> 1, no milestones now
    assert checkpoint_path(tmp_path, 1000).exists()
    for step in (450, 650, 1000):
        save(tmp_path, step, "emergency", n=10)
    assert rotate_checkpoints(tmp_path, keep_last=2, kind="emergency") == [
        checkpoint_path(tmp_path, s, "emergency") for s in (250, 450)]   # the newest 2 emergency ones kept
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_00001000.pth", "checkpoint_emergency_00000650.pth", "checkpoint_emergency_00001000.pth",
        "checkpoint_final_00001000.pth"]


def test_rotation_spares_an_intact_checkpoint_when_newer_ones_lack_records(tmp_path, caplog):
    for step in (1, 2, 3):
        save(tmp_path, step, n=10)
    sidecar_path(checkpoint_path(tmp_path, 3)).unlink()
    checkpoint_path(tmp_path, 3).write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="dinox.checkpoint"):
        deleted = rotate_checkpoints(tmp_path, keep_last=1)
    assert deleted == [checkpoint_path(tmp_path, 1)]
    assert checkpoint_path(tmp_path, 2).exists() and "keeping checkpoint_00000002.pth" in caplog.text


# ----------------------------------------------------------------------------- disk full

def test_low_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    previous = save(tmp_path, 1, n=10)
    before = digest(previous)
    monkeypatch.setattr(ck.shutil, "disk_usage",
                        lambda _: SimpleNamespace(total=10**12, used=10**12 - 10**6, free=10**6))
    # 2 x 40 MB of tensors + 2 % + 64 MiB margin = 0.149 GB
    with pytest.raises(CheckpointError, match=r"not enough disk space to save checkpoint_00000002\.pth: "
                                              r"need 0\.15 GB, 1\.0 MB free at .*--ckpt-keep-last"):
        save(tmp_path, 2, n=10_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name, previous.name + ".sha256"]
    assert digest(previous) == before


@pytest.mark.parametrize("where", ["torch.save", "mid-write"])
def test_enospc_during_write_cleans_up_and_keeps_previous(tmp_path, monkeypatch, where):
    previous = save(tmp_path, 1, n=10)
    before = digest(previous)
    if where == "torch.save":
        def failing_save(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ck.torch, "save", failing_save)
    else:
        real_write = ck._HashingWriter.write

        def write(self, data):
            if self.size > 50_000:
                self.error = OSError(errno.ENOSPC, "No space left on device")
                raise self.error
            return real_write(self, data)
        monkeypatch.setattr(ck._HashingWriter, "write", write)
    with pytest.raises(CheckpointError, match=r"not enough disk space to save checkpoint_00000002\.pth: need [0-9.]+ [MG]B, [0-9.]+ [MG]B free"):
        save(tmp_path, 2, n=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name, previous.name + ".sha256"]
    assert digest(previous) == before and verify_checkpoint(previous)[0]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = ck.host_tag()
    stale = tmp_path / f".checkpoint_00000005.pth.{host}.{dead.pid}.tmp"
    foreign = tmp_path / f".checkpoint_00000005.pth.otherhost.{dead.pid}.tmp"
    alive = tmp_path / f".checkpoint_00000005.pth.{host}.{os.getppid()}.tmp"
    for p in (stale, foreign, alive):
        p.write_bytes(b"x" * 100)
    save(tmp_path, 6, n=10)
    assert not stale.exists() and foreign.exists() and alive.exists()


def test_the_lock_holder_removes_what_an_interrupted_save_left_on_another_node(tmp_path):
    """A save killed on one node (SIGKILL at the end of a scheduler's grace period) leaves its
    temporary under that node's name, a ViT-Giant's 20 GB; the job requeued onto another node
    holds the run folder's lock, so no other process saves there: that debris goes, at the
    lock and at every save. Another launch's lock temporary stays (it may be trying the lock)."""
    host = ck.host_tag()
    other_node = tmp_path / ".checkpoint_00000300.pth.node-a.4242.tmp"
    other_sidecar = tmp_path / ".checkpoint_00000300.pth.sha256.node-a.4242.tmp"
    live_pid = tmp_path / f".checkpoint_00000300.pth.{host}.{os.getppid()}.tmp"   # a pid reused since
    prober = tmp_path / ".train.lock.node-b.77.tmp"
    for p in (other_node, other_sidecar, live_pid, prober):
        p.write_bytes(b"x" * 100)
    with ck.lock_run_dir(tmp_path):
        assert not other_node.exists() and not other_sidecar.exists() and not live_pid.exists()
        assert prober.exists()
        later = tmp_path / ".checkpoint_00000305.pth.node-a.4243.tmp"
        later.write_bytes(b"x" * 100)
        save(tmp_path, 310, n=10)
        assert not later.exists() and verify_checkpoint(checkpoint_path(tmp_path, 310))[0]


# ----------------------------------------------------------------------------- pickled code

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    run = tmp_path / "runs" / "20260101_000000"
    run.mkdir(parents=True)
    evil = checkpoint_path(run, 10)
    torch.save({"step": 10, "x": _Payload(str(marker))}, evil)  # no sidecar: full-load path
    evil_with_record = checkpoint_path(run, 20)
    torch.save({"step": 20, "x": _Payload(str(marker))}, evil_with_record)
    sidecar_path(evil_with_record).write_text(json.dumps(
        {"sha256": digest(evil_with_record), "size": evil_with_record.stat().st_size}))

    for path in (evil, evil_with_record):
        with pytest.raises(CheckpointError, match="contains non-weights objects.*will not be loaded"):
            load_checkpoint(path)
    for path in (evil, evil_with_record):
        ok, reason = verify_checkpoint(path)
        assert not ok and "non-weights objects" in reason and "posix.system" in reason
    assert find_resume_checkpoint(tmp_path / "runs") is None
    assert cli_main(["inspect", str(evil), str(evil_with_record)]) == 1
    assert capsys.readouterr().out.count("non-weights objects") == 2
    assert not marker.exists()


# ----------------------------------------------------------------------------- RNG

def _draw(generator: torch.Generator) -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.rand(2, generator=generator).tolist())


def test_rng_roundtrip_in_memory_and_through_disk(tmp_path):
    gen = torch.Generator().manual_seed(7)
    random.gauss(0, 1)  # leave a cached gaussian in both python and numpy states
    np.random.randn()
    state = capture_rng_state("cpu", generators={"augment": gen})
    first = _draw(gen)
    restore_rng_state(state, "cpu", generators={"augment": gen})
    assert _draw(gen) == first

    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, {"rng": state})
    _draw(gen)
    restore_rng_state(load_checkpoint(path)["rng"], torch.device("cpu"), generators={"augment": gen})
    assert _draw(gen) == first
    assert torch.load(path, weights_only=True)["rng"]["torch"].dtype == torch.uint8


def test_restore_tolerates_foreign_hardware_states(caplog):
    state = capture_rng_state("cpu")
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with caplog.at_level(logging.INFO, logger="dinox.checkpoint"):
        restore_rng_state(state, "cpu", generators={"new": torch.Generator()})
    assert "CUDA RNG states" in caplog.text and "'new'" in caplog.text


# ----------------------------------------------------------------------------- inspect

def test_inspect_reports_and_exit_codes(tmp_path, capsys):
    good = save(tmp_path, 100)
    assert cli_main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    for expected in ("intact", "step:         100", "vit_patch=16", "git_commit=a1b2c3d-dirty",
                     "data_manifest_hash=1234abcd", "DINO centre:  out_dim=8 mean=3.5",
                     "student L2:", "head=8", "teacher L2:   total=2 backbone=2 head=0"):
        assert expected in out, expected

    bad = save(tmp_path, 200)
    bad.write_bytes(bad.read_bytes()[:-10])
    assert cli_main(["inspect", "--json", str(good), str(bad)]) == 1
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["intact"] for r in reports] == [True, False]
    assert reports[0]["step"] == 100 and reports[0]["size_bytes"] == good.stat().st_size
    assert reports[0]["dino_center"]["max"] == 7.0
    assert reports[0]["student_norms"]["modules"]["head"] == pytest.approx(8.0)
    assert "size" in reports[1]["reason"] and reports[1]["path"] == str(bad)


def test_inspect_reads_flat_trainer_config(tmp_path, capsys):
    state = make_state(3)
    state["config"] = {"config": "vit-large", "vit_patch": 16, "vit_dim": 1024, "lr": 1e-3}
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint(path, state)
    assert cli_main(["inspect", "--json", str(path)]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model == {"preset": "vit-large", "vit_patch": 16, "vit_dim": 1024}


def test_check_checkpoint_script(tmp_path, monkeypatch, capsys):
    good = save(tmp_path, 1, n=10)
    monkeypatch.setattr(sys, "argv", ["check_checkpoint.py", str(good), str(tmp_path / "nope.pth")])
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # what `python scripts/x.py` does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / "check_checkpoint.py"), run_name="__main__")
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "intact" in out and "MISSING (no such file)" in out


def test_check_checkpoint_script_runs_uninstalled_from_checkout(tmp_path):
    """`python -S` skips the editable-install .pth file; site-packages stays importable
    through PYTHONPATH, so only the script's own ../src fallback can find dinox."""
    good = save(tmp_path, 1, n=10)
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    env = {**os.environ, "PYTHONPATH": site}
    probe = subprocess.run([sys.executable, "-S", "-c", "import dinox"], env=env, cwd=tmp_path,
                           capture_output=True)
    assert probe.returncode != 0  # dinox really is not importable this way
    result = subprocess.run([sys.executable, "-S", str(REPO / "scripts" / "check_checkpoint.py"), str(good)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "intact" in result.stdout


def test_link_or_copy_gives_a_verified_second_name(tmp_path):
    src = save(tmp_path, 384)
    dst = ck.link_or_copy(src, checkpoint_path(tmp_path, 384, "final"))
    assert verify_checkpoint(dst)[0] and load_checkpoint(dst)["step"] == 384
    src.unlink()
    rotate_checkpoints(tmp_path, keep_last=1)
    assert verify_checkpoint(dst)[0]


def test_inspect_says_a_sinkhorn_runs_centre_is_unused_not_zero(tmp_path, capsys):
    state = make_state(3)
    state["config"] = {"config": "vit-tiny", "centering": "sinkhorn"}
    state["dino_loss"] = {"center": torch.zeros(1, 8)}
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint(path, state)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DINO centre:  not used: the run has Sinkhorn-Knopp targets" in out and "mean=0 std=0" not in out
