"""Checkpoint store: run directories, atomic saves, integrity records, rotation, resume.

Layout of a run directory::

    <out_root>/YYYYMMDD_HHMMSS[_N]/
        checkpoint_%08d.pth                  periodic (rotated)
        checkpoint_final_%08d.pth            end of training (never rotated)
        checkpoint_emergency_%08d.pth        anomaly / interruption (never rotated)
        <checkpoint name>.sha256             integrity record, JSON {"sha256", "size"}

Saving writes to a hidden temporary file (``.<name>.<host>.<pid>.tmp``) in the same
directory, fsyncs it, renames it over the final name and fsyncs the directory, so a final
name only ever holds a complete file. The sha256 of the bytes written is computed while
writing and stored in the sidecar afterwards (also atomically). A checkpoint whose sidecar
is missing (crash between the two renames, or a file copied without it) is verified by a
full `torch.load` instead; that catches truncation but not flipped bits inside tensors.

Everything is loaded with ``weights_only=True``: a file that carries pickled code is refused
before anything in it runs.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import pickle
import re
import shutil
import socket
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinox.errors import UserError
from dinox.run.rng import capture_rng_state, restore_rng_state

__all__ = [
    "CheckpointError",
    "KINDS",
    "capture_rng_state",
    "checkpoint_path",
        "estimate_checkpoint_bytes",
    "find_resume_checkpoint",
    "list_checkpoints",
    "list_run_dirs",
    "link_or_copy",
    "load_checkpoint",
    "new_run_dir",
    "parse_checkpoint_name",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "sidecar_path",
    "to_safe",
    "verify_checkpoint",
]

log = logging.getLogger("dinox.checkpoint")

KINDS = ("periodic", "final", "emergency")
_PREFIX = {"periodic": "checkpoint_", "final": "checkpoint_final_", "emergency": "checkpoint_emergency_"}
_NAME_RE = re.compile(r"^checkpoint_(?:(final|emergency)_)?(\d{8,})\.pth$")
_RUN_RE = re.compile(r"^(\d{8}_\d{6})(?:_(\d+))?$")
_TEMP_RE = re.compile(r"^\.checkpoint_.*\.(?P<host>[^.]*)\.(?P<pid>\d+)\.tmp$")
# At equal step: a final checkpoint is the cleanest state, an emergency one the least usual.
_RESUME_RANK = {"emergency": 0, "periodic": 1, "final": 2}
SIDECAR_SUFFIX = ".sha256"
_CHUNK = 16 << 20
_SPACE_MARGIN_FRACTION = 0.02
_SPACE_MARGIN_BYTES = 64 << 20


class CheckpointError(UserError):
    """A checkpoint cannot be written, is damaged, or is not safe to load."""


# ----------------------------------------------------------------------------- names

def new_run_dir(out_root, now: datetime | None = None) -> Path:
    """Create and return ``<out_root>/YYYYMMDD_HHMMSS`` (local time); a second run started
    within the same second gets ``_1``, ``_2``, ... (mkdir is the lock, so concurrent
    starts never share a directory)."""
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    for suffix in itertools.count():
        candidate = root / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def list_run_dirs(out_root) -> list[Path]:
    """Run directories under `out_root`, oldest first (``_10`` sorts after ``_9``)."""
    root = Path(out_root)
    if not root.is_dir():
        return []
    runs = []
    for entry in root.iterdir():
        match = _RUN_RE.match(entry.name)
        if match and entry.is_dir():
            runs.append((match.group(1), int(match.group(2) or 0), entry))
    return [entry for _, _, entry in sorted(runs)]


def checkpoint_path(run_dir, step: int, kind: str = "periodic") -> Path:
    if kind not in _PREFIX:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if int(step) < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / f"{_PREFIX[kind]}{int(step):08d}.pth"


def parse_checkpoint_name(path) -> tuple[int, str] | None:
    """(step, kind) for a checkpoint file name, None for anything else."""
    match = _NAME_RE.match(Path(path).name)
    if not match:
        return None
    return int(match.group(2)), match.group(1) or "periodic"


def _resume_order(path: Path) -> tuple[int, int]:
    step, kind = parse_checkpoint_name(path)
    return step, _RESUME_RANK[kind]


def list_checkpoints(run_dir) -> list[Path]:
    """All checkpoints of a run, oldest first: by step, then emergency < periodic < final."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if parse_checkpoint_name(p) and p.is_file()]
    return sorted(found, key=_resume_order)


