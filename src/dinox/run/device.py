"""Which device to train on, which throughput preset suits it, and a watch on its memory.

The seed user guide ("Hardware Detection") and requirements ("Hardware Target Selection",
"Hardware-Specific Optimization Presets", "Memory monitoring prevents OOM") ask for:
automatic CUDA / ROCm detection with a visible `--device` override, presets of
num_workers / pin_memory / batch size chosen per platform, a log line saying which preset
is active and which values the user overrode, a notice when a checkpoint resumes on other
hardware, and a warning with mitigations when device memory runs close to full.

ROCm builds of PyTorch expose AMD GPUs through the `torch.cuda` API (`torch.version.hip`
is set), so "rocm" devices use torch device strings "cuda:N" as well.
"""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch

from dinox.errors import UserError

DEVICE_KINDS = ("cuda", "rocm", "mps", "cpu")
KIND_LABELS = {"cuda": "CUDA", "rocm": "ROCm", "mps": "MPS", "cpu": "CPU"}

GIB = 1024**3

# AMD APUs whose GPU shares system RAM: Strix Halo (Ryzen AI Max+ 395, Radeon 8060S, gfx1151).
UNIFIED_MEMORY_MARKERS = ("radeon 8060s", "radeon 8050s", "strix", "gfx1151")

# 80 GB class data-centre cards (A100-80GB, H100, H200, B200) report at least this much.
DATACENTER_MIN_BYTES = 70 * GIB
DATACENTER_NAMES = ("H100", "H200", "A100", "B200", "GH200")


@dataclass
class DeviceInfo:
    kind: str
    torch_device: str
    name: str
    total_memory_bytes: int | None
    unified_memory: bool
    bf16_supported: bool
    fused_adamw: bool
    count: int
    arch: str = ""

    def to_dict(self) -> dict:
        """Plain types only (safe for `torch.load(weights_only=True)` and JSON), plus the
        matched preset so a resumed run can tell that the platform changed."""
        return {**asdict(self), "preset": match_preset(self)}

    def summary(self) -> str:
        memory = "unknown memory" if self.total_memory_bytes is None else f"{self.total_memory_bytes / GIB:.1f} GiB"
        traits = [memory + (" unified" if self.unified_memory else "")]
        if self.count > 1:
            traits.append(f"{self.count} devices")
        traits.append("bf16" if self.bf16_supported else "no bf16")
        if self.fused_adamw:
            traits.append("fused AdamW")
        return f"{KIND_LABELS[self.kind]} '{self.name}' on {self.torch_device} ({', '.join(traits)})"


def _detected_kind() -> str:
    if torch.cuda.is_available():
        return "rocm" if torch.version.hip is not None else "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _resolve_kind(requested: str) -> tuple[str, list[str]]:
    detected = _detected_kind()
    if requested == "auto":
        return detected, []
    if requested in ("cpu", detected):
        return requested, []
    hip = torch.version.hip is not None
    if requested == "cuda" and detected == "rocm":
        return "rocm", [
            "requested --device cuda on a ROCm build of PyTorch: using the AMD GPU through "
            "torch's cuda API (same as --device rocm)"
        ]
    if requested == "cuda":
        what = "no CUDA device is available"
        reason = "ROCm build, torch.cuda.is_available() is False" if hip else "torch.cuda.is_available() is False"
    elif requested == "rocm":
        what = "no ROCm device is available" if hip else "no ROCm runtime is available"
        reason = "torch.cuda.is_available() is False" if hip else "torch.version.hip is None"
    else:
        what = "MPS is not available"
        reason = "torch.backends.mps.is_available() is False"
    return detected, [f"requested --device {requested} but {what} ({reason}); falling back to {detected}"]


def detect_device(requested: str = "auto", local_rank: int = 0) -> tuple[DeviceInfo, list[str]]:
    """Pick the training device. Returns it and the notices to log (fallbacks, overrides).

    `requested` is the `--device` value: "auto" detects CUDA, then ROCm, then MPS, then
    CPU; an explicit runtime that is missing falls back to the detected one with a
    warning rather than failing (requirement "Manual hardware target override").
    `local_rank` picks the GPU of this process under torchrun.
    """
    requested = (requested or "auto").lower()
    if requested not in ("auto", *DEVICE_KINDS):
        raise UserError(f"unknown --device {requested!r}; choose one of auto, {', '.join(DEVICE_KINDS)}")
    kind, notices = _resolve_kind(requested)
    if kind in ("cuda", "rocm"):
        return _gpu_info(kind, local_rank), notices
    if kind == "mps":
        return _mps_info(), notices
    return _cpu_info(), notices


