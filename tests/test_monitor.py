from __future__ import annotations

import json
import math
import stat

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn as nn

from dinox.data.augment import AugmentConfig, fixed_window_input
from dinox.eval.rank import embedding_stats
from dinox.observe import health as monitor
from dinox.observe.health import device_memory_metrics, gpu_telemetry, health_report
from dinox.observe.heatmaps import plot_loss_curve, read_metrics, write_monitor_outputs


class TinyCore(nn.Module):
    """Stand-in with the VisionTransformer forward interface (no last_attention)."""

    def __init__(self, patch_size=4, dim=8, num_registers=2, heads=2):
        super().__init__()
        self.patch_size, self.num_registers, self.heads, self.embed_dim = patch_size, num_registers, heads, dim
        self.embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.reg = nn.Parameter(torch.randn(1, num_registers, dim))
        self.qk = nn.Linear(dim, 2 * dim)
        self.drop = nn.Dropout(0.5)
        self.seen = []

    def _tokens(self, x):
        self.seen.append(x.detach().clone())
        p = self.embed(x).flatten(2).transpose(1, 2)
        b = x.shape[0]
        return torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), p], dim=1)

    def forward(self, x):
        t = self.drop(self._tokens(x))
        r = self.num_registers
        return {"cls": t[:, 0], "registers": t[:, 1:1 + r], "patches": t[:, 1 + r:]}


class TinyBackbone(TinyCore):
    """Adds last_attention: one attention layer over [cls, registers, patches]."""

    def last_attention(self, x):
        t = self._tokens(x)
        q, k = self.qk(t).chunk(2, dim=-1)
        b, n, _ = t.shape
        q = q.reshape(b, n, self.heads, -1).transpose(1, 2)
        k = k.reshape(b, n, self.heads, -1).transpose(1, 2)
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)


def hu_stack(h=30, w=34, seed=0):
    g = torch.Generator().manual_seed(seed)
    hu = torch.full((3, h, w), -1000.0)
    hu[:, 5:25, 4:30] = 40.0  # body
    hu[:, 8:22, 7:15] = -850.0  # lungs
    hu[:, 8:22, 19:27] = -850.0
    return (hu + 20 * torch.randn(3, h, w, generator=g)).to(torch.int16)


def test_embedding_stats_separate_healthy_from_collapsed():
    g = torch.Generator().manual_seed(0)
    healthy = embedding_stats(torch.randn(512, 16, generator=g))
    assert healthy["std"] == pytest.approx(1 / math.sqrt(16), rel=0.15)
    assert healthy["effective_rank"] > 12 and healthy["dim"] == 16 and healthy["n"] == 512
    collapsed = embedding_stats(torch.ones(512, 16) * 3 + 1e-5 * torch.randn(512, 16, generator=g))
    assert collapsed["std"] < 1e-4 and collapsed["effective_rank"] < 1.1
    assert collapsed["mean_norm"] == pytest.approx(12.0, rel=1e-3)
    scaled = embedding_stats(torch.randn(512, 16, generator=g) * 100)
    assert scaled["std"] == pytest.approx(healthy["std"], rel=0.15)
    assert scaled["raw_std"] == pytest.approx(100, rel=0.1)
    assert embedding_stats(torch.randn(4, 5, 16)).get("n") == 20
    assert embedding_stats(torch.randn(1, 16))["std"] is None
    assert embedding_stats(torch.zeros(8, 4))["effective_rank"] == 0.0
    assert math.isnan(embedding_stats(torch.full((8, 4), float("nan")))["effective_rank"])


def test_fixed_window_input_is_the_training_preprocessing():
    hu = torch.tensor([-1350.0, -600.0, 150.0, 3000.0]).view(1, 1, 1, 4)
    assert fixed_window_input(hu, AugmentConfig(), (-600, 1500)).flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 1.0], abs=1e-6)
    standardized = fixed_window_input(hu, AugmentConfig(standardize=True), (-600, 1500))
    assert float(standardized.mean()) == pytest.approx(0.0, abs=1e-5)


