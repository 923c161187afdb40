from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dinox.errors import UserError
from dinox.run import device as hardware
from dinox.observe.health import MemoryWatch
from dinox.run.device import (
    GIB,
    HARDWARE_PRESETS,
    PRESET_KEYS,
    DeviceInfo,
    apply_hardware_preset,
    detect_device,
    hardware_change_notice,
    match_preset,
)

RTX4090 = ("NVIDIA GeForce RTX 4090", int(23.6 * GIB), "")
STRIX_HALO = ("AMD Radeon 8060S", 96 * GIB, "gfx1151")


def fake_gpus(monkeypatch, name, total, arch="", hip=None, count=1, integrated=0, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    props = SimpleNamespace(total_memory=total, is_integrated=integrated, gcnArchName=arch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def no_gpu(monkeypatch, hip=None, mps=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def gpu_info(kind, name, total, unified=False, count=1):
    return DeviceInfo(kind=kind, torch_device="cuda:0", name=name, total_memory_bytes=total,
                      unified_memory=unified, bf16_supported=True, fused_adamw=True, count=count)


def test_auto_detects_cuda_and_4090_preset(monkeypatch):
    fake_gpus(monkeypatch, *RTX4090)
    info, notices = detect_device()
    assert (info.kind, info.torch_device, info.name) == ("cuda", "cuda:0", RTX4090[0])
    assert info.total_memory_bytes == RTX4090[1]
    assert not info.unified_memory and info.bf16_supported and info.fused_adamw
    assert notices == []
    assert match_preset(info) == "rtx4090"


def test_auto_detects_rocm_strix_halo_as_unified(monkeypatch):
    fake_gpus(monkeypatch, *STRIX_HALO, hip="6.4.0")
    info, notices = detect_device("auto")
    assert info.kind == "rocm" and info.torch_device == "cuda:0"
    assert info.unified_memory and info.arch == "gfx1151"
    assert match_preset(info) == "amd395"
    assert notices == []


def test_rocm_apu_recognised_by_arch_when_name_is_generic(monkeypatch):
    fake_gpus(monkeypatch, "AMD Radeon Graphics", 64 * GIB, arch="gfx1151:xnack-", hip="6.4.0")
    info, _ = detect_device()
    assert info.unified_memory and match_preset(info) == "amd395"


def test_discrete_rocm_gpu_gets_generic_preset(monkeypatch):
    fake_gpus(monkeypatch, "AMD Instinct MI300X", 192 * GIB, arch="gfx942", hip="6.4.0")
    info, _ = detect_device()
    assert not info.unified_memory and match_preset(info) == "rocm-generic"


def test_local_rank_selects_gpu_and_must_exist(monkeypatch):
    fake_gpus(monkeypatch, "NVIDIA H100 80GB HBM3", 80 * GIB, count=2)
    info, _ = detect_device("cuda", local_rank=1)
    assert info.torch_device == "cuda:1" and info.count == 2
    with pytest.raises(UserError, match="local rank 2"):
        detect_device("cuda", local_rank=2)


def test_requested_rocm_without_hip_falls_back_visibly(monkeypatch):
    fake_gpus(monkeypatch, *RTX4090, hip=None)
    info, notices = detect_device("rocm")
    assert info.kind == "cuda"
    assert notices == [
        "requested --device rocm but no ROCm runtime is available (torch.version.hip is None); falling back to cuda"
    ]


def test_requested_rocm_on_cpu_only_machine_falls_back_to_cpu(monkeypatch):
    no_gpu(monkeypatch)
    info, notices = detect_device("rocm")
    assert info.kind == "cpu"
    assert len(notices) == 1 and "falling back to cpu" in notices[0]


def test_requested_cuda_on_rocm_build_uses_rocm_with_notice(monkeypatch):
    fake_gpus(monkeypatch, *STRIX_HALO, hip="6.4.0")
    info, notices = detect_device("CUDA")
    assert info.kind == "rocm"
    assert len(notices) == 1 and "ROCm build" in notices[0]


@pytest.mark.parametrize("requested", ["cuda", "mps"])
def test_requested_missing_runtime_falls_back_to_cpu(monkeypatch, requested):
    no_gpu(monkeypatch)
    info, notices = detect_device(requested)
    assert info.kind == "cpu"
    assert len(notices) == 1 and notices[0].startswith(f"requested --device {requested} but")


def test_cpu_info_reads_the_machine(monkeypatch):
    no_gpu(monkeypatch)
    info, notices = detect_device()
    assert (info.kind, info.torch_device, info.count) == ("cpu", "cpu", 1)
    assert info.name and info.total_memory_bytes and info.total_memory_bytes > 64 * 1024**2
    assert info.bf16_supported == hardware.cpu_native_bf16() and not info.unified_memory
    assert notices == []
    forced, notices = detect_device("cpu")
    assert forced.kind == "cpu" and notices == []


def test_cpu_forced_even_when_gpu_present(monkeypatch):
    fake_gpus(monkeypatch, *RTX4090)
    info, notices = detect_device("cpu")
    assert info.kind == "cpu" and notices == []


def test_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match="unknown --device 'tpu'"):
        detect_device("tpu")


@pytest.mark.parametrize(
    "name,total,expected",
    [
        ("NVIDIA GeForce RTX 4090", 24 * GIB, "rtx4090"),
        ("NVIDIA H100 80GB HBM3", 80 * GIB, "h100"),
        ("NVIDIA H200", 141 * GIB, "h100"),
        ("NVIDIA A100-SXM4-40GB", 40 * GIB, "cuda-generic"),
        ("NVIDIA H100 80GB HBM3", None, "h100"),
        ("NVIDIA GeForce RTX 3060", 12 * GIB, "cuda-generic"),
    ],
)
def test_match_preset_for_cuda_cards(name, total, expected):
    assert match_preset(gpu_info("cuda", name, total)) == expected


def test_presets_are_complete_and_keep_effective_batch():
    for name, preset in HARDWARE_PRESETS.items():
        assert set(PRESET_KEYS) <= set(preset) and preset["description"]
        assert preset["num_workers"] >= 0 and preset["batch_size"] >= 1
        if name != "cpu":
            assert preset["batch_size"] * preset["accumulation_steps"] == 256, name
    assert HARDWARE_PRESETS["rtx4090"] | {"description": ""} == {
        "num_workers": 8, "pin_memory": True, "batch_size": 64, "accumulation_steps": 4, "description": ""}
    assert HARDWARE_PRESETS["amd395"]["pin_memory"] is False
    assert HARDWARE_PRESETS["amd395"]["num_workers"] == 16
    assert HARDWARE_PRESETS["amd395"]["batch_size"] == 128


def test_cpu_preset_workers_leave_a_core(monkeypatch):
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    assert hardware._cpu_workers() == 1
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 64)
    assert hardware._cpu_workers() == 4
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: None)
    assert hardware._cpu_workers() == 2


