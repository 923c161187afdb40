"""The seed commands, planning (--dry-run), evaluation, monitoring and inspection end to end."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_support import losses, only_run, processed_root, train_args  # noqa: F401
from dinox.cli import build_parser, main
from dinox.run import checkpoint as ckpt
from dinox.run.signals import EXIT_WONT_FIT

REPO = Path(__file__).resolve().parent.parent

# Every example command of the seed user guide (scripts/phase5_big_run.py ...).
SEED_COMMANDS = [
    "--config vit-large --max-steps 384 --num-workers 8 --batch-size 64 --accumulation-steps 4 --grad-checkpoint",
    "--config vit-large --vit-patch 16 --img-size 512 --max-steps 384 --batch-size 16 --accumulation-steps 16 --grad-checkpoint",
    "--config vit-giant --batch-size 128 --accumulation-steps 2 --grad-checkpoint",
    "--config vit-large --resume auto",
    "--config vit-large --resume data/runs/20260103_120000/checkpoint_00000384.pth",
    "--config vit-large --max-steps 384",
    "--config vit-giant --ckpt-keep-last 10",
    "--config custom --vit-patch 16 --vit-dim 768 --vit-depth 12 --vit-heads 12",
    "--config vit-large --device cuda --num-workers 4 --pin-memory false",
    "--config vit-large --batch-size 64 --accumulation-steps 8 --grad-checkpoint",
    "--config vit-large --batch-size 128 --grad-checkpoint",
    "--config vit-large --amp",
    "--config vit-large --ckpt-every 50",
    "--config vit-large --monitor-every 1000",
    "--config vit-large --batch-size 32 --accumulation-steps 8",
    "--config vit-large --num-workers 16",
]


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_seed_commands_parse_and_plan(command, capsys):
    args = build_parser().parse_args(["train", *shlex.split(command)])
    assert args.func is not None
    if "--resume" in command:
        return  # resuming needs a checkpoint; covered in test_train.py
    code = main(["train", *shlex.split(command), "--dry-run", "--json", "--device-memory", "128"])
    summary = json.loads(capsys.readouterr().out)
    assert code in (0, 3)
    assert summary["fits"] == (code == 0)
    if "vit-large" in command and "--vit-patch" not in command:
        assert 300e6 < summary["backbone_params"] < 310e6
    if "vit-giant" in command:
        assert summary["backbone_params"] > 1e9


def test_dry_run_refuses_giant_without_checkpointing_on_24gb(capsys):
    code = main(["train", "--config", "vit-giant", "--batch-size", "128", "--dry-run", "--device-memory", "24"])
    out = capsys.readouterr().out
    assert code == 3
    assert "does NOT fit" in out and "--grad-checkpoint" in out


def test_dry_run_large_with_checkpointing_and_amp_fits_24gb(capsys):
    code = main(["train", "--config", "vit-large", "--batch-size", "64", "--accumulation-steps", "4",
                 "--grad-checkpoint", "--amp", "--dry-run", "--device-memory", "24", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["fits"]
    assert summary["effective_batch"] == 256
    assert summary["memory_estimate_gb"] < 24
    # the recipe's fits are part of the plan: prototypes for 256 images, the compressed warm-up
    assert summary["arch"]["out_dim"] == 8192
    assert any(n.startswith("prototypes: 8192 for a global batch of 256") for n in summary["notices"])
    # eight such ranks share each step: 2048 images, DINO's 65536
    main(["train", "--config", "vit-large", "--batch-size", "64", "--accumulation-steps", "4", "--grad-checkpoint",
          "--amp", "--parallel", "fsdp", "--world-size", "8", "--dry-run", "--device-memory", "24", "--json"])
    assert json.loads(capsys.readouterr().out)["arch"]["out_dim"] == 65536


def test_dry_run_says_what_the_checkpoints_take_on_disk(capsys):
    """A weeks-long ViT-Giant run keeps --ckpt-keep-last checkpoints of ~16 GB: the plan says
    how much disk that is before the run is launched on a machine that may lack it."""
    args = ["train", "--config", "vit-giant", "--batch-size", "16", "--grad-checkpoint", "--amp", "--dry-run",
            "--device-memory", "128", "--ckpt-keep-last", "3"]
    main([*args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    backbone, head = summary["backbone_params"], summary["head_params"]
    # fp32: student and EMA teacher (backbone + head), the Gram teacher's backbone, two AdamW moments
    one = 4 * (5 * (backbone + head) - head)
    assert summary["checkpoint_bytes"] == one and summary["checkpoints_disk_bytes"] == 4 * one
    main(args)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("checkpoints:"))
    assert f"about {one / 1e9:.2f} GB each" in line and f"about {4 * one / 1e9:.2f} GB of disk" in line, line
    assert "--ckpt-keep-last 3 keeps 3" in line


def test_dry_run_judges_the_checkpoints_against_the_free_disk_and_only_warns(capsys, tmp_path, monkeypatch):
    """The real run refuses a disk without room for one checkpoint and warns when the rotation
    will not fit; the plan says the same beforehand, without refusing (it may be for another
    machine)."""
    import dinox.commands.train as train_command
    import dinox.run.checkpoint as checkpoint

    args = ["train", "--config", "vit-giant", "--batch-size", "16", "--grad-checkpoint", "--amp", "--dry-run",
            "--device-memory", "128", "--ckpt-keep-last", "3", "--out", str(tmp_path / "runs")]
    for free, expected in ((10**15, None), (50e9, "has room for about 2 more checkpoints"),
                           (5e9, "not enough disk space for one checkpoint")):
        for module in (train_command, checkpoint):
            monkeypatch.setattr(module, "free_space", lambda path, free=free: int(free))
        assert main([*args, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["disk_free_bytes"] == int(free)
        assert (summary["disk_warning"] is None) if expected is None else (expected in summary["disk_warning"])
        assert main(args) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("disk here:"))
        assert line.startswith(f"disk here: {free / 1e9:.2f} GB free for {tmp_path / 'runs'}"), line
        assert ("warning" not in line) if expected is None else (expected in line), line


def test_a_smaller_batch_proposal_estimates_what_its_own_plan_does(capsys):
    """The proposal re-estimates at the smaller batch: iBOT's masked rows shrink with it (they
    were kept at the refused batch's count, ~0.2 GiB too high here)."""
    import re

    args = ["train", "--config", "vit-large", "--amp", "--grad-checkpoint", "--dry-run", "--device-memory", "24",
            "--json"]
    assert main([*args, "--batch-size", "128"]) == EXIT_WONT_FIT
    proposal = next(s for s in json.loads(capsys.readouterr().out)["suggestions"] if s.startswith("--batch-size"))
    batch, accumulation, gib = re.match(r"--batch-size (\d+) --accumulation-steps (\d+) .*estimated ([\d.]+) GiB",
                                        proposal).groups()
    assert main([*args, "--batch-size", batch, "--accumulation-steps", accumulation]) == 0
    assert json.loads(capsys.readouterr().out)["memory_estimate_gb"] == pytest.approx(float(gib), abs=0.051)


