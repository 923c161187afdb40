"""Health of the machine a run is on: device memory, host memory, GPU telemetry, a health
report, and the memory watch that warns before the device or the host runs out.

Nothing here raises into the training loop: a monitoring hiccup must not kill a long run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dinox.observe.metrics import json_safe
from dinox.run.device import GIB, DeviceInfo

log = logging.getLogger("dinox.monitor")



# ----------------------------------------------------------------------------- health

def _is_gpu(device) -> bool:
    try:
        return torch.device(device).type == "cuda" and torch.cuda.is_available()
    except Exception:
        return False


def _device_index(device) -> int:
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def device_memory_metrics(device) -> dict:
    """{mem_allocated_gb, mem_reserved_gb, mem_peak_gb} (GiB) for a CUDA/ROCm device, else {}."""
    if not _is_gpu(device):
        return {}
    try:
        return _allocator_memory(torch.device(device))
    except Exception:
        return {}


def _allocator_memory(device: torch.device) -> dict:
    """The caching allocator's figures in GiB: the one reading of device memory."""
    return {"mem_allocated_gb": torch.cuda.memory_allocated(device) / GIB,
            "mem_reserved_gb": torch.cuda.memory_reserved(device) / GIB,
            "mem_peak_gb": torch.cuda.max_memory_allocated(device) / GIB}


