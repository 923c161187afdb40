"""FSDP2 sharding and sharded (DCP) checkpoints, with 2 CPU processes over gloo.

FSDP must compute what DDP computes; a sharded run killed after a checkpoint resumes
bitwise on the same number of processes and with the same weights on one process; a
kill during a sharded save never leaves a directory under a final name. Also what any
torchrun launch must do: refuse ranks launched differently, report a non-finite halt
once, leave a finished run alone and make room on a full disk.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_support import TINY_MODEL, only_run, processed_root  # noqa: F401
from dinox.cli import main
from dinox.run import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
# Drop path, local crops and accumulation on; no BatchNorm in the head: the bias before a BN
# layer has an exactly zero gradient, so AdamW turns the rounding noise of any two
# reduction orders into lr-sized updates and the runs could not agree on it.
COMMON = ("--batch-size", "4", "--accumulation-steps", "2", "--local-crops", "2", "--local-size", "16",
          "--drop-path", "0.1", "--head-bn", "false", "--num-workers", "0", "--ckpt-every", "2",
          "--ckpt-keep-last", "2")


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    manifest = next((root / "_splits").glob("*.json"))
    return [*TINY_MODEL, "--data-root", str(root), "--split-manifest", str(manifest), "--out", str(out), *COMMON,
            *extra]


def _torchrun(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "scripts" / "phase5_big_run.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 240, succeeds: bool = True) -> str:
    """The output of a launch that succeeds (or, `succeeds=False`, fails); a hang fails the test."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("torchrun did not end in time (a rank hung)")
    assert (proc.returncode == 0) == succeeds, out[-3000:]
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (in their own process groups) and torchrun itself."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _final(run: Path) -> dict:
    final = [p for p in ckpt.list_checkpoints(run) if ckpt.parse_checkpoint_name(p)[1] == "final"][-1]
    return ckpt.load_checkpoint(final)


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].is_floating_point())