def sidecar_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


# ----------------------------------------------------------------------------- safety

_SCALAR_TYPES = (str, int, float, bool, type(None))


def to_safe(obj: Any, _where: str = "state") -> Any:
    """Return `obj` rebuilt from types that `torch.load(weights_only=True)` accepts.

    numpy arrays become tensors, numpy scalars Python scalars, parameters plain tensors;
    torch.Size, torch.dtype and torch.device pass through. Anything else raises TypeError
    naming where it sits, e.g. ``state['config']['out_dir']: pathlib.PosixPath ...``.
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) is torch.Tensor:
            return obj
        if isinstance(obj, torch.nn.Parameter):
            return obj.detach()
        raise TypeError(f"{_where}: tensor subclass {type(obj).__qualname__} cannot be stored; "
                        f"convert it to a plain tensor first (e.g. .full_tensor())")
    if type(obj) in _SCALAR_TYPES or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        try:
            return torch.from_numpy(np.array(obj, copy=True))
        except TypeError as exc:
            raise TypeError(f"{_where}: numpy array of dtype {obj.dtype} cannot be stored") from exc
    if isinstance(obj, np.generic):
        return to_safe(obj.item(), _where)
    if type(obj) in (dict, OrderedDict):
        out = OrderedDict() if type(obj) is OrderedDict else {}
        for key, value in obj.items():
            safe_key = to_safe(key, f"{_where} key {key!r}")
            if not isinstance(safe_key, _SCALAR_TYPES):
                raise TypeError(f"{_where}: dictionary key {key!r} must be a str/int/float/bool/None")
            out[safe_key] = to_safe(value, f"{_where}[{key!r}]")
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict() versions, used by load_state_dict
            out._metadata = to_safe(obj._metadata, f"{_where}._metadata")
        return out
    if type(obj) in (list, tuple):
        return type(obj)(to_safe(v, f"{_where}[{i}]") for i, v in enumerate(obj))
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(f"{_where}: {kind} cannot be stored in a checkpoint (only tensors, dicts, "
                    f"lists, tuples, str, int, float, bool, None); convert it first")


def estimate_checkpoint_bytes(state: Any) -> int:
    """Bytes of tensor storage `torch.save` will write (shared storages counted once)."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, (str, bytes)):
            total += len(obj)
    return total


# ----------------------------------------------------------------------------- saving

class _HashingWriter:
    """File-like object for torch.save that hashes the bytes on their way to disk."""

    def __init__(self, f):
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self._hash.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host_tag()}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Delete temporary files left by killed saves of this host (their process is gone)."""
    host = _host_tag()
    for entry in directory.iterdir():
        match = _TEMP_RE.match(entry.name)
        if not match or match.group("host") != host:
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s left by an interrupted save", entry)
            _unlink_quietly(entry)


def _unlink_quietly(path: Path) -> bool:
    """Delete ``path``; a missing file counts as deleted. False (with a warning) on other errors."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    """Make renames/unlinks in `directory` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e9:.3g} GB"


def _no_space_error(path: Path, need: int, free: int) -> CheckpointError:
    return CheckpointError(
        f"not enough disk space to save {path.name}: need {_gb(need)}, {_gb(free)} free at "
        f"{path.parent}; free space or lower --ckpt-keep-last")


def _is_no_space(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _write_sidecar(path: Path, digest: str, size: int) -> None:
    target = sidecar_path(path)
    tmp = _temp_path(target)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"sha256": digest, "size": size}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _unlink_quietly(tmp)
        log.warning("could not write integrity record %s (%s); %s will be verified by a full load",
                    target, exc, path.name)
        return
    _fsync_dir(path.parent)