def _rss_gb(proc: Path = Path("/proc")) -> float | None:
    """This process's resident memory that the kernel cannot drop: anonymous and shared
    pages (RssAnon + RssShmem; VmRSS where the kernel is older than 4.5). Memory-mapped
    volumes are file pages the kernel reclaims first, so they are left out: a loader that
    maps the data does not look like a leak. Falls back to the peak RSS where /proc is absent."""
    try:
        fields = {}
        with open(proc / "self" / "status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
        if "RssAnon" in fields:
            return (fields["RssAnon"] + fields.get("RssShmem", 0)) / GIB
        if "VmRSS" in fields:
            return fields["VmRSS"] / GIB
    except (OSError, ValueError, IndexError):
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB
    except Exception:
        return None


CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60   # cgroup v1 writes "no limit" as a number near 2**63

# Per cgroup version: (limit, usage, the memory.stat keys of file pages and of the shared
# memory counted among them). File pages the kernel can write back or drop are not what an
# out-of-memory kill is about; shared memory (tmpfs, /dev/shm) among them cannot be dropped.
_CGROUP_FILES = {2: ("memory.max", "memory.current", "file", "shmem"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")}


def _cgroup_levels(proc: Path, cgroup_root: Path) -> list[tuple[int, Path]]:
    """(version, folder) of each memory cgroup above this process, leaf first. A folder that
    is not there (a container sees its own cgroup as the mount's root) is skipped, and so is
    a path that climbs out of the mount (`..`, seen under cgroup namespaces)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    levels: list[tuple[int, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            version, base = 2, cgroup_root
        elif "memory" in controllers.split(","):
            version, base = 1, cgroup_root / "memory"
        else:
            continue
        rel_path = Path(rel.lstrip("/"))
        if ".." in rel_path.parts:
            rel_path = Path()
        for folder in [base / rel_path, *[base / up for up in rel_path.parents]]:
            if folder.is_dir() and (version, folder) not in levels:
                levels.append((version, folder))
    return levels


def _cgroup_use(version: int, folder: Path) -> tuple[int, int] | None:
    """(memory in use that the kernel cannot reclaim, limit) in bytes of one cgroup level,
    None where it has no limit: the usage less its file pages, plus the shared memory among
    them (the usage less what the kernel drops or writes back before it kills)."""
    limit_name, usage_name, file_key, shmem_key = _CGROUP_FILES[version]
    try:
        raw = (folder / limit_name).read_text().strip()
        if raw == "max" or int(raw) >= _NO_LIMIT:
            return None
        limit, usage = int(raw), int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    stat = {}
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in (file_key, shmem_key):
                stat[key] = int(value)
    except (OSError, ValueError):
        pass
    reclaimable = max(stat.get(file_key, 0) - stat.get(shmem_key, 0), 0)
    return max(usage - reclaimable, 0), limit


def host_memory(proc: Path = Path("/proc"), cgroup_root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """How full the memory this process may use is, in GiB: {rss_gb (this process, see
    `_rss_gb`), host_mem_used_gb, host_mem_limit_gb, host_mem_fraction, host_mem_bound}.

    Two limits can end a run with the kernel's SIGKILL: the machine's memory (used = MemTotal
    less MemAvailable, the kernel's estimate of what it can give without swapping) and a cgroup
    limit (a SLURM job's --mem, a container's), read at every level above the process as what
    it cannot reclaim (`_cgroup_use`) against its limit. The fullest is reported;
    `host_mem_bound` names it ("machine" or "cgroup"). On a unified-memory APU the GPU's
    allocations are in these figures too. Only rss_gb where nothing else can be read (not Linux).
    """
    out: dict[str, Any] = {}
    rss = _rss_gb(proc)
    if rss is not None:
        out["rss_gb"] = rss
    candidates: list[tuple[float, int, int, str]] = []
    try:
        info = {}
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            words = value.split()
            if words:
                info[key] = int(words[0]) * 1024
        total, available = info["MemTotal"], info["MemAvailable"]
        if total > 0:
            candidates.append(((total - available) / total, total - available, total, "machine"))
    except (OSError, KeyError, ValueError):
        pass
    for version, folder in _cgroup_levels(proc, cgroup_root):
        use = _cgroup_use(version, folder)
        if use is not None and use[1] > 0:
            candidates.append((use[0] / use[1], use[0], use[1], "cgroup"))
    if candidates:
        fraction, used, limit, bound = max(candidates, key=lambda c: c[0])
        out.update(host_mem_used_gb=used / GIB, host_mem_limit_gb=limit / GIB,
                   host_mem_fraction=fraction, host_mem_bound=bound)
    return out


def _physical_gpu(index: int, env_vars=("CUDA_VISIBLE_DEVICES",)) -> str:
    """The id the vendor tool knows for torch's device `index` (tools ignore *_VISIBLE_DEVICES)."""
    for var in env_vars:
        visible = [v.strip() for v in os.environ.get(var, "").split(",") if v.strip()]
        if index < len(visible):
            return visible[index]
    return str(index)


def _float(text) -> float | None:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        m = re.search(r"-?\d+(?:\.\d+)?", str(text))
        value = float(m.group()) if m else None
    return value if value is not None and math.isfinite(value) else None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _pynvml(gpu: str) -> dict | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(gpu)) if gpu.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(gpu))
            temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return {"gpu_temperature_c": float(temp), "gpu_utilization_pct": float(util),
            "gpu_power_w": float(power), "source": "pynvml"}


def _nvidia_smi(gpu: str) -> dict | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = _run([exe, f"--id={gpu}", "--query-gpu=temperature.gpu,utilization.gpu,power.draw",
                "--format=csv,noheader,nounits"])
    if not out or not out.strip():
        return None
    fields = [f.strip() for f in out.strip().splitlines()[0].split(",")]
    if len(fields) < 3:
        return None
    values = [_float(f) for f in fields[:3]]
    if all(v is None for v in values):
        return None
    return {"gpu_temperature_c": values[0], "gpu_utilization_pct": values[1],
            "gpu_power_w": values[2], "source": "nvidia-smi"}


def _pick(card: dict, *patterns: str) -> float | None:
    """First value in a rocm-smi card dict whose key matches the patterns in priority order."""
    for pattern in patterns:
        for key, value in card.items():
            if re.search(pattern, key, re.IGNORECASE):
                v = _float(value)
                if v is not None:
                    return v
    return None


def _rocm_smi(gpu: str) -> dict | None:
    exe = shutil.which("rocm-smi")
    if exe is None:
        return None
    out = _run([exe, "--showtemp", "--showuse", "--showpower", "--json"])
    try:
        data = json.loads(out) if out else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None
    cards = {k: v for k, v in data.items() if k.lower().startswith("card") and isinstance(v, dict)}
    if not cards:
        return None
    card = cards.get(f"card{gpu}") or next(iter(cards.values()))
    values = {"gpu_temperature_c": _pick(card, r"temperature.*edge", r"temperature"),
              "gpu_utilization_pct": _pick(card, r"gpu use", r"busy"),
              "gpu_power_w": _pick(card, r"power.*\(w\)", r"power")}
    if all(v is None for v in values.values()):
        return None
    return {**values, "source": "rocm-smi"}


def gpu_telemetry(index: int = 0) -> dict:
    """Temperature (C), utilisation (%) and power (W) of GPU `index` (torch numbering).

    Tries pynvml, then `nvidia-smi`, then `rocm-smi`; all fields None with
    `source: "unavailable"` when none answers. Never raises.
    """
    try:
        nv = _physical_gpu(index)
        amd = _physical_gpu(index, ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"))
        for probe, gpu in ((_pynvml, nv), (_nvidia_smi, nv), (_rocm_smi, amd)):
            result = probe(gpu)
            if result is not None:
                return result
    except Exception as e:
        log.debug("gpu telemetry failed: %s", e)
    return {"gpu_temperature_c": None, "gpu_utilization_pct": None, "gpu_power_w": None,
            "source": "unavailable"}


def health_report(device, steps_per_s: float | None = None, samples_per_s: float | None = None) -> dict:
    """Throughput, process and host memory (`host_memory`), device memory and GPU telemetry.
    Never raises.

    Device memory fields (GIB) and GPU telemetry are None unless `device` is a CUDA/ROCm
    device; `mem_fraction` (reserved / total) is what an OOM watch should look at.
    """
    report: dict[str, Any] = {"time": time.time(), "device": str(device),
                              "steps_per_s": steps_per_s, "samples_per_s": samples_per_s}
    report.update({"rss_gb": None, "host_mem_used_gb": None, "host_mem_limit_gb": None,
                   "host_mem_fraction": None, "host_mem_bound": None})
    try:
        report.update(host_memory())
    except Exception as e:
        log.debug("host memory query failed: %s", e)
    mem = {"mem_allocated_gb": None, "mem_reserved_gb": None, "mem_peak_gb": None,
           "mem_total_gb": None, "mem_fraction": None}
    telemetry = {"gpu_temperature_c": None, "gpu_utilization_pct": None, "gpu_power_w": None,
                 "source": "unavailable"}
    try:
        if _is_gpu(device):
            mem.update(device_memory_metrics(device))
            index = _device_index(device)
            total = torch.cuda.get_device_properties(index).total_memory / GIB
            mem["mem_total_gb"] = total
            if mem["mem_reserved_gb"] is not None and total > 0:
                mem["mem_fraction"] = mem["mem_reserved_gb"] / total
            telemetry = gpu_telemetry(index)
    except Exception as e:
        log.debug("device health query failed: %s", e)
    report.update(mem)
    report.update(telemetry)
    return json_safe(report)


HOST_READ_INTERVAL_S = 1.0   # the memory watch reads host memory at most this often
HOST_REARM_MARGIN = 0.05     # the host warning re-arms only this far under its fraction


class MemoryWatch:
    """Warns once each time device memory, or host memory, crosses `warn_fraction` of its total.

    Device use is the larger of the caching allocator's reserved bytes and the peak allocated
    bytes (torch.cuda.memory_reserved / max_memory_allocated). Only CUDA and ROCm keep
    these statistics; on other devices `snapshot()` returns None. Host use is `host_memory`'s
    fraction (the machine's or the cgroup's, whichever is fuller), on every device: the kernel
    ends a process that runs the host out with SIGKILL, which no checkpoint precedes. It is
    read at most every `host_interval_s` (it reads /proc and every cgroup level), and the same
    reading serves the metrics row (`host_metrics`). The device warning re-arms once use drops
    below the fraction again (e.g. after torch.cuda.reset_peak_memory_stats); the host
    warning only `HOST_REARM_MARGIN` below it, since the machine's figure moves with every
    other program and a run near the line would otherwise warn every few steps.

    Under torchrun every rank watches its own device, and one rank per machine (`watch_host`,
    local rank 0) its machine's memory: a node other than rank 0's can run out alone, and the
    ranks beside it would repeat its line. `node` names the machine in the host line where a
    run spans several.
    """

    def __init__(self, device_info: DeviceInfo, warn_fraction: float = 0.9, *,
                 grad_checkpoint: bool | None = None, amp: bool | None = None, num_workers: int = 0,
                 read_host=host_memory, host_interval_s: float = HOST_READ_INTERVAL_S, clock=time.monotonic,
                 watch_host: bool = True, node: str | None = None):
        if not 0.0 < warn_fraction <= 1.0:
            raise ValueError(f"warn_fraction must be in (0, 1], got {warn_fraction}")
        self.device_info = device_info
        self.warn_fraction = warn_fraction
        self.grad_checkpoint = grad_checkpoint
        self.amp = amp
        self.num_workers = num_workers
        self.read_host, self.host_interval_s, self.clock = read_host, host_interval_s, clock
        self.watch_host, self.node = watch_host, node
        self._host_reading: dict[str, Any] = {}
        self._host_read_at: float | None = None
        self._above = False
        self._host_above = False

    @classmethod
    def for_rank(cls, device_info: DeviceInfo, dist, runtime) -> "MemoryWatch":
        """The watch of one rank of a run (`dist`: its DistEnv; `runtime`: the run's
        RuntimeConfig): its own device, and its machine's memory on local rank 0 alone."""
        return cls(device_info, grad_checkpoint=runtime.grad_checkpoint, amp=runtime.amp,
                   num_workers=runtime.num_workers, watch_host=dist.local_rank == 0, node=dist.node_name)

    @property
    def active(self) -> bool:
        return self.device_info.kind in ("cuda", "rocm") and bool(self.device_info.total_memory_bytes)

    def snapshot(self) -> dict[str, float] | None:
        """`device_memory_metrics` plus mem_fraction (of the device total), or None where
        the device keeps no allocator statistics."""
        if not self.active:
            return None
        device = torch.device(self.device_info.torch_device)
        try:
            stats = _allocator_memory(device)
        except Exception:
            return None
        total = self.device_info.total_memory_bytes / GIB
        return {**stats, "mem_fraction": max(stats["mem_reserved_gb"], stats["mem_peak_gb"]) / total}

    def host_metrics(self) -> dict[str, float]:
        """rss_gb and host_mem_fraction for a metrics row (the watch's latest host reading;
        empty where this rank does not watch the host)."""
        mem = self._host()
        return {k: mem[k] for k in ("rss_gb", "host_mem_fraction") if k in mem}

    def _host(self) -> dict[str, Any]:
        if not self.watch_host:
            return {}
        now = self.clock()
        if self._host_read_at is None or now - self._host_read_at >= self.host_interval_s:
            try:
                self._host_reading = self.read_host()
            except Exception:
                self._host_reading = {}
            self._host_read_at = now
        return self._host_reading

    def check(self) -> str | None:
        """The warnings of this step (device, then host; one line each), or None."""
        warnings = [w for w in (self._check_device(), self._check_host()) if w]
        return "\n".join(warnings) or None

    def _check_device(self) -> str | None:
        stats = self.snapshot()
        if stats is None:
            return None
        fraction = stats["mem_fraction"]
        if fraction < self.warn_fraction:
            self._above = False
            return None
        if self._above:
            return None
        self._above = True
        total_gib = self.device_info.total_memory_bytes / GIB
        return (
            f"device memory at {fraction:.0%} of {total_gib:.1f} GiB on {self.device_info.name} "
            f"(reserved {stats['mem_reserved_gb']:.1f} GiB, peak allocated {stats['mem_peak_gb']:.1f} GiB); "
            f"to avoid running out of memory: {'; '.join(self._mitigations())}"
        )

    def _check_host(self) -> str | None:
        mem = self._host()
        fraction = mem.get("host_mem_fraction")
        if fraction is None:
            return None
        if fraction < self.warn_fraction:
            if fraction < self.warn_fraction - HOST_REARM_MARGIN:
                self._host_above = False
            return None
        if self._host_above:
            return None
        self._host_above = True
        where = "the machine's memory" if mem["host_mem_bound"] == "machine" else "this job's memory limit (cgroup)"
        where += f" on {self.node}" if self.node else ""
        rss = f"; this process holds {mem['rss_gb']:.1f} GiB" if mem.get("rss_gb") is not None else ""
        steps = [f"lower --num-workers (now {self.num_workers}; each loader worker is a process with its own "
                 "memory)"] if self.num_workers > 0 else []
        if self.device_info.unified_memory or not self.active:   # the model lives in host memory
            steps += self._mitigations()
        else:
            steps.append("stop other programs on this machine")
        return (
            f"host memory at {fraction:.0%} of {where}, {mem['host_mem_limit_gb']:.1f} GiB{rss}; "
            f"the kernel kills a process that runs it out, without a checkpoint: {'; '.join(steps)}"
        )

    def _mitigations(self) -> list[str]:
        steps = ["reduce --batch-size and raise --accumulation-steps to keep the effective batch"]
        if not self.grad_checkpoint:
            steps.append("enable --grad-checkpoint")
        if not self.amp:
            steps.append("enable --amp (bf16 mixed precision)")
        return steps