def test_apply_preset_without_overrides():
    values, lines = apply_hardware_preset(dict.fromkeys(PRESET_KEYS), "rtx4090")
    assert values == {"num_workers": 8, "pin_memory": True, "batch_size": 64, "accumulation_steps": 4}
    assert lines[0].startswith("hardware preset: rtx4090")
    assert not any("custom" in line for line in lines)


def test_apply_preset_user_values_win_and_are_logged_as_custom():
    values, lines = apply_hardware_preset({"batch_size": 16, "pin_memory": False, "num_workers": None}, "rtx4090")
    assert values == {"num_workers": 8, "pin_memory": False, "batch_size": 16, "accumulation_steps": 4}
    custom = [line for line in lines if line.startswith("custom optimizations active:")]
    assert custom == ["custom optimizations active: pin_memory=False (preset True), batch_size=16 (preset 64)"]
    assert "from preset: num_workers=8, accumulation_steps=4" in lines


def test_apply_preset_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown hardware preset"):
        apply_hardware_preset({}, "tpu-v5")
    with pytest.raises(ValueError, match="batchsize"):
        apply_hardware_preset({"batchsize": 3}, "cpu")


def test_to_dict_is_plain_and_carries_preset():
    info = gpu_info("rocm", STRIX_HALO[0], STRIX_HALO[1], unified=True)
    saved = info.to_dict()
    assert saved["preset"] == "amd395" and saved["kind"] == "rocm"
    assert json.loads(json.dumps(saved)) == saved
    assert "ROCm 'AMD Radeon 8060S'" in info.summary()