def _gpu_info(kind: str, local_rank: int) -> DeviceInfo:
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise UserError(
            f"local rank {local_rank} has no GPU: only {count} {KIND_LABELS[kind]} device(s) are visible; "
            "launch fewer processes per node (torchrun --nproc-per-node) or check CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES"
        )
    props = torch.cuda.get_device_properties(local_rank)
    name = torch.cuda.get_device_name(local_rank)
    arch = str(getattr(props, "gcnArchName", "") or "")
    looks_unified = any(marker in f"{name} {arch}".lower() for marker in UNIFIED_MEMORY_MARKERS)
    return DeviceInfo(
        kind=kind,
        torch_device=f"cuda:{local_rank}",
        name=name,
        total_memory_bytes=int(props.total_memory),
        unified_memory=bool(getattr(props, "is_integrated", False)) or (kind == "rocm" and looks_unified),
        bf16_supported=bool(torch.cuda.is_bf16_supported()),
        fused_adamw=True,
        count=count,
        arch=arch,
    )


def _mps_info() -> DeviceInfo:
    recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
    try:
        memory = int(recommended()) if recommended else system_memory_bytes()
    except RuntimeError:
        memory = system_memory_bytes()
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        bf16 = True
    except (RuntimeError, TypeError):
        bf16 = False
    return DeviceInfo(
        kind="mps",
        torch_device="mps",
        name=f"Apple {platform.machine() or 'GPU'} (MPS)",
        total_memory_bytes=memory,
        unified_memory=True,
        bf16_supported=bf16,
        fused_adamw=False,
        count=1,
    )