def save_checkpoint(path, state: dict) -> int:
    """Atomically write `state` (see `to_safe`) to `path` with an integrity sidecar.

    Returns the number of bytes written. Raises CheckpointError, leaving every existing
    checkpoint untouched, when the disk is (or runs) too full; TypeError when `state` holds
    something that would not load with weights_only=True.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    safe = to_safe(state)
    _remove_stale_temps(directory)
    need = int(estimate_checkpoint_bytes(safe) * (1 + _SPACE_MARGIN_FRACTION)) + _SPACE_MARGIN_BYTES
    free = shutil.disk_usage(directory).free
    if free < need:
        raise _no_space_error(path, need, free)

    tmp = _temp_path(path)
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(safe, writer)
            f.flush()
            os.fsync(f.fileno())
            on_disk = os.fstat(f.fileno()).st_size
        digest, size = writer.hexdigest(), writer.size
        if on_disk != size:  # torch.save seeked; hash what is on disk instead
            digest, size = _sha256_file(tmp), on_disk
        old_sidecar = sidecar_path(path)
        if old_sidecar.exists():  # it describes the file about to be replaced
            old_sidecar.unlink()
            _fsync_dir(directory)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if _is_no_space(exc) or (writer is not None and writer.error is not None
                                 and _is_no_space(writer.error)):
            raise _no_space_error(path, need, shutil.disk_usage(directory).free) from exc
        raise
    _fsync_dir(directory)
    _write_sidecar(path, digest, size)
    log.debug("saved %s (%d bytes)", path, size)
    return size


def link_or_copy(src, dst) -> Path:
    """Give checkpoint `src` a second name `dst` (e.g. the final copy of the last periodic
    checkpoint): a hard link when the filesystem allows, else a copy; atomic either way."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_path(dst)
    _unlink_quietly(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    old_sidecar = sidecar_path(dst)
    if old_sidecar.exists():
        old_sidecar.unlink()
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    record = _read_sidecar(src)
    if isinstance(record, dict):
        _write_sidecar(dst, record["sha256"], record["size"])
    return dst


# ----------------------------------------------------------------------------- verifying

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _read_sidecar(path: Path) -> dict | str | None:
    """The integrity record, None when absent, or a string saying why it is unusable."""
    target = sidecar_path(path)
    try:
        record = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"integrity record {target.name} unreadable ({exc})"
    if (not isinstance(record, dict) or not isinstance(record.get("sha256"), str)
            or not isinstance(record.get("size"), int)):
        return f"integrity record {target.name} malformed"
    return record


def _check_record(path: Path, record: dict) -> str | None:
    """None when `path` matches its record, else the reason it does not."""
    size = path.stat().st_size
    if size != record["size"]:
        return (f"size is {size} bytes but {record['size']} were written at save time "
                f"(truncated or overwritten)")
    if _sha256_file(path) != record["sha256"]:
        return "sha256 differs from the one recorded at save time (bytes damaged)"
    return None


def _is_weights_only_refusal(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower()


def _refusal_detail(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    return lines[0] if lines else "unsupported pickled object"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 120 and ". " in first:  # torch appends paragraphs of advice
        first = first.split(". ", 1)[0]
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def _torch_load(path: Path, map_location, mmap: bool):
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location=map_location, weights_only=True)
        raise


def verify_checkpoint(path) -> tuple[bool, str]:
    """(intact, reason). Uses the sha256 sidecar when present, else a full (mmap) load."""
    path = Path(path)
    if not path.is_file():
        return False, "no such file"
    if path.stat().st_size == 0:
        return False, "empty file (0 bytes)"
    record = _read_sidecar(path)
    if isinstance(record, dict):
        problem = _check_record(path, record) or _unsafe_globals_problem(path)
        if problem:
            return False, problem
        return True, "sha256 and size match the record written at save time"
    note = f"{record}; " if isinstance(record, str) else ""
    try:
        _torch_load(path, "cpu", mmap=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if _is_weights_only_refusal(exc):
            return False, (f"{note}contains non-weights objects ({_refusal_detail(exc)}); "
                           f"it will not be loaded")
        return False, f"{note}not loadable ({_first_line(exc)})"
    return True, f"{note}loads with weights_only=True (no checksum record, tensor bytes unchecked)"


def _unsafe_globals_problem(path: Path) -> str | None:
    """Static scan of the pickle (nothing runs, tensor data unread): the sha256 record
    proves the bytes are unchanged, not that a trusted program wrote them."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return None
    try:
        unsafe = scan(str(path))
    except Exception:  # not a zip checkpoint, or unparsable: leave it to the loader
        return None
    if unsafe:
        return f"contains non-weights objects ({', '.join(unsafe[:3])}); it will not be loaded"
    return None


def _earlier_hint(path: Path) -> str:
    parsed = parse_checkpoint_name(path)
    others = [p for p in list_checkpoints(path.parent) if p.name != path.name]
    if parsed:
        others = [p for p in others if parse_checkpoint_name(p)[0] <= parsed[0]]
    if others:
        return f"; resume from an earlier checkpoint, e.g. --resume {others[-1]}"
    return "; resume from an earlier checkpoint"


def load_checkpoint(path, map_location="cpu", *, verify: bool = True, mmap: bool = False) -> dict:
    """Verify `path` against its integrity record (when present) and load it with
    ``weights_only=True``. `mmap=True` maps tensor data instead of reading it (inspection
    of huge files). Raises CheckpointError for missing, damaged or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    checksum_ok = False
    if verify:
        record = _read_sidecar(path)
        if isinstance(record, dict):
            problem = _check_record(path, record)
            if problem:
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}{_earlier_hint(path)}")
            checksum_ok = True
        elif isinstance(record, str):
            log.warning("%s; verifying %s by loading it", record, path)
    try:
        state = _torch_load(path, map_location, mmap)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if _is_weights_only_refusal(exc):
            raise CheckpointError(
                f"{path} contains non-weights objects ({_refusal_detail(exc)}) and will not be "
                f"loaded; only load checkpoints written by dinox or another trusted tool") from None
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        if checksum_ok:
            raise CheckpointError(f"could not load {path} although its checksum matches: "
                                  f"{_first_line(exc)}") from exc
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint "
                              f"({_first_line(exc)}){_earlier_hint(path)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dictionary")
    return state


# ----------------------------------------------------------------------------- rotation / resume

def _looks_intact(path: Path) -> bool:
    """Cheap check (no hashing): the sidecar exists and the size matches."""
    record = _read_sidecar(path)
    try:
        return isinstance(record, dict) and path.stat().st_size == record["size"]
    except OSError:
        return False


def rotate_checkpoints(run_dir, keep_last: int, milestone_every: int = 0) -> list[Path]:
    """Delete the oldest periodic checkpoints (and their sidecars) beyond the newest
    `keep_last` (at least 1). Milestones (step % milestone_every == 0) and final/emergency
    checkpoints are never deleted. If none of the kept ones looks intact, the newest older
    one that does is spared too. Returns the deleted checkpoint paths."""
    run_dir = Path(run_dir)
    keep_last = max(1, int(keep_last))
    rotating = []
    for path in list_checkpoints(run_dir):
        step, kind = parse_checkpoint_name(path)
        if kind != "periodic" or (milestone_every > 0 and step % milestone_every == 0):
            continue
        rotating.append(path)
    doomed, kept = rotating[:-keep_last], rotating[-keep_last:]
    if doomed and not any(_looks_intact(p) for p in kept):
        for path in reversed(doomed):
            if _looks_intact(path):
                log.warning("keeping %s: the newer checkpoints have no matching integrity record",
                            path.name)
                doomed.remove(path)
                break
    deleted = []
    for path in doomed:
        if not _unlink_quietly(path):
            continue
        _unlink_quietly(sidecar_path(path))
        deleted.append(path)
        log.debug("rotated out %s", path.name)
    for orphan in run_dir.glob(f"checkpoint_*.pth{SIDECAR_SUFFIX}"):
        if not orphan.with_name(orphan.name[: -len(SIDECAR_SUFFIX)]).exists():
            _unlink_quietly(orphan)
    _remove_stale_temps(run_dir)
    if deleted:
        _fsync_dir(run_dir)
    return deleted


def find_resume_checkpoint(out_root) -> Path | None:
    """The newest intact checkpoint of the newest run under `out_root` that has one.

    Newest = highest step; at equal step final > periodic > emergency. Emergency
    checkpoints are candidates: they hold the state before the anomalous update (or at an
    interruption), so they resume exactly. Damaged checkpoints are skipped with a warning
    and the search falls back to older checkpoints, then to older runs.
    """
    for run in reversed(list_run_dirs(out_root)):
        checkpoints = list_checkpoints(run)
        if not checkpoints:
            continue
        for path in reversed(checkpoints):
            intact, reason = verify_checkpoint(path)
            if intact:
                if parse_checkpoint_name(path)[1] == "emergency":
                    log.warning("resuming from emergency checkpoint %s (saved after an anomaly "
                                "or interruption)", path)
                return path
            log.warning("skipping damaged checkpoint %s: %s", path, reason)
        log.warning("run %s has no intact checkpoint; looking at older runs", run)
    return None