def test_invalid_shapes_are_rejected_with_the_fix(capsys):
    assert main(["train", "--config", "vit-large", "--img-size", "512", "--dry-run"]) == 1
    assert "--vit-patch 16" in capsys.readouterr().err
    assert main(["train", "--config", "custom", "--vit-dim", "1000", "--vit-heads", "16",
                 "--vit-patch", "14", "--vit-depth", "2", "--dry-run"]) == 1
    assert "not divisible" in capsys.readouterr().err
    assert main(["train", "--config", "vit-tiny", "--gram-weight", "0", "--dry-run"]) == 1
    assert "Gram anchoring" in capsys.readouterr().err


def test_seed_script_runs_from_any_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "phase5_big_run.py"), "--config", "vit-tiny", "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verdict: fits" in proc.stdout


@pytest.fixture(scope="module")
def trained_run(processed_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(train_args(processed_root, out, "--max-steps", "4", "--batch-size", "4", "--ckpt-every", "2",
                           "--monitor-every", "4", "--eval-every", "4", "--eval-n", "16")) == 0
    return only_run(out)


def test_run_directory_holds_every_artifact(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "train.log", "loss_curve.png", "monitor",
            "checkpoint_00000002.pth", "checkpoint_00000004.pth", "checkpoint_final_00000004.pth"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    step_dir = trained_run / "monitor" / "step_00000004"
    assert {"heatmap.png", "input.png", "stats.json", "health.json"} <= {p.name for p in step_dir.iterdir()}
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    for key in ("loss", "loss_dino", "loss_koleo", "loss_gram", "lr", "weight_decay", "teacher_momentum",
                "teacher_temp", "Entropy_Teacher", "Entropy_Student", "Prototypes_Used", "embedding_std",
                "grad_norm", "steps_per_s", "samples_per_s"):
        assert key in train_row, key
    if Path("/proc/meminfo").exists():   # this process's and the host's memory, on every device
        assert train_row["rss_gb"] > 0.05 and 0.0 < train_row["host_mem_fraction"] < 1.0
        health = json.loads((step_dir / "health.json").read_text())
        assert health["host_mem_bound"] in ("machine", "cgroup") and health["host_mem_limit_gb"] > 0
    out_dim = json.loads((trained_run / "config.json").read_text())["train"]["out_dim"]
    assert 1.0 <= train_row["Prototypes_Used"] <= out_dim * (1 + 1e-5)
    assert any("Eval/Retrieval_Ratio" in r for r in rows if r["step"] == 0)
    assert any("Eval/Effective_Rank" in r for r in rows if r["step"] == 4)
    # --eval-n 16: the not-learning check cannot judge so few slices, and the log says it is off
    assert (trained_run / "train.log").read_text().count("the not-learning check is off for this run: the "
                                                        "in-training retrieval compares 16 slices") == 1


def test_tensorboard_has_the_train_scalars(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"Train/Loss", "Train/Entropy_Teacher", "Train/Entropy_Student", "Train/Prototypes_Used",
            "Eval/Retrieval_Ratio"} <= tags


def test_eval_retrieval_command_writes_json_and_exit_code(trained_run, processed_root, tmp_path, capsys):
    final = trained_run / "checkpoint_final_00000004.pth"
    manifest = next((processed_root / "_splits").glob("*.json"))
    args = ["eval", "retrieval", "--checkpoint", str(final), "--split-manifest", str(manifest),
            "--index-csv", str(processed_root / "_index" / "index.csv"), "--n", "4096", "--device", "cpu",
            "--out", str(tmp_path)]
    code = main([*args, "--min-ratio", "0.0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "fewer than --n 4096" in out
    written = list(tmp_path.glob("view_retrieval_step4_N*.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert {"top1", "top5", "baseline", "ratio", "effective_rank", "n", "passed"} <= result.keys()
    assert result["baseline"] == pytest.approx(1 / result["n"])
    assert main([*args, "--min-ratio", "1e9"]) == 2


def test_eval_script_exit_code_from_a_shell(trained_run, processed_root, tmp_path):
    final = trained_run / "checkpoint_final_00000004.pth"
    manifest = next((processed_root / "_splits").glob("*.json"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "phase5_view_retrieval_eval.py"), "--checkpoint", str(final),
         "--split-manifest", str(manifest), "--index-csv", str(processed_root / "_index" / "index.csv"),
         "--n", "32", "--min-ratio", "1e9", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "FAIL" in proc.stdout


def test_the_light_commands_offer_the_networks_and_devices_the_loaders_take():
    """eval and monitor build their parsers without torch, from argtypes' own lists."""
    from dinox.commands.argtypes import DEVICE_CHOICES, NETWORK_CHOICES
    from dinox.config import DEVICE_CHOICES as config_devices
    from dinox.eval.load import NETWORKS

    assert tuple(NETWORK_CHOICES) == tuple(NETWORKS) and tuple(DEVICE_CHOICES) == tuple(config_devices)


def test_heatmaps_say_which_checkpoint_step_and_slices_they_show(trained_run, tmp_path, monkeypatch):
    """heatmap.png files of many steps and runs get compared side by side: each names its
    checkpoint (or run), step and the series and slice of every row."""
    import matplotlib.axes
    import matplotlib.figure

    said = []
    for cls, name in ((matplotlib.figure.Figure, "suptitle"), (matplotlib.axes.Axes, "set_title")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda obj, text, *a, _real=real, **kw:
                            said.append(text) or _real(obj, text, *a, **kw))
    final = trained_run / "checkpoint_final_00000004.pth"
    assert main(["monitor", "--checkpoint", str(final), "--out", str(tmp_path), "--device", "cpu",
                 "--split", "train"]) == 0
    assert f"{trained_run.name}/{final.name}, step 4 (cli, train)" in said
    rows = [t for t in said if t.startswith("input: series ")]
    assert rows and all(", slice " in t and len(t) < 60 for t in rows), rows


def test_monitor_command_writes_heatmaps(trained_run, processed_root, tmp_path, capsys):
    final = trained_run / "checkpoint_final_00000004.pth"
    # training's own outputs of that step (its throughput in health.json) are never touched
    training = tmp_path / "monitor" / "step_00000004"
    shutil.copytree(trained_run / "monitor" / "step_00000004", training)
    kept = {p.name: p.read_bytes() for p in training.iterdir()}
    assert main(["monitor", "--checkpoint", str(final), "--data-root", str(processed_root),
                 "--split-manifest", str(next((processed_root / "_splits").glob("*.json"))),
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert {p.name: p.read_bytes() for p in training.iterdir()} == kept
    step_dir = tmp_path / "monitor" / "step_00000004_cli"
    assert str(step_dir / "heatmap.png") in capsys.readouterr().out
    stats = json.loads((step_dir / "stats.json").read_text())
    assert "std" in stats
    assert (step_dir / "heatmap.png").stat().st_size > 1000
    assert json.loads((step_dir / "inputs.json").read_text())["network"] == "teacher"
    # another split or network goes beside training's own outputs, never over them
    before = (step_dir / "stats.json").read_bytes()
    assert main(["monitor", "--checkpoint", str(final), "--split", "train", "--network", "student",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert (step_dir / "stats.json").read_bytes() == before
    other = tmp_path / "monitor" / "step_00000004_cli_train_student"
    assert json.loads((other / "inputs.json").read_text())["split"] == "train"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "phase5_monitor.py"), "--checkpoint", str(final),
                           "--out", str(tmp_path / "script"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    for name in ("heatmap.png", "input.png", "stats.json"):
        assert str(tmp_path / "script" / "monitor" / "step_00000004_cli" / name) in printed


def test_inspect_reports_intact_and_damaged(trained_run, tmp_path, capsys):
    final = trained_run / "checkpoint_final_00000004.pth"
    assert main(["inspect", str(final)]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "intact" in out.lower()
    damaged = tmp_path / "checkpoint_00000009.pth"
    damaged.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    assert main(["inspect", str(damaged)]) != 0


def test_cross_hardware_resume_applies_new_preset_and_logs(trained_run, processed_root, tmp_path, capsys):
    state = ckpt.load_checkpoint(trained_run / "checkpoint_final_00000004.pth")
    state["hardware"].update(kind="cuda", name="NVIDIA GeForce RTX 4090", preset="rtx4090", torch_device="cuda:0")
    moved = tmp_path / "runs" / "20260103_120000"
    moved.mkdir(parents=True)
    ckpt.save_checkpoint(moved / "checkpoint_00000004.pth", state)
    code = main(train_args(processed_root, tmp_path / "runs", "--max-steps", "5", "--resume", "auto"))
    out = capsys.readouterr().out
    assert code == 0
    assert "hardware platform changed" in out and "rtx4090" in out
    assert "hardware preset: cpu" in out
    assert max(losses(moved)) == 5


def test_full_disk_stops_cleanly_and_keeps_checkpoints(processed_root, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4", "--ckpt-every", "1")) == 0
    run = only_run(out)
    before = {p.name: p.read_bytes() for p in run.glob("checkpoint_*.pth")}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code = main(train_args(processed_root, out, "--max-steps", "4", "--batch-size", "4", "--ckpt-every", "1",
                           "--resume", "auto"))
    err = capsys.readouterr().err
    assert code != 0
    assert "disk space" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.glob("checkpoint_*.pth")} == before
    for path in run.glob("checkpoint_*.pth"):
        assert ckpt.verify_checkpoint(path)[0]


def test_amp_on_cpu_trains_in_bfloat16(processed_root, tmp_path):
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4", "--amp")) == 0
    log = (only_run(out) / "train.log").read_text()
    assert "amp torch.bfloat16" in log
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(only_run(out)).values())


def test_torchrun_two_processes_on_cpu(processed_root, tmp_path):
    """DDP over gloo: both ranks train, rank 0 alone writes the run folder, and both exit
    (a rank used to hang at exit when the DDP reducer outlived the process group)."""
    import os
    import signal as signals

    out = tmp_path / "runs"
    args = train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4", "--accumulation-steps", "2",
                      "--num-workers", "0")[1:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "scripts" / "phase5_big_run.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signals.SIGKILL)
        proc.communicate()
        raise AssertionError("torchrun did not finish within 120 s (a rank hung)")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "x 2 device(s) = effective 16" in stdout
    run = only_run(out)
    assert ckpt.load_checkpoint(run / "checkpoint_final_00000002.pth")["data"]["world_size"] == 2


def test_dry_run_plans_data_parallel_ranks_and_prints_once_under_torchrun(capsys, monkeypatch):
    """`--dry-run --world-size 4` under DDP: the plan says 4 ranks and the global batch its
    prototypes were fitted to (the JSON said world_size 1). Under torchrun (WORLD_SIZE set)
    rank 0 alone prints it, so `--json` stays one JSON object; every rank exits alike."""
    flags = ["train", "--config", "vit-large", "--batch-size", "64", "--accumulation-steps", "4", "--grad-checkpoint",
             "--amp", "--max-steps", "384", "--dry-run", "--device-memory", "24"]
    assert main([*flags, "--world-size", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["world_size"] == 4 and summary["global_batch"] == 1024 and summary["arch"]["out_dim"] == 32768
    assert main([*flags, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "DDP over 4 ranks" in out and "global batch: 256 x 4 ranks = 1024" in out
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert main([*flags, "--json"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert main([*flags, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["world_size"] == 2 and summary["global_batch"] == 512


def test_dry_run_plans_with_the_target_s_hardware_preset(capsys):
    """The guide's APU command (`--config vit-giant --grad-checkpoint --amp --resume auto`)
    takes its batch from the amd395 preset (128 x 2); planned from another machine it got
    this machine's (CPU: 32 x 1, 1024 prototypes). --hardware-preset plans with the target's."""
    code = main(["train", "--config", "vit-giant", "--grad-checkpoint", "--amp", "--dry-run", "--json",
                 "--hardware-preset", "amd395", "--device-memory", "128"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["hardware_preset"] == "amd395"
    assert (summary["batch_size"], summary["accumulation_steps"], summary["arch"]["out_dim"]) == (128, 2, 8192)
    assert summary["backbone_params"] > 1e9 and summary["memory_estimate_gb"] < 0.9 * 128
    # the seeds' cross-hardware `--config vit-large --max-steps 384` on a 4090: 64 x 4 without checkpointing
    assert main(["train", "--config", "vit-large", "--max-steps", "384", "--dry-run", "--json",
                 "--hardware-preset", "rtx4090", "--device-memory", "24"]) == 3
    refused = json.loads(capsys.readouterr().out)
    assert refused["effective_batch"] == 256 and refused["suggestions"][0].startswith("enable --grad-checkpoint")
    for flags in (["--dry-run"], []):   # it plans only, for a card whose memory it is told
        assert main(["train", "--config", "vit-large", "--hardware-preset", "rtx4090", *flags]) == 1
        err = capsys.readouterr().err
        assert "--hardware-preset rtx4090 only plans" in err and "Traceback" not in err


def test_a_refused_run_names_its_estimate_in_the_estimates_unit():
    """The refusal said 'needs about 0.9 GB but the device has 0.5 GiB': the estimate is in
    GiB, as the dry run prints it."""
    from types import SimpleNamespace

    from dinox.commands.train import wont_fit_message

    plan = {"estimate": SimpleNamespace(total=int(0.9 * 1024**3)), "device_memory_bytes": 1024**3 // 2,
            "suggestions": ["enable --amp"]}
    assert wont_fit_message(plan).startswith("this run needs about 0.9 GiB but the device has 0.5 GiB; ways out")


def test_a_negative_log_interval_is_refused_by_its_type(capsys):
    """`--log-interval -1` was taken (as 0: a line every step) where every other flag out of
    range is refused in one line naming it."""
    assert main(["train", "--log-interval", "-1", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "argument --log-interval: expected a finite number >= 0, got -1" in err
    assert err.count("\n") == 1


def test_a_likely_mistake_is_warned_on_stderr_and_in_the_plan(capsys):
    code = main(["train", "--lr", "0.5", "--dry-run", "--json", "--device-memory", "8"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 0 and summary["warnings"][0].startswith("--lr 0.5 is 500x")
    assert "warning: --lr 0.5 is 500x" in captured.err


def test_the_plan_cuts_a_presets_workers_to_the_cpus_each_rank_will_have(monkeypatch, capsys):
    """The run wires this machine's CPUs into the preset: 8 CPUs shared by the ranks a plan
    puts here (all of them on a CPU), one left to each process."""
    import dinox.run.device as device
    monkeypatch.setattr(device.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setitem(device.HARDWARE_PRESETS["cpu"], "num_workers", 16)
    for extra, workers in (([], 7), (["--world-size", "2"], 3)):
        main(["train", "--dry-run", "--json", "--device-memory", "8", *extra])
        summary = json.loads(capsys.readouterr().out)
        assert summary["num_workers"] == workers
        assert any(f"num_workers={workers} (preset 16, cut to fit" in line for line in summary["preset_lines"])