def _cpu_info() -> DeviceInfo:
    return DeviceInfo(
        kind="cpu",
        torch_device="cpu",
        name=cpu_name(),
        total_memory_bytes=system_memory_bytes(),
        unified_memory=False,
        bf16_supported=cpu_native_bf16(),
        fused_adamw=False,
        count=1,
    )


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), as
    PyTorch's CPU kernels see it. Without it bf16 autocast still works, emulated, and is
    usually slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def available_memory_bytes() -> int | None:
    """Memory the system can hand out now without swapping (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def system_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _cpu_workers() -> int:
    cpus = os.cpu_count()
    return max(0, min(4, cpus - 1)) if cpus else 2


def cpus_per_rank(local_ranks: int | None = None) -> int | None:
    """The CPUs each training process on this machine may use, None if unknown.

    This process's CPU affinity (taskset, a cpuset, SLURM's --cpus-per-task; os.cpu_count()
    where there is none) is shared by the ranks torchrun starts on the machine
    (LOCAL_WORLD_SIZE, or `local_ranks` for a plan), unless the affinity is small enough to
    be this rank's own: a launcher that pins each rank to its CPUs (srun --cpu-bind, a
    binding script) leaves affinity x ranks within the machine's CPUs. A NUMA-node binding
    shared by several ranks reads as shared, and is cut more than it needs (fewer workers,
    never more processes than cores)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    if local_ranks is None:
        try:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_ranks = 1
    ranks = max(1, local_ranks)
    if not cpus:
        return None
    machine = os.cpu_count() or cpus
    pinned = cpus < machine and cpus * ranks <= machine
    return cpus if pinned else max(1, cpus // ranks)


PRESET_KEYS = ("num_workers", "pin_memory", "batch_size", "accumulation_steps")

# Every accelerator preset keeps an effective batch (batch_size x accumulation_steps) of
# 256, the seed guide's 64 x 4 and 128 x 2, so a run resumed on another accelerator keeps
# the same optimisation; only the split between micro-batch and accumulation changes. The
# CPU preset's 32 (smoke runs) and a batch set by flag do change it: a resume warns then.
HARDWARE_PRESETS: dict[str, dict] = {
    "rtx4090": {
        "num_workers": 8, "pin_memory": True, "batch_size": 64, "accumulation_steps": 4,
        "description": "NVIDIA RTX 4090 24 GB: seed guide 'Hardware Detection' and Phase 5a (64 x 4, with --grad-checkpoint)",
    },
    "amd395": {
        "num_workers": 16, "pin_memory": False, "batch_size": 128, "accumulation_steps": 2,
        "description": "AMD Strix Halo (Ryzen AI Max+ 395) ROCm, 128 GB unified memory: seed guide; "
                       "pin_memory off because host and GPU share RAM",
    },
    "h100": {
        "num_workers": 16, "pin_memory": True, "batch_size": 128, "accumulation_steps": 2,
        "description": "80 GB class data-centre GPU (H100/H200/A100-80GB): dinox's choice, not from the seeds",
    },
    "cuda-generic": {
        "num_workers": 8, "pin_memory": True, "batch_size": 32, "accumulation_steps": 8,
        "description": "other NVIDIA GPU: conservative micro-batch, same effective batch 256",
    },
    "rocm-generic": {
        "num_workers": 8, "pin_memory": True, "batch_size": 32, "accumulation_steps": 8,
        "description": "other (discrete) AMD GPU under ROCm: conservative micro-batch, same effective batch 256",
    },
    "mps": {
        "num_workers": 4, "pin_memory": False, "batch_size": 16, "accumulation_steps": 16,
        "description": "Apple silicon (MPS, unified memory): small micro-batch, same effective batch 256",
    },
    "cpu": {
        "num_workers": _cpu_workers(), "pin_memory": False, "batch_size": 32, "accumulation_steps": 1,
        "description": "CPU: smoke runs only; workers = min(4, cores - 1)",
    },
}


def match_preset(info: DeviceInfo) -> str:
    """The preset for a device, by name first and memory second."""
    if info.kind in ("cpu", "mps"):
        return info.kind
    if info.kind == "rocm":
        return "amd395" if info.unified_memory else "rocm-generic"
    if "4090" in info.name:
        return "rtx4090"
    memory = info.total_memory_bytes
    named_datacenter = any(model in info.name.upper() for model in DATACENTER_NAMES)
    if (memory is not None and memory >= DATACENTER_MIN_BYTES) or (memory is None and named_datacenter):
        return "h100"
    return "cuda-generic"


def apply_hardware_preset(user_values: dict[str, object | None], preset_name: str,
                          cpus: int | None = None) -> tuple[dict, list[str]]:
    """Resolve num_workers, pin_memory, batch_size and accumulation_steps.

    A value the user gave (not None) wins over the preset and is reported as custom
    (requirement "Custom optimization override"); the rest come from the preset.
    `cpus` (`cpus_per_rank()`) bounds the preset's loader workers: a preset names the
    workers its machine can feed (16 on a 32-thread APU), and on a smaller share of CPUs
    (a SLURM task, a container, eight ranks on one node) that many processes would only
    compete with the training process for cores. The preset's count is cut to cpus - 1
    (at least 1), leaving a core to the rank itself; a count the user gave is kept and
    only noted when it is larger than `cpus`.
    Returns the four resolved values and the lines to log.
    """
    if preset_name not in HARDWARE_PRESETS:
        raise UserError(f"unknown hardware preset {preset_name!r}; choose one of {', '.join(HARDWARE_PRESETS)}")
    unknown = set(user_values) - set(PRESET_KEYS)
    if unknown:
        raise ValueError(f"not hardware preset settings: {sorted(unknown)}; expected {PRESET_KEYS}")
    preset = HARDWARE_PRESETS[preset_name]
    resolved: dict[str, object] = {}
    from_preset: list[str] = []
    custom: list[str] = []
    share = f"the {cpus} CPU{'s' if cpus != 1 else ''} each training process has on this machine"
    for key in PRESET_KEYS:
        value = user_values.get(key)
        if value is None:
            resolved[key] = preset[key]
            if key == "num_workers" and cpus is not None and preset[key] > max(1, cpus - 1):
                resolved[key] = max(1, cpus - 1)
                from_preset.append(f"{key}={resolved[key]} (preset {preset[key]}, cut to fit {share}, "
                                   f"one left to the process)")
            else:
                from_preset.append(f"{key}={preset[key]}")
        else:
            resolved[key] = value
            custom.append(f"{key}={value} (preset {preset[key]})")
    lines = [f"hardware preset: {preset_name} ({preset['description']})"]
    if from_preset:
        lines.append("from preset: " + ", ".join(from_preset))
    if custom:
        lines.append("custom optimizations active: " + ", ".join(custom))
    given_workers = user_values.get("num_workers")
    if isinstance(given_workers, int) and cpus is not None and given_workers > cpus:
        lines.append(f"--num-workers {given_workers} is more than {share}: the loader workers will "
                     f"share cores with training (at most {max(1, cpus - 1)} leaves the process a core)")
    return resolved, lines


def _describe_saved(kind: str | None, name: str | None, preset: str | None) -> str:
    label = KIND_LABELS.get(kind or "", kind or "unknown device")
    return f"{label} '{name or '?'}' (preset {preset or '?'})"


def hardware_change_notice(saved_hw: dict | None, current: DeviceInfo, current_preset: str | None = None) -> str | None:
    """A notice when a checkpoint saved on other hardware is resumed here, else None.

    `saved_hw` is the checkpoint's `DeviceInfo.to_dict()`; kind, name and preset are
    compared (the seed guide's "Cross-Hardware Resume": detect, re-apply presets, log).
    """
    if not saved_hw:
        return None
    preset = current_preset or match_preset(current)
    now = {"kind": current.kind, "name": current.name, "preset": preset}
    changed = [key for key, value in now.items() if saved_hw.get(key) is not None and saved_hw.get(key) != value]
    if not changed:
        return None
    before = _describe_saved(saved_hw.get("kind"), saved_hw.get("name"), saved_hw.get("preset"))
    after = _describe_saved(current.kind, current.name, preset)
    return f"hardware platform changed: {before} -> {after}; applying the {preset} preset"