def test_write_monitor_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyBackbone()
    model.train()
    model.drop.eval()  # a submodule deliberately frozen in eval must stay so
    stats = write_monitor_outputs(model, hu_stack(), tmp_path / "monitor",
                                  embeddings_batch=torch.stack([hu_stack(seed=s) for s in range(6)]))
    out = tmp_path / "monitor"
    assert model.training and not model.drop.training
    assert all(p.grad is None for p in model.parameters())
    x = model.seen[0]
    assert tuple(x.shape) == (1, 3, 32, 36)  # 30x34 -> nearest multiple of patch 4
    assert x.min() >= -1 and x.max() <= 1

    heat = mpimg.imread(out / "heatmap.png")
    inp = mpimg.imread(out / "input.png")
    assert heat.shape[1] > 2.5 * heat.shape[0]  # 1x3 panels
    assert inp.ndim == 3 and inp.shape[0] > 100
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert stats["input"]["grid"] == [8, 9] and stats["patch_tokens"]["n"] == 72
    assert stats["cls_tokens"]["n"] == 6 and stats["cls_std"] == stats["cls_tokens"]["std"]
    with torch.no_grad():
        model.eval()
        patches = model(x)["patches"]
    norms = patches.norm(dim=-1)
    assert stats["token_norm"]["max"] == pytest.approx(float(norms.max()), rel=1e-5)
    assert stats["std"] == pytest.approx(embedding_stats(patches)["std"], rel=1e-5)
    assert 0 < stats["cls_attention"]["entropy"] <= stats["cls_attention"]["uniform_entropy"] + 1e-6


def test_write_monitor_outputs_custom_preprocess_img_size_and_no_attention(tmp_path):
    model = TinyCore()
    calls = []

    def preprocess(hu):
        calls.append(hu.shape)
        return torch.zeros_like(hu)

    stats = write_monitor_outputs(model, torch.stack([hu_stack(), hu_stack(seed=1)]), tmp_path,
                                  img_size=24, preprocess=preprocess)
    assert calls == [(2, 3, 24, 24)]
    assert model.seen[0].abs().max() == 0
    assert "cls_attention" not in stats and "cls_tokens" not in stats
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    with pytest.raises(Exception, match="HU stacks"):
        write_monitor_outputs(model, torch.zeros(2, 24, 24), tmp_path)


def test_failing_last_attention_only_drops_that_panel_under_autocast(tmp_path):
    class Broken(TinyBackbone):
        def last_attention(self, x):
            raise RuntimeError("fused kernel returns no weights")

    stats = write_monitor_outputs(Broken(), hu_stack(), tmp_path, autocast_dtype=torch.bfloat16)
    assert "cls_attention" not in stats and stats["std"] > 0
    assert (tmp_path / "heatmap.png").exists()