def test_hardware_change_notice_cuda_to_rocm():
    saved = gpu_info("cuda", RTX4090[0], RTX4090[1]).to_dict()
    current = gpu_info("rocm", STRIX_HALO[0], STRIX_HALO[1], unified=True)
    assert hardware_change_notice(saved, current) == (
        "hardware platform changed: CUDA 'NVIDIA GeForce RTX 4090' (preset rtx4090) -> "
        "ROCm 'AMD Radeon 8060S' (preset amd395); applying the amd395 preset"
    )


def test_hardware_change_notice_silent_on_same_or_unknown_hardware():
    info = gpu_info("cuda", RTX4090[0], RTX4090[1])
    assert hardware_change_notice(info.to_dict(), info) is None
    assert hardware_change_notice({}, info) is None
    assert hardware_change_notice(None, info) is None


def fake_memory(monkeypatch, reserved, peak):
    state = {"reserved": reserved, "peak": peak}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    return state


def test_memory_watch_warns_once_per_crossing(monkeypatch):
    info = gpu_info("cuda", RTX4090[0], 20 * GIB)
    state = fake_memory(monkeypatch, reserved=10 * GIB, peak=9 * GIB)
    watch = MemoryWatch(info, warn_fraction=0.9)
    assert watch.check() is None
    state["reserved"] = 19 * GIB
    message = watch.check()
    assert message is not None and "95%" in message and "20.0 GiB" in message
    assert "--batch-size" in message and "--accumulation-steps" in message
    assert "--grad-checkpoint" in message and "--amp" in message
    assert watch.check() is None
    state["reserved"] = 12 * GIB
    assert watch.check() is None
    state["peak"] = 18.5 * GIB
    assert watch.check() is not None
    assert watch.snapshot()["mem_fraction"] == pytest.approx(18.5 / 20)


def test_memory_watch_suggests_only_what_is_off(monkeypatch):
    fake_memory(monkeypatch, reserved=90 * GIB, peak=80 * GIB)
    watch = MemoryWatch(gpu_info("rocm", *STRIX_HALO[:2], unified=True), grad_checkpoint=True, amp=True)
    message = watch.check()
    assert "--batch-size" in message
    assert "--grad-checkpoint" not in message and "--amp" not in message


def test_memory_watch_is_silent_on_cpu():
    info = DeviceInfo(kind="cpu", torch_device="cpu", name="cpu", total_memory_bytes=8 * GIB,
                      unified_memory=False, bf16_supported=True, fused_adamw=False, count=1)
    watch = MemoryWatch(info)
    assert watch.check() is None and watch.snapshot() is None


def test_cpu_bf16_follows_the_kernels_and_emulated_amp_is_flagged(monkeypatch):
    """A CPU without AVX512-BF16 or AMX reports no bf16, and --amp there gets the warning
    (bf16 is still used: the user asked for it)."""
    from dinox.train.optim import autocast_dtype, autocast_notice

    no_gpu(monkeypatch)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    info, _ = detect_device("cpu")
    assert not info.bf16_supported and "no bf16" in info.summary()
    cpu = torch.device("cpu")
    assert autocast_dtype(True, cpu, info.bf16_supported) == torch.bfloat16
    assert "drop --amp" in autocast_notice(True, cpu, info.bf16_supported)
    assert autocast_notice(False, cpu, False) is None and autocast_notice(True, cpu, True) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert detect_device("cpu")[0].bf16_supported
