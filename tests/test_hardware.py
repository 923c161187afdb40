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
    watch = MemoryWatch(info, read_host=dict)
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


def fake_host(tmp_path, *, cgroup_lines, files, total_kb=16 * 1024 * 1024, available_kb=12 * 1024 * 1024):
    """A /proc and a /sys/fs/cgroup tree holding what `host_memory` reads."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    # 3 GiB resident, of which 1 GiB mapped data files: 2 GiB anonymous + shared
    (proc / "self" / "status").write_text("Name:\tpython\nVmRSS:\t 3145728 kB\nRssAnon:\t 1572864 kB\n"
                                           "RssFile:\t 1048576 kB\nRssShmem:\t 524288 kB\n")
    (proc / "meminfo").write_text(f"MemTotal:       {total_kb} kB\nMemFree:  1 kB\nMemAvailable:   {available_kb} kB\n"
                                  "HugePages_Total:       0\n")
    (proc / "self" / "cgroup").write_text("".join(line + "\n" for line in cgroup_lines))
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    return proc, root


def test_host_memory_reads_the_machine_and_the_fullest_cgroup(tmp_path):
    from dinox.observe.health import host_memory

    # cgroup v2, a SLURM-like job: an 8 GiB limit two levels up, 7 GiB used of which 2 GiB file
    # pages the kernel can drop (the mapped volumes) and 1 GiB shared memory it cannot; the step
    # below it has a 16 GiB limit of its own, less full, which must not win
    proc, root = fake_host(tmp_path / "v2", cgroup_lines=["0::/slurm/job_7/step_0"], files={
        "slurm/job_7/step_0/memory.max": f"{16 * GIB}\n", "slurm/job_7/step_0/memory.current": f"{GIB}\n",
        "slurm/job_7/memory.max": "max\n",
        "slurm/memory.max": f"{8 * GIB}\n", "slurm/memory.current": f"{7 * GIB}\n",
        "slurm/memory.stat": f"anon 1\nfile {3 * GIB}\nshmem {GIB}\nactive_file 5\n",
    })
    mem = host_memory(proc, root)
    assert mem["rss_gb"] == pytest.approx(2.0)                        # RssAnon + RssShmem, not VmRSS
    assert mem["host_mem_bound"] == "cgroup"
    assert mem["host_mem_fraction"] == pytest.approx(5 / 8)           # 7 - (3 - 1) GiB of 8
    assert mem["host_mem_used_gb"] == pytest.approx(5.0) and mem["host_mem_limit_gb"] == pytest.approx(8.0)

    # cgroup v1 with a limit (a hybrid host: the v2 line has no memory controller)
    proc, root = fake_host(tmp_path / "v1", cgroup_lines=["4:memory:/docker/abc", "1:cpu:/", "0::/docker/abc"], files={
        "memory/docker/abc/memory.limit_in_bytes": f"{4 * GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{3 * GIB}\n",
        "memory/docker/abc/memory.stat": f"cache {GIB}\ntotal_cache {GIB}\ntotal_shmem 0\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",   # no limit, as v1 writes it
        "memory/memory.usage_in_bytes": f"{GIB}\n",
    })
    mem = host_memory(proc, root)
    assert mem["host_mem_bound"] == "cgroup" and mem["host_mem_fraction"] == pytest.approx(0.5)

    # no limit anywhere: the machine's 4 of 16 GiB in use
    proc, root = fake_host(tmp_path / "nolimit", cgroup_lines=["4:memory:/docker/abc"], files={
        "memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB}\n",
    })
    mem = host_memory(proc, root)
    assert mem["host_mem_bound"] == "machine" and mem["host_mem_fraction"] == pytest.approx(0.25)

    # a container sees its own cgroup as the mount's root: the path it is told is not there,
    # or climbs out of the mount
    for n, told in enumerate(("0::/kubepods/pod1/c1", "0::/../../x")):
        proc, root = fake_host(tmp_path / f"ns{n}", cgroup_lines=[told], files={
            "memory.max": f"{4 * GIB}\n", "memory.current": f"{3 * GIB}\n", "memory.stat": "file 0\n",
        })
        mem = host_memory(proc, root)
        assert mem["host_mem_bound"] == "cgroup" and mem["host_mem_fraction"] == pytest.approx(0.75)

    # nothing readable (not Linux): the peak RSS from getrusage only, no error
    assert set(host_memory(tmp_path / "none", tmp_path / "none")) == {"rss_gb"}


def test_host_memory_here_is_a_fraction_of_what_this_machine_has():
    from dinox.observe.health import host_memory

    mem = host_memory()
    if "host_mem_fraction" not in mem:
        pytest.skip("no /proc/meminfo here")
    assert 0.0 < mem["host_mem_fraction"] < 1.0 and mem["rss_gb"] > 0.01


CPU = DeviceInfo(kind="cpu", torch_device="cpu", name="cpu", total_memory_bytes=16 * GIB,
                 unified_memory=False, bf16_supported=True, fused_adamw=False, count=1)


def test_memory_watch_warns_once_per_crossing_of_host_memory():
    reading = {"rss_gb": 3.0, "host_mem_used_gb": 10.0, "host_mem_limit_gb": 16.0,
               "host_mem_fraction": 0.62, "host_mem_bound": "machine"}
    watch = MemoryWatch(CPU, num_workers=4, read_host=lambda: dict(reading), host_interval_s=0)
    assert watch.check() is None
    assert watch.host_metrics() == {"rss_gb": 3.0, "host_mem_fraction": 0.62}
    reading.update(host_mem_fraction=0.93, host_mem_bound="cgroup")
    message = watch.check()
    assert message is not None and "\n" not in message
    assert "host memory at 93% of this job's memory limit (cgroup), 16.0 GiB" in message
    assert "this process holds 3.0 GiB" in message and "lower --num-workers (now 4;" in message
    assert "--batch-size" in message        # on a CPU the model is in host memory
    assert watch.check() is None            # once per crossing
    reading["host_mem_fraction"] = 0.88     # a dip just under the line does not re-arm it
    assert watch.check() is None
    reading["host_mem_fraction"] = 0.91
    assert watch.check() is None
    reading["host_mem_fraction"] = 0.5
    assert watch.check() is None
    reading["host_mem_fraction"] = 0.91
    assert watch.check() is not None        # re-armed


def test_memory_watch_reads_the_host_at_most_once_an_interval():
    calls, now = [], [0.0]
    watch = MemoryWatch(CPU, read_host=lambda: calls.append(1) or {"rss_gb": 1.0, "host_mem_fraction": 0.1,
                                                                      "host_mem_limit_gb": 16.0,
                                                                      "host_mem_bound": "machine"},
                        host_interval_s=1.0, clock=lambda: now[0])
    for _ in range(5):
        watch.host_metrics(), watch.check()
    assert len(calls) == 1
    now[0] = 1.5
    watch.check()
    assert len(calls) == 2


def test_memory_watch_on_a_discrete_gpu_names_host_remedies_only(monkeypatch):
    fake_memory(monkeypatch, reserved=GIB, peak=GIB)
    reading = {"rss_gb": 30.0, "host_mem_limit_gb": 32.0, "host_mem_fraction": 0.97, "host_mem_bound": "machine"}
    watch = MemoryWatch(gpu_info("cuda", RTX4090[0], RTX4090[1]), read_host=lambda: reading)
    message = watch.check()
    assert message.startswith("host memory at 97% of the machine's memory, 32.0 GiB")
    assert "--num-workers" not in message   # no loader workers to lower
    assert "stop other programs" in message and "--grad-checkpoint" not in message
    fake_memory(monkeypatch, reserved=90 * GIB, peak=GIB)
    watch = MemoryWatch(gpu_info("rocm", *STRIX_HALO[:2], unified=True), read_host=lambda: reading)
    both = watch.check().splitlines()
    assert both[0].startswith("device memory at") and both[1].startswith("host memory at")
    assert "--grad-checkpoint" in both[1]   # unified memory: the model is in host memory too


def test_memory_watch_survives_a_failing_host_reading():
    def boom():
        raise OSError("gone")
    watch = MemoryWatch(CPU, read_host=boom)
    assert watch.check() is None and watch.host_metrics() == {}


def test_one_rank_per_machine_watches_its_host_and_names_the_machine():
    reading = {"rss_gb": 3.0, "host_mem_limit_gb": 16.0, "host_mem_fraction": 0.95, "host_mem_bound": "machine"}
    calls = []
    beside = MemoryWatch(CPU, read_host=lambda: calls.append(1) or reading, watch_host=False, node="gpu-017")
    assert beside.check() is None and beside.host_metrics() == {} and not calls   # local rank > 0: not read
    first = MemoryWatch(CPU, read_host=lambda: reading, node="gpu-017")
    assert first.check().startswith("host memory at 95% of the machine's memory on gpu-017, 16.0 GiB")
    alone = MemoryWatch(CPU, read_host=lambda: reading)
    assert alone.check().startswith("host memory at 95% of the machine's memory, 16.0 GiB")


def test_each_rank_watches_its_device_and_local_rank_0_its_machine(monkeypatch):
    from dinox.config import RuntimeConfig
    from dinox.run.distributed import DistEnv
    monkeypatch.setattr("socket.gethostname", lambda: "gpu-017")
    runtime = RuntimeConfig(num_workers=3, amp=True)
    beside = MemoryWatch.for_rank(CPU, DistEnv(rank=9, world_size=16, local_rank=1), runtime)
    first = MemoryWatch.for_rank(CPU, DistEnv(rank=8, world_size=16, local_rank=0), runtime)
    alone = MemoryWatch.for_rank(CPU, DistEnv(), runtime)
    assert (beside.watch_host, first.watch_host, alone.watch_host) == (False, True, True)
    assert (beside.node, first.node, alone.node) == ("gpu-017", "gpu-017", None)
    assert first.num_workers == 3 and first.amp is True


def test_only_a_run_of_several_ranks_names_its_machine(monkeypatch):
    from dinox.run.distributed import DistEnv
    monkeypatch.setattr("socket.gethostname", lambda: "gpu-017")
    assert DistEnv().node_name is None
    assert DistEnv(rank=9, world_size=16, local_rank=1).node_name == "gpu-017"


def test_a_presets_workers_are_cut_to_the_cpus_each_rank_has():
    values, lines = apply_hardware_preset(dict.fromkeys(PRESET_KEYS), "amd395", cpus=4)
    assert values["num_workers"] == 3 and values["batch_size"] == 128
    assert ("num_workers=3 (preset 16, cut to fit the 4 CPUs each training process has on this machine, one left "
            "to the process)") in lines[1]
    values, _ = apply_hardware_preset(dict.fromkeys(PRESET_KEYS), "rtx4090", cpus=1)
    assert values["num_workers"] == 1                        # one worker still overlaps loading with the step
    values, lines = apply_hardware_preset(dict.fromkeys(PRESET_KEYS), "rtx4090", cpus=32)
    assert values["num_workers"] == 8 and not any("cut to" in line for line in lines)
    values, lines = apply_hardware_preset({"num_workers": 12}, "rtx4090", cpus=4)
    assert values["num_workers"] == 12                       # the user's count is kept, and noted
    assert lines[-1].startswith("--num-workers 12 is more than the 4 CPUs each training process has")
    _, lines = apply_hardware_preset({"num_workers": 4}, "rtx4090", cpus=4)
    assert not any("more than" in line for line in lines)


def test_cpus_per_rank_shares_the_affinity_among_the_ranks_of_the_machine(monkeypatch):
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hardware.cpus_per_rank() == 32
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert hardware.cpus_per_rank() == 4
    assert hardware.cpus_per_rank(local_ranks=2) == 16      # a plan names its own count
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert hardware.cpus_per_rank() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert hardware.cpus_per_rank() == 32
    # a job's cpuset of 16 of the 32 shared by 8 ranks: 2 each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert hardware.cpus_per_rank() == 2
    # each of 8 ranks pinned to 4 CPUs of its own (srun --cpu-bind): the 4 are this rank's
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert hardware.cpus_per_rank() == 4
    monkeypatch.delattr(hardware.os, "sched_getaffinity", raising=False)   # macOS has none
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: None)
    assert hardware.cpus_per_rank() is None