def test_fsdp_computes_what_ddp_computes(processed_root, tmp_path):
    runs = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        log = _finish(_torchrun(_args(processed_root, out, "--max-steps", "6", "--parallel", parallel,
                                      "--eval-every", "3", "--eval-n", "16")))
        runs[parallel] = only_run(out)
        if parallel == "fsdp":
            assert "parallel: FSDP2 over 2 ranks" in log and "rank 0 holds" in log
            assert "returned a view tensor" not in log   # a warning at every step, answered in fully_shard_units
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    la, lb = _losses(ddp), _losses(fsdp)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in la), (la, lb)
    a, b = _final(ddp), _final(fsdp)
    for net in ("student", "teacher"):
        assert _max_difference(a[net], b[net]) <= 1e-5, net
    # sharded checkpoints, rotated like files: the newest 2 periodic ones and the final
    names = sorted(p.name for p in ckpt.list_checkpoints(fsdp))
    assert names == ["checkpoint_00000004.dcp", "checkpoint_00000006.dcp", "checkpoint_final_00000006.dcp"]
    assert all(ckpt.verify_checkpoint(p)[0] for p in ckpt.list_checkpoints(fsdp))
    assert b["data"]["world_size"] == 2 and len(b["ranks"]) == 2
    # in-training retrieval sees the same teacher (gathered whole from its shards under FSDP)
    evals = [{r["step"]: r["Eval/Effective_Rank"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
              .splitlines()) if "Eval/Effective_Rank" in r} for run in (ddp, fsdp)]
    assert sorted(evals[1]) == [0, 3, 6]
    assert all(abs(evals[0][k] - evals[1][k]) < 1e-3 for k in evals[0])


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_run_killed_resumes_bitwise_on_two_and_exactly_on_one_process(processed_root, tmp_path, parallel):
    """Every rank's RNG streams and data position are in the checkpoint (sharded or not)."""
    steps = ("--max-steps", "8", "--parallel", parallel)
    straight = tmp_path / "straight"
    _finish(_torchrun(_args(processed_root, straight, *steps)))

    killed = tmp_path / "killed"
    proc = _torchrun(_args(processed_root, killed, *steps))
    deadline = time.monotonic() + 180
    while not [p for p in killed.glob("*/checkpoint_00000002.*") if p.suffix in (".dcp", ".sha256")]:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.005)
    _kill_tree(proc)
    run = only_run(killed)
    assert not list(run.glob("checkpoint_final_*")), "the run finished before it could be killed"
    saved = [p for p in ckpt.list_checkpoints(run)]
    step = ckpt.parse_checkpoint_name(saved[-1])[0]
    one = tmp_path / "one"
    shutil.copytree(killed, one)

    # the same two processes: bitwise equal to the uninterrupted run
    _finish(_torchrun(_args(processed_root, killed, *steps, "--resume", "auto")))
    a, b = _final(only_run(straight)), _final(run)
    flat_a, flat_b = _leaves(a), _leaves(b)
    keys = {k for k in flat_a if not k.startswith(("provenance.", "config.resume", "config.out", "sharded_path"))}
    assert keys == {k for k in flat_b if not k.startswith(("provenance.", "config.resume", "config.out",
                                                            "sharded_path"))}
    different = [k for k in sorted(keys) if not (torch.equal(flat_a[k], flat_b[k]) if isinstance(flat_a[k], torch.Tensor)
                                                 else flat_a[k] == flat_b[k])]
    assert not different, different[:8]
    assert _losses(only_run(straight)) == _losses(run)

    # one process: the same step and weights, the world-size change logged, and it trains on
    source = ckpt.load_checkpoint(sorted(ckpt.list_checkpoints(only_run(one)))[-1])
    manifest = next((processed_root / "_splits").glob("*.json"))
    one_args = ["train", *TINY_MODEL, "--data-root", str(processed_root), "--split-manifest", str(manifest),
                "--out", str(one), *COMMON, "--parallel", "fsdp", "--resume", "auto"]  # fsdp: noted, unsharded
    assert main([*one_args, "--max-steps", str(step)]) == 0
    resumed = _final(only_run(one))
    assert resumed["step"] == step
    for net in ("student", "teacher", "gram_teacher"):
        assert _max_difference(source[net], resumed[net]) <= 1e-6, net
    log = (only_run(one) / "train.log").read_text()
    assert f"(step {step})" in log and "the number of processes changed (2 -> 1)" in log
    assert "--parallel fsdp in a single process" in log
    assert main([*one_args, "--max-steps", "8"]) == 0
    assert ckpt.parse_checkpoint_name(sorted(only_run(one).glob("checkpoint_final_*.pth"))[-1])[0] == 8