def test_read_metrics_and_plot_loss_curve(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "time": 0, "wall": s, "loss": 9.0 - s / 10, "loss_dino": 8.0 - s / 10,
                         "Loss_Gram": 0.1, "loss_koleo": -0.05, "lr": 1e-4 * s, "note": "x"}) for s in range(1, 30)]
    lines.insert(3, json.dumps({"step": 3, "loss": None, "loss_dino": 7.0}))
    lines.append('{"step": 30, "loss": 1.')  # a crashed write
    path.write_text("\n".join(lines) + "\n")
    series = read_metrics(path)
    assert "note" not in series and "time" not in series
    assert series["loss"][2] == (3, pytest.approx(8.7))  # null skipped, earlier value kept
    assert series["loss_dino"][2] == (3, 7.0)  # duplicate step: later line wins
    assert len(series["loss"]) == 29
    out = tmp_path / "plots" / "loss.png"
    plot_loss_curve(path, out, out_dim=8192)
    assert mpimg.imread(out).shape[0] > 100
    empty = tmp_path / "empty" / "metrics.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    plot_loss_curve(empty, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").exists()
    with pytest.raises(Exception, match="not found"):
        plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_a_loss_curve_written_beside_another_process_s_leaves_its_file_alone(tmp_path):
    """Training's monitor step and a `dinox monitor` of the same run both write the run's
    loss_curve.png, and both wrote it through one temporary name, loss_curve.tmp.png: the
    second truncated the first's file mid-write and renamed it away, so one of them
    failed on a missing file or a half-drawn figure went in place. The temporary is now
    this process's own (run.files.atomic_write)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 9.0 - s / 10}) + "\n" for s in range(1, 10)))
    other = tmp_path / "loss_curve.tmp.png"   # the other writer's file, mid-write
    other.write_bytes(b"another process's half-written figure")
    plot_loss_curve(path, tmp_path / "loss_curve.png")
    assert other.read_bytes() == b"another process's half-written figure"
    assert mpimg.imread(tmp_path / "loss_curve.png").shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "loss_curve.tmp.png", "metrics.jsonl"]


def test_the_loss_curve_of_a_run_of_weeks_reads_and_draws_a_bounded_number_of_points(tmp_path, monkeypatch):
    """The monitor redraws the loss curve from the whole metrics.jsonl at every monitor step: a
    15-day run at 5 s a step logs 260k rows, which read whole took 1.1 GB and 14 s each time
    (and drew 260k points per line into a 10-inch figure). Only the plotted series are kept,
    as the means of consecutive steps past LOSS_CURVE_POINTS."""
    import matplotlib.axes

    from dinox.observe.heatmaps import LOSS_CURVE_POINTS

    path = tmp_path / "metrics.jsonl"
    rows = 6 * LOSS_CURVE_POINTS
    with open(path, "w") as f:
        for s in range(1, rows + 1):
            f.write(json.dumps({"step": s, "loss": 5.0 + (s % 2), "loss_koleo": -0.01, "lr": 1e-4,
                                "grad_norm": 1.0, "embedding_std": 0.1}) + "\n")
    series = read_metrics(path, keep=lambda k: k.startswith("loss"), max_points=100)
    assert sorted(series) == ["loss", "loss_koleo"]
    points = series["loss"]
    assert 50 <= len(points) <= 100 and points[0][0] < rows / 50 and points[-1][0] > rows * 0.98
    assert all(v == pytest.approx(5.5, abs=0.01) for _, v in points[:-1])   # means of pairs of 5 and 6
    assert [s for s, _ in points] == sorted(s for s, _ in points)
    assert len(read_metrics(path)["loss"]) == rows   # unbounded where asked: every step
    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, *a, **k: drawn.append(len(x)) or real_plot(self, x, *a, **k))
    plot_loss_curve(path, tmp_path / "loss.png", out_dim=8192)
    assert len(drawn) == 3 and max(drawn) <= LOSS_CURVE_POINTS   # loss, loss_koleo, lr


def test_health_report_on_cpu():
    r = health_report("cpu", steps_per_s=1.5, samples_per_s=96.0)
    assert r["steps_per_s"] == 1.5 and r["samples_per_s"] == 96.0 and r["device"] == "cpu"
    assert r["rss_gb"] > 0.01
    assert r["mem_allocated_gb"] is None and r["mem_total_gb"] is None
    assert r["source"] == "unavailable" and r["gpu_temperature_c"] is None
    json.dumps(r, allow_nan=False)
    assert device_memory_metrics("cpu") == {}
    assert device_memory_metrics(torch.device("cpu")) == {}


def fake_tool(bin_dir, name, stdout, rc=0):
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    (bin_dir / f"{name}.out").write_text(stdout + "\n")
    # Shell builtins only: the tests run with PATH limited to bin_dir.
    script.write_text(f'#!/bin/sh\necho "$@" > {bin_dir}/{name}.args\n'
                      f'while IFS= read -r line; do printf "%s\\n" "$line"; done < {bin_dir}/{name}.out\n'
                      f"exit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_gpu_telemetry_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    fake_tool(tmp_path / "bin", "nvidia-smi", "61, 97, 287.45")
    t = gpu_telemetry(1)
    assert t == {"gpu_temperature_c": 61.0, "gpu_utilization_pct": 97.0, "gpu_power_w": 287.45,
                 "source": "nvidia-smi"}
    assert "--id=5" in (tmp_path / "bin" / "nvidia-smi.args").read_text()


def test_gpu_telemetry_rocm_smi_and_failures(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    fake_tool(tmp_path / "bin", "nvidia-smi", "NVIDIA-SMI has failed", rc=9)
    rocm = {"card0": {"Temperature (Sensor edge) (C)": "52.0", "Temperature (Sensor junction) (C)": "60.0",
                      "GPU use (%)": "88", "Current Socket Graphics Package Power (W)": "71.3"}}
    fake_tool(tmp_path / "bin", "rocm-smi", json.dumps(rocm))
    assert gpu_telemetry(0) == {"gpu_temperature_c": 52.0, "gpu_utilization_pct": 88.0,
                                "gpu_power_w": 71.3, "source": "rocm-smi"}
    fake_tool(tmp_path / "bin", "rocm-smi", "not json at all")
    assert gpu_telemetry(0)["source"] == "unavailable"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_telemetry(0) == {"gpu_temperature_c": None, "gpu_utilization_pct": None,
                                "gpu_power_w": None, "source": "unavailable"}


def test_health_report_never_raises(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("driver gone")

    monkeypatch.setattr(monitor, "_is_gpu", lambda device: True)
    monkeypatch.setattr(monitor, "device_memory_metrics", boom)
    r = health_report("cuda:0")
    assert r["source"] == "unavailable" and r["mem_allocated_gb"] is None


def test_the_monitor_log_line_gives_health_figures_not_the_clock():
    from dinox.observe.health import health_report
    from dinox.observe.monitor_hook import health_text

    text = health_text(health_report("cpu", steps_per_s=2.5, samples_per_s=20.0))
    assert "steps_per_s=2.5" in text and "samples_per_s=20" in text
    assert "time=" not in text and "e+09" not in text