def _leaves(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k2: v2 for key, value in obj.items() for k2, v2 in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, value in enumerate(obj) for k2, v2 in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


_CRASHING_SAVE = r"""
import os, sys, torch
from pathlib import Path
from dinox.run import checkpoint as ckpt, sharded
where = sys.argv[2]
if where == "during-dcp":
    import torch.distributed.checkpoint as dcp
    real = dcp.save
    def save(state, **kwargs):
        real(state, **kwargs)
        os._exit(9)  # shards written, nothing else
    dcp.save = save
else:
    sharded.replace_dir = lambda src, dst: os._exit(9)  # manifest written, not yet renamed
one = lambda x: [x]
ckpt.save_sharded_checkpoint(Path(sys.argv[1]), {"student": {"w": torch.ones(4)}}, {"step": 4},
                             rank=0, gather=one, barrier=lambda: None, broadcast=lambda x: x)
"""


@pytest.mark.parametrize("where", ["during-dcp", "before-rename"])
def test_kill_during_a_sharded_save_leaves_no_final_name(tmp_path, where):
    run = tmp_path / "20260101_000000"
    run.mkdir()
    older = ckpt.checkpoint_path(run, 2, sharded=True)
    one = lambda x: [x]  # noqa: E731
    ckpt.save_sharded_checkpoint(older, {"student": {"w": torch.zeros(4)}}, {"step": 2}, rank=0, gather=one,
                                 barrier=lambda: None, broadcast=lambda x: x)
    target = ckpt.checkpoint_path(run, 4, sharded=True)
    proc = subprocess.run([sys.executable, "-c", _CRASHING_SAVE, str(target), where], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not target.exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == [older.name]
    assert any(p.name.endswith(".tmp") for p in run.iterdir())  # the debris is hidden
    assert ckpt.find_resume_checkpoint(tmp_path) == older
    # the next save removes the dead process's debris
    ckpt.save_sharded_checkpoint(target, {"student": {"w": torch.ones(4)}}, {"step": 4}, rank=0, gather=one,
                                 barrier=lambda: None, broadcast=lambda x: x)
    assert sorted(p.name for p in run.iterdir()) == [older.name, target.name]
    assert ckpt.verify_checkpoint(target)[0]


def test_damaged_shard_is_detected_and_skipped(tmp_path):
    run = tmp_path / "20260101_000000"
    run.mkdir()
    one = lambda x: [x]  # noqa: E731
    paths = []
    for step in (2, 4):
        path = ckpt.checkpoint_path(run, step, sharded=True)
        ckpt.save_sharded_checkpoint(path, {"student": {"w": torch.full((64,), float(step))}}, {"step": step},
                                     rank=0, gather=one, barrier=lambda: None, broadcast=lambda x: x)
        paths.append(path)
    shard = next(paths[1].glob("__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    intact, reason = ckpt.verify_checkpoint(paths[1])
    assert not intact and "sha256" in reason
    assert ckpt.find_resume_checkpoint(tmp_path) == paths[0]
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_checkpoint(paths[1])
    assert float(ckpt.load_checkpoint(paths[0])["student"]["w"][0]) == 2.0


def test_dry_run_plans_fsdp_per_rank_and_proposes_a_world_size(capsys):
    flags = ["train", "--config", "vit-giant", "--parallel", "fsdp", "--dry-run", "--device-memory", "24",
             "--batch-size", "16", "--grad-checkpoint", "--amp", "--json"]
    assert main([*flags, "--world-size", "4"]) == 0
    fits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fits["fits"] and fits["world_size"] == 4 and fits["memory_estimate_gb"] < 0.9 * 24
    assert main([*flags, "--world-size", "1"]) == 3
    refused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not refused["fits"]
    proposal = [s for s in refused["suggestions"] if "FSDP2 over" in s]
    assert proposal, refused["suggestions"]
    world = int(proposal[0].split("FSDP2 over ")[1].split()[0])
    assert main([*flags, "--world-size", str(world)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"]
    assert main([*flags, "--world-size", str(world // 2)]) == 3  # the smallest that fits


def test_world_size_outside_a_dry_run_is_a_one_line_error(processed_root, tmp_path, capsys):
    manifest = next((processed_root / "_splits").glob("*.json"))
    code = main(["train", *TINY_MODEL, "--data-root", str(processed_root), "--split-manifest", str(manifest),
                 "--out", str(tmp_path), "--world-size", "4"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--world-size only plans" in err and "Traceback" not in err


def _two_nodes(args_a: list[str], args_b: list[str]) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2 --rdzv-backend c10d`: two launchers on one machine stand in for
    two nodes of one process each, each with its own command line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dinox-test",
         str(REPO / "scripts" / "phase5_big_run.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        for args in (args_a, args_b)]


def test_two_nodes_by_c10d_rendezvous_without_slurm(processed_root, tmp_path):
    """Without registers (a warm start from DINOv2 without them): FSDP2 could not
    reduce-scatter the empty register tokens' gradient."""
    out = tmp_path / "runs"
    args = _args(processed_root, out, "--max-steps", "2", "--parallel", "fsdp", "--registers", "0")
    logs = [_finish(node) for node in _two_nodes(args, args)]
    assert any("parallel: FSDP2 over 2 ranks" in log for log in logs)
    run = only_run(out)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint_00000002.dcp", "checkpoint_final_00000002.dcp"]
    assert _final(run)["data"]["world_size"] == 2


def test_ranks_launched_with_other_settings_are_refused_on_every_rank(processed_root, tmp_path):
    """Unchecked, another --batch-size on one node trained silently on the wrong batch, and
    another --max-steps hung in a collective until gloo's 30 min timeout."""
    out = tmp_path / "runs"
    base = _args(processed_root, out, "--max-steps", "2")
    nodes = _two_nodes([*base, "--batch-size", "4"], [*base, "--batch-size", "2"])
    for log in [_finish(node, succeeds=False) for node in nodes]:
        assert ("error: the ranks of this run were launched differently: batch_size 4 on rank 0, 2 on rank 1"
                in log), log[-3000:]
    assert not list(out.glob("*/checkpoint_*")), "nothing may be trained"


def test_a_nonfinite_halt_is_reported_once_with_its_checkpoint(processed_root, tmp_path):
    """Rank 1 holds no checkpoint path and must not report "emergency checkpoint ...: None"."""
    out = tmp_path / "runs"
    run = _torchrun(_args(processed_root, out, "--max-steps", "6", "--lr", "1e30", "--clip-grad", "0"))
    log = _finish(run, succeeds=False)
    halted = [line for line in log.splitlines() if "training halted; emergency checkpoint" in line]
    assert len(halted) == 1, halted
    emergency = [p.name for p in only_run(out).glob("checkpoint_emergency_*.pth")]
    assert emergency and f"/{emergency[0]};" in halted[0], (halted, emergency)
    assert log.count("non-finite loss: diagnostics") == 1


def _files(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.is_file() and p.suffix != ".lock" and "tfevents" not in p.name}


def test_a_finished_sharded_run_relaunched_as_it_was_is_left_alone(processed_root, tmp_path):
    """A requeued job with --resume auto, as for a finished single-file run: no checkpoint
    rewritten (others may have recorded its hashes), exit 0."""
    out = tmp_path / "runs"
    steps = ("--max-steps", "2", "--parallel", "fsdp", "--resume", "auto")
    _finish(_torchrun(_args(processed_root, out, *steps)))
    run = only_run(out)
    before = _files(run)
    assert "checkpoint_final_00000002.dcp/manifest.json" in before
    log = _finish(_torchrun(_args(processed_root, out, *steps)))
    assert "the run is finished, nothing to train or rewrite" in log, log[-2000:]
    assert _files(run) == before


# Each rank runs this in place of scripts/phase5_big_run.py: the disk reads as full once, when
# the run folder already holds checkpoint 4 (at the save of step 6).
_FILLS_ONCE = r"""
import shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv.pop(1))
real, fired = shutil.disk_usage, []
def disk_usage(path):
    usage = real(path)
    if not fired and (Path(path) / "checkpoint_00000004.dcp").is_dir():
        fired.append(path)
        return usage._replace(free=0)
    return usage
shutil.disk_usage = disk_usage
from _shim import dinox_main
sys.exit(dinox_main(["train", *sys.argv[1:]]))
"""


def test_a_full_disk_rotates_out_an_old_sharded_checkpoint_early(processed_root, tmp_path):
    """As for single-file checkpoints (docs/phase5_big_run.md, "Checkpoints"): a disk that
    fills during the run costs an old checkpoint, not the run."""
    script = tmp_path / "fills_once.py"
    script.write_text(_FILLS_ONCE)
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = _args(processed_root, out, "--max-steps", "6", "--parallel", "fsdp")  # every 2 steps, 2 kept
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(REPO / "scripts"), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rotated out checkpoint_00000002.dcp early to make room" in proc.stdout, proc.stdout[-3000:]
    names = sorted(p.name for p in only_run(out).glob("checkpoint_*"))
    assert names == ["checkpoint_00000004.dcp", "checkpoint_00000006.dcp", "checkpoint_final_00000006.dcp"]


def test_ranks_started_by_hand_on_a_taken_port_get_one_line(processed_root, tmp_path, monkeypatch, capsys):
    """Without torchrun (RANK, WORLD_SIZE, MASTER_PORT set by hand), a port another program
    holds gave a bare DistNetworkError traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        assert main(["train", *_args(processed_root, tmp_path / "runs", "--max-steps", "2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rank 0 of 2 could not join the process group at 127.0.0.1:"), err
    assert "address already in use" in err[0] and "torchrun" in err[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_lines_off_rank_0_name_their_rank(monkeypatch, capsys):
    """Every rank prints its warnings and errors: one that a single rank meets says which
    (here a rank started by hand without MASTER_ADDR, which gave a ValueError traceback)."""
    from dinox.run.logging import rank_prefix

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert rank_prefix() == "[rank 1] "
    assert main(["train", "--config", "vit-tiny", "--data-root", "/no/such/root"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 1] error: rank 1 of 2 could not join the process group at ?:"), err
    assert "MASTER_ADDR expected" in err[0]
    monkeypatch.setenv("RANK", "0")
    assert rank_prefix() == ""


def test_a_second_stop_signals_line_off_rank_0_names_its_rank(monkeypatch, capsys):
    """Every rank prints it (each its own second signal): rank 1's line lacked "[rank 1] "."""
    import dinox.cli
    from dinox.run.signals import stopped_at_once

    def interrupted(argv):
        raise stopped_at_once(signal.SIGTERM, saved=True)

    monkeypatch.setattr(dinox.cli, "_run", interrupted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 1] stopped at once by a second stop signal (SIGTERM)"), err


_ORPHANED = r"""
import os, signal, subprocess, sys, time
if sys.argv[1] == "parent":   # starts the rank and ends, as a torchrun killed outright
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[2], "rank", sys.argv[2], sys.argv[3]],
                            stdout=subprocess.PIPE)
    rank.stdout.readline()   # watching
    sys.exit(0)
from dinox.run.signals import stop_when_orphaned
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
stop_when_orphaned(poll_s=0.02)
print("watching", flush=True)
deadline = time.monotonic() + 1
while time.monotonic() < deadline:
    time.sleep(0.05)
open(sys.argv[3], "w").write(str(len(got)))
"""


def test_a_rank_whose_launcher_is_gone_is_asked_to_stop_once(tmp_path):
    """A torchrun killed outright (or by SIGUSR1, which it does not forward by default) left its
    ranks training on as orphans. One SIGTERM: a second would stop at once, without saving."""
    result = tmp_path / "signals"
    subprocess.run([sys.executable, "-c", _ORPHANED, "parent", _ORPHANED, str(result)], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while not result.exists() or not result.read_text():
        assert time.monotonic() < deadline, "the orphaned rank did not finish"
        time.sleep(0.05)
    assert result.read_text() == "1"


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGUSR1])
def test_ranks_of_a_launcher_killed_outright_save_and_stop(processed_root, tmp_path, how):
    out = tmp_path / "runs"
    proc = _torchrun(_args(processed_root, out, "--max-steps", "400"))
    deadline = time.monotonic() + 180
    while not list(out.glob("*/checkpoint_00000004.pth")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.005)
    ranks = _descendants(proc.pid)
    os.kill(proc.pid, how)
    proc.communicate()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in ranks):
        if time.monotonic() > deadline:
            _kill_tree(proc)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError("the ranks trained on without their launcher")
        time.sleep(0.05)
    run = only_run(out)
    log = (run / "train.log").read_text()
    assert "SIGTERM received: finishing the current step" in log and "stopped at step" in log, log[-2000:]
    step = int(log.rsplit("stopped at step ", 1)[1].split(";")[0])
    assert ckpt.parse_checkpoint_name(ckpt.list_checkpoints(run)[-1])[0] == step < 400
