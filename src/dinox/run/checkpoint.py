"""Checkpoint store: run directories, atomic saves, integrity records, rotation, resume.

Layout of a run directory::

    <out_root>/YYYYMMDD_HHMMSS[_N]/
        checkpoint_%08d.pth                  periodic (rotated)
        checkpoint_final_%08d.pth            end of training (never rotated)
        checkpoint_emergency_%08d.pth        anomaly / failed step / halt (the newest 3 kept)
        <checkpoint name>.sha256             integrity record, JSON {"sha256", "size"}
        checkpoint_[final_|emergency_]%08d.dcp/   the same, sharded (FSDP runs; dinox.run.sharded)
        train.lock                           while a process trains there: its pid, host, start

Saving writes to a hidden temporary file (``.<name>.<host>.<pid>.tmp``) in the same
directory, fsyncs it, renames it over the final name and fsyncs the directory, so a final
name only ever holds a complete file. The sha256 of the bytes written is computed while
writing and stored in the sidecar afterwards (also atomically). Verification then checks
what the bytes hold: every floating tensor finite and of a plausible magnitude (flipped
exponent bits turn a weight into 1e36), and, where the caller names them, the required
top-level entries. A checkpoint whose sidecar is missing (crash between the two renames,
or a file copied without it) gets these content checks after a full `torch.load`; only
damage that keeps values finite and small goes unnoticed then.

`lock_run_dir` gives one process at a time a run folder (a lock file under a POSIX record
lock, which the kernel drops when its process dies; where a filesystem has no record locks,
the file alone, stale when its process id is dead).

Everything is loaded with ``weights_only=True``: a file that carries pickled code is refused
before anything in it runs.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinox.errors import UserError
from dinox.run import sharded as sharded_store
from dinox.run.distributed import local
from dinox.run.files import atomic_write_text, host_tag, pid_alive, temp_path, unlink_quietly
from dinox.run.folder_lock import FolderLock, FolderLockedError, holder_text, holds_lock, lock_holder, take_lock
from dinox.run.rng import capture_rng_state, restore_rng_state
from dinox.run.torch_file import (NotATorchFile, first_line, is_weights_only_refusal, load_weights_only,
                                  refusal_detail, zip_crc_problem)

__all__ = [
    "KINDS",
    "CheckpointError",
    "RunLockedError",
    "capture_rng_state",
    "checkpoint_path",
    "checkpoint_saved_time",
    "content_problem",
    "estimate_checkpoint_bytes",
    "file_sha256",
    "find_resume_checkpoint",
    "free_space",
    "nearest_existing",
    "is_checkpoint_path",
    "not_a_checkpoint",
    "is_run_dir_name",
    "link_or_copy",
    "list_checkpoints",
    "list_run_dirs",
    "load_checkpoint",
    "load_network",
    "lock_run_dir",
    "network_mismatch",
    "new_run_dir",
    "parse_checkpoint_name",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "set_aside_damaged_after",
    "load_sharded_into",
    "sidecar_path",
    "space_needed",
    "step_problem",
    "to_safe",
    "verify_checkpoint",
]

log = logging.getLogger("dinox.checkpoint")

KINDS = ("periodic", "final", "emergency")
_PREFIX = {"periodic": "checkpoint_", "final": "checkpoint_final_", "emergency": "checkpoint_emergency_"}
_NAME_RE = re.compile(r"^checkpoint_(?:(final|emergency)_)?(\d{8,})\.(?:pth|dcp)$")
_RUN_RE = re.compile(r"^(\d{8}_\d{6})(?:_(\d+))?$")
_TEMP_RE = re.compile(r"^\.(?:checkpoint_.*|train\.lock)\.(?P<host>[^.]*)\.(?P<pid>\d+)\.tmp$")
# At equal step: a final checkpoint is the cleanest state, an emergency one the least usual.
_RESUME_RANK = {"emergency": 0, "periodic": 1, "final": 2}
SIDECAR_SUFFIX = ".sha256"
_SPACE_MARGIN_FRACTION = 0.02
_SPACE_MARGIN_BYTES = 64 << 20
# No weight, moment, centre or loss scale of a training run comes near this; flipped
# exponent bits in an fp32 value easily do (a weight of 2e36).
IMPLAUSIBLE_MAGNITUDE = 1e30
LOCK_NAME = "train.lock"


class CheckpointError(UserError):
    """A checkpoint cannot be written, is damaged, or is not safe to load."""


class NoSpaceError(CheckpointError):
    """The disk has no room for the checkpoint; every existing one is untouched."""


# ----------------------------------------------------------------------------- names

# The runs folder and its parents that new_run_dir created in this process, so that a run
# that never started leaves no empty data/runs/ behind (remove_made_folders).
_folders_made: set[Path] = set()


def remove_made_folders(run_dir: Path) -> None:
    """Remove the folders above a removed run folder that new_run_dir created, deepest
    first, while they are empty."""
    for folder in run_dir.parents:
        if folder not in _folders_made:
            return
        try:
            folder.rmdir()
        except OSError:  # not empty: another run, or the user's files
            return
        _folders_made.discard(folder)


def new_run_dir(out_root, now: datetime | None = None) -> Path:
    """Create and return ``<out_root>/YYYYMMDD_HHMMSS`` (local time); a second run started
    within the same second gets ``_1``, ``_2``, ... (mkdir is the lock, so concurrent
    starts never share a directory)."""
    root = Path(out_root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder; give a folder for the runs "
                        f"(it is created when missing)")
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the runs folder {root} ({exc.strerror or exc}); "
                        f"give an --out on a writable disk") from None
    _folders_made.update(missing)
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    for suffix in itertools.count():
        candidate = root / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create a run folder in {root} ({exc.strerror or exc}); "
                            f"give an --out on a writable disk") from None
        return candidate
    raise AssertionError("unreachable")


def is_run_dir_name(name: str) -> bool:
    """Whether `name` is a run folder name made by `new_run_dir`."""
    return _RUN_RE.match(name) is not None


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


def checkpoint_path(run_dir, step: int, kind: str = "periodic", *, sharded: bool = False) -> Path:
    """The file (or, `sharded`, the DCP directory) name of a checkpoint."""
    if kind not in _PREFIX:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if int(step) < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / f"{_PREFIX[kind]}{int(step):08d}{sharded_store.SUFFIX if sharded else '.pth'}"


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
    found = [p for p in run_dir.iterdir()
             if parse_checkpoint_name(p) and (p.is_dir() if sharded_store.is_sharded(p) else p.is_file())]
    return sorted(found, key=_resume_order)


def run_folder_signs(folder) -> list[str]:
    """The names in `folder` that only a training run writes: its checkpoints (oldest first),
    its log (dinox.run.logging) and its metrics (dinox.observe.metrics). Empty for any other
    folder, so that commands handed a run folder where they want weights or an export folder
    can say so instead of reading the run's config.json as something else."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p.name for p in list_checkpoints(folder)] + [n for n in ("train.log", "metrics.jsonl")
                                                         if (folder / n).is_file()]


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
    """Bytes of tensor storage `torch.save` will write (shared storages counted once); of an
    FSDP2 shard (DTensor), this rank's part."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = local(obj).untyped_storage()
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


def _remove_stale_temps(directory: Path) -> None:
    """Delete temporary files left by killed saves: those of this host whose process is gone,
    and, where this process holds the folder's run lock, every other process's checkpoint
    temporaries, of any host: only the holder saves there, so they are debris of a save
    that a kill interrupted (SIGKILL at the end of a scheduler's grace period, a job then
    requeued onto another node, which would otherwise keep a ViT-Giant's 20 GB for good).
    Another process's lock temporaries stay: a launch on another node may be trying the lock."""
    host, held = host_tag(), holds_lock(directory / LOCK_NAME)
    for entry in directory.iterdir():
        match = _TEMP_RE.match(entry.name)
        if not match:
            continue
        pid, own_host = int(match.group("pid")), match.group("host") == host
        if own_host and pid == os.getpid():
            continue
        if held and not entry.name.startswith(f".{LOCK_NAME}."):
            stale = True
        else:
            stale = own_host and not pid_alive(pid)
        if stale:
            log.info("removing %s left by an interrupted save", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                unlink_quietly(entry)


_fsync_dir = sharded_store.fsync_path  # renames and unlinks in a directory made durable


def space_needed(tensor_bytes: int) -> int:
    """Free bytes a save of `tensor_bytes` of tensor storage asks for: the file plus a margin
    for pickle framing and the filesystem."""
    return int(tensor_bytes * (1 + _SPACE_MARGIN_FRACTION)) + _SPACE_MARGIN_BYTES


def nearest_existing(path) -> Path:
    """`path` made absolute, or its nearest existing parent (a folder not created yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent, for a
    folder not created yet)."""
    return shutil.disk_usage(nearest_existing(path)).free


def disk_size_text(n: float) -> str:
    """Bytes as a disk figure (decimal GB or MB, as disks are sold and `df -H` prints them)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _no_space_error(path: Path, need: int, free: int) -> NoSpaceError:
    # Fewer kept checkpoints only help when older periodic ones take the space.
    rotating = [p for p in list_checkpoints(path.parent) if parse_checkpoint_name(p)[1] == "periodic"]
    advice = ("free space or lower --ckpt-keep-last" if rotating
              else "free space there or give --out a folder on a disk with room")
    return NoSpaceError(
        f"not enough disk space to save {path.name}: need {disk_size_text(need)}, {disk_size_text(free)} free at "
        f"{path.parent}; {advice}")


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
    try:
        atomic_write_text(target, json.dumps({"sha256": digest, "size": size}))
    except OSError as exc:
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
    need = space_needed(estimate_checkpoint_bytes(safe))
    free = shutil.disk_usage(directory).free
    if free < need:
        raise _no_space_error(path, need, free)

    tmp = temp_path(path)
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
        unlink_quietly(tmp)
        if _is_no_space(exc) or (writer is not None and writer.error is not None
                                 and _is_no_space(writer.error)):
            raise _no_space_error(path, need, shutil.disk_usage(directory).free) from exc
        raise
    _fsync_dir(directory)
    _write_sidecar(path, digest, size)
    log.debug("saved %s (%d bytes)", path, size)
    return size


def save_sharded_checkpoint(path, tensors: dict, meta: dict, *, rank: int, gather, barrier, broadcast,
                            make_room=None) -> int:
    """Collective: write a sharded (DCP) checkpoint directory at `path`, atomically (see
    `dinox.run.sharded`). `tensors` holds this rank's (sharded) state dicts, `meta` the rest
    (used on rank 0). Where the disk lacks room, rank 0 first calls `make_room(error)`, which
    returns what it deleted (nothing: the save fails). Returns the bytes written (0 off rank 0)."""
    path = Path(path)
    tmp = None
    shard_bytes = gather(estimate_checkpoint_bytes(tensors))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path.parent)
        need = space_needed(sum(shard_bytes))
        free = shutil.disk_usage(path.parent).free
        if free < need and make_room is not None and make_room(_no_space_error(path, need, free)):
            free = shutil.disk_usage(path.parent).free
        tmp = str(temp_path(path)) if free >= need else None
        if tmp is None:
            broadcast(None)
            raise _no_space_error(path, need, free)
    tmp = broadcast(tmp)
    if tmp is None:
        raise CheckpointError(f"not enough disk space for the checkpoint {path} (see rank 0's log)")

    def save_meta(file: Path, obj: dict) -> None:
        with open(file, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    try:
        return sharded_store.write(path, Path(tmp), tensors, to_safe(meta) if rank == 0 else {}, rank=rank,
                                   save_meta=save_meta, gather=gather, barrier=barrier)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_sharded_into(path, template: dict) -> None:
    """Fill `template` (state dicts of live, possibly sharded modules) from a sharded checkpoint."""
    sharded_store.load_into(Path(path), template)


def link_or_copy(src, dst) -> Path:
    """Give checkpoint `src` a second name `dst` (e.g. the final copy of the last periodic
    checkpoint): a hard link when the filesystem allows, else a copy; atomic either way."""
    src, dst = Path(src), Path(dst)
    tmp = temp_path(dst)
    if src.is_dir():
        sharded_store.link_dir(src, dst, tmp)
        return dst
    unlink_quietly(tmp)
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

def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (read in chunks); of a sharded checkpoint, its manifest's
    (which records every file's sha256)."""
    path = Path(path)
    return _sha256_file(path / sharded_store.MANIFEST if path.is_dir() else path)


_sha256_file = sharded_store.sha256_file


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


WHOLE_FILE = "every member of the file passes the zip's CRC-32"


class RecordMismatch(str):
    """`_check_record`'s reason for a file that differs from its record yet is no damage
    (WHOLE_FILE): told apart by its type, so callers word their verdict and advice."""


def _check_record(path: Path, record: dict) -> str | None:
    """None when `path` matches its record, else the reason it does not. A file that differs
    from its record yet is a whole zip whose every member passes its CRC-32 was not damaged on
    disk in its data: the record was edited, another checkpoint was copied over this one, or a
    byte of the zip's headers or padding changed; the reason says so, and how to use the file
    anyway (it stays refused: which one is right is the user's call)."""
    size = path.stat().st_size
    if size != record["size"]:
        problem = f"size is {size} bytes but {record['size']} were written at save time"
    elif _sha256_file(path) != record["sha256"]:
        problem = "sha256 differs from the one recorded at save time"
    else:
        return None
    if zipfile.is_zipfile(path) and zip_crc_problem(path) is None:
        record_name = sidecar_path(path).name
        return RecordMismatch(
            f"{problem}, yet {WHOLE_FILE} (its tensors are as some save wrote them): its record {record_name} was "
            f"edited, another checkpoint was copied over this one, or bytes outside the data changed; if this file "
            f"is the one you want, delete {record_name} (the file is then checked by its CRCs and contents)")
    return f"{problem} ({'truncated or overwritten' if size != record['size'] else 'bytes damaged'})"


def _tensor_problem(t: torch.Tensor, where: str) -> str | None:
    if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        lo, hi = torch.aminmax(t.detach())
    except RuntimeError:  # a dtype without an aminmax kernel on this device
        lo, hi = torch.aminmax(t.detach().float())
    lo, hi = float(lo), float(hi)  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"non-finite value (NaN or Inf) in {where}"
    extreme = hi if hi >= -lo else lo
    if abs(extreme) > IMPLAUSIBLE_MAGNITUDE:
        return (f"implausible value {extreme:.3g} in {where} (damaged bytes, or a run that had diverged "
                f"before it was saved: no weight or optimizer moment of a run that learns is that large)")
    return None


def step_problem(state: dict) -> str | None:
    """Why a training checkpoint's "step" is not a step count (dinox writes a Python int), or None."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"records step {step!r}, not a whole number of optimizer steps >= 0"
    return None


def content_problem(state: Any, required: tuple[str, ...] | list[str] = ()) -> str | None:
    """None when `state` holds what a checkpoint may hold, else the first reason it does not:
    a required top-level entry missing, or a floating tensor anywhere that is non-finite or
    larger than `IMPLAUSIBLE_MAGNITUDE` in magnitude.

    This is what can be checked without a checksum record; with one it still matters, since
    a run that produced NaN weights saves them with a valid record."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a checkpoint dictionary"
    missing = [key for key in required if key not in state]
    if missing:
        return f"lacks the entries {', '.join(missing)} (incomplete, or not a training checkpoint)"
    problem = step_problem(state) if "step" in required else None
    if problem:
        return problem
    stack: list[tuple[Any, str]] = [(state[key], str(key)) for key in reversed(list(state))]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, torch.Tensor):
            problem = _tensor_problem(obj, where)
            if problem:
                return problem
        elif isinstance(obj, dict):
            stack.extend((v, f"{where}[{k!r}]") for k, v in reversed(list(obj.items())))
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(obj))))
    return None


def verify_checkpoint(path, required: tuple[str, ...] | list[str] = ()) -> tuple[bool, str]:
    """(intact, reason). The sha256 record when present (else a full mmap load shows whether
    the file loads), then the content checks of `content_problem` in either case."""
    path = Path(path)
    if path.is_dir() and sharded_store.is_sharded(path):
        return _verify_sharded(path, required)
    if not path.exists():
        return False, "no such file"
    problem = not_a_checkpoint(path)
    if problem:
        return False, problem
    if path.stat().st_size == 0:
        return False, "empty file (0 bytes)"
    record = _read_sidecar(path)
    if isinstance(record, dict):
        problem = _check_record(path, record) or _unsafe_globals_problem(path)
        if problem:
            return False, problem
        note, how = "", "sha256 and size match the record written at save time"
    else:
        note = f"{record}; " if isinstance(record, str) else ""
        problem = zip_crc_problem(path)
        if problem:
            return False, f"{note}{problem}"
        how = ("the zip's CRC-32 of every member matches and it loads with weights_only=True (no "
               "checksum record; tensors checked for non-finite and implausible values)")
    try:
        state = load_weights_only(path, "cpu", mmap=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if is_weights_only_refusal(exc):
            return False, (f"{note}contains non-weights objects ({refusal_detail(exc)}); "
                           f"it will not be loaded")
        if isinstance(record, dict):
            return False, f"not loadable although its checksum matches ({first_line(exc)})"
        return False, f"{note}{_unloadable(path, exc)}"
    problem = content_problem(state, required)
    del state
    if problem:
        return False, f"{note}{problem}"
    return True, f"{note}{how}"


def _verify_sharded(path: Path, required, *, hashes: bool = True) -> tuple[bool, str]:
    manifest = sharded_store.read_manifest(path)
    if isinstance(manifest, str):
        return False, manifest
    problem = sharded_store.check_files(path, manifest, hashes=hashes)
    if problem:
        return False, problem
    try:
        meta = load_weights_only(path / sharded_store.META, "cpu", mmap=True)
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        if is_weights_only_refusal(exc):
            return False, f"contains non-weights objects ({refusal_detail(exc)}); it will not be loaded"
        if isinstance(exc, NotATorchFile):
            return False, f"{sharded_store.META} {exc}"
        return False, f"{sharded_store.META} not loadable ({first_line(exc)})"
    entries = set(manifest.get("entries", []))
    problem = content_problem(meta, [key for key in required if key not in entries])
    if problem:
        return False, problem
    return True, (f"sharded checkpoint of {manifest.get('world_size', '?')} ranks: every file's sha256 and size "
                  f"match the manifest written at save time")


def _load_sharded(path: Path, *, verify: bool, tensors: bool, required) -> dict:
    if verify:
        intact, reason = _verify_sharded(path, required)
        if not intact:
            raise CheckpointError(f"checkpoint {path} is damaged: {reason}{_earlier_hint(path)}")
    try:
        state = load_weights_only(path / sharded_store.META, "cpu", mmap=False)
        if tensors:
            state.update(sharded_store.load_full(path))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if is_weights_only_refusal(exc):
            raise CheckpointError(f"{path} contains non-weights objects ({refusal_detail(exc)}) and will not "
                                  f"be loaded") from None
        what = f"{sharded_store.META} {exc}" if isinstance(exc, NotATorchFile) else _unloadable(path, exc)
        raise CheckpointError(f"checkpoint {path} {what}{_earlier_hint(path)}") from exc
    state["sharded_path"] = str(path)
    if verify and tensors:
        problem = content_problem(state, required)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}{_earlier_hint(path)}")
    return state


EXPORT_MARKERS = ("model.safetensors", "backbone.safetensors", "backbone.pth", "ct_preprocessing.json")


def network_mismatch(module: torch.nn.Module, state_dict) -> str | None:
    """How a saved state dict does not fit a module (entries missing, unexpected, or of
    another shape), or None; compared by name and shape only, so `module` may live on the
    meta device. The module's own load_state_dict would say it in a multi-line traceback."""
    if not isinstance(state_dict, dict):
        return f"a {type(state_dict).__name__} where the weights should be"
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} for {tuple(v.shape)}" for k, v in own.items()
              if isinstance(state_dict.get(k), torch.Tensor) and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = [f"{what} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if names]
    return "; ".join(parts) or None


def load_network(module: torch.nn.Module, state_dict, path, name: str) -> None:
    """`module.load_state_dict(state_dict)` for the network `name` of checkpoint `path` (None:
    the caller names the file), a mismatch answered in one line (an edited file, or one
    whose configuration does not describe its weights)."""
    problem = network_mismatch(module, state_dict)
    if problem:
        raise CheckpointError(f"{f'checkpoint {path}: ' if path else ''}its {name} network does not fit the model "
                              f"its configuration describes ({problem}); it was edited or written by another "
                              f"program: use another checkpoint of the run")
    module.load_state_dict(state_dict)


def not_a_checkpoint(path) -> str | None:
    """None for a checkpoint file or a sharded checkpoint folder; else what `path` is
    instead, phrased to follow the path in a message ("... is a folder, not ..."). Decided
    by names alone, so the check costs nothing before a checkpoint of many GB is read."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if _is_export_file(path) or (path.is_dir() and any((path / m).is_file() for m in EXPORT_MARKERS)):
        return ("is a weights file (backbone weights, as `dinox export` writes), not a training checkpoint; give "
                "a checkpoint_*.pth that `dinox train` wrote (weights that record their architecture start a "
                "run with --init-from)")
    if is_checkpoint_path(path):
        return None
    if path.is_dir():
        inside = sorted(path.glob("checkpoint_*.pth")) + sorted(path.glob("*/checkpoint_*.pth"))
        hint = f" such as {inside[-1]}" if inside else " (checkpoint_*.pth in a run folder)"
        return f"is a folder, not a checkpoint; give a checkpoint file{hint}"
    return "is not a checkpoint file"


def _is_export_file(path: Path) -> bool:
    """A weights file that `dinox export` writes (safetensors, or a hub backbone.pth with its
    .json sidecar), which holds a backbone, not a training state."""
    return path.is_file() and (path.suffix == ".safetensors"
                               or (path.name == "backbone.pth" and path.with_suffix(".json").is_file()))


def is_checkpoint_path(path) -> bool:
    """A checkpoint file, or a sharded checkpoint directory."""
    path = Path(path)
    return path.is_dir() if sharded_store.is_sharded(path) else path.is_file()


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


def _unloadable(path: Path, exc: BaseException) -> str:
    """Why a checkpoint file failed to load, phrased to follow its path: what its bytes say
    it is when they are not a torch.save file, else torch's own reason."""
    if isinstance(exc, NotATorchFile):
        return str(exc)
    return f"is damaged or not a checkpoint ({first_line(exc)})"


def _earlier_hint(path: Path) -> str:
    """For a damaged file of a run (named like its checkpoints), the advice to use an
    earlier checkpoint of that run; for any other file, nothing."""
    parsed = parse_checkpoint_name(path)
    if parsed is None:
        return ""
    others = [p for p in list_checkpoints(path.parent)
              if p.name != path.name and parse_checkpoint_name(p)[0] <= parsed[0]]
    if others:
        return f"; use an earlier checkpoint of the run instead, e.g. {others[-1]}"
    return "; use an earlier checkpoint of the run instead, or a copy of this one"


def load_checkpoint(path, map_location="cpu", *, verify: bool = True, mmap: bool = False,
                    required: tuple[str, ...] | list[str] = (), tensors: bool = True) -> dict:
    """Verify `path` against its integrity record (when present) and load it with
    ``weights_only=True``; with `verify`, the loaded state must also pass `content_problem`
    (the `required` entries, finite and plausible tensors). `mmap=True` maps tensor data
    instead of reading it (inspection of huge files). Raises CheckpointError for missing,
    damaged or unsafe files.

    A sharded (DCP) checkpoint loads whole in this process, the same dict as a file's plus
    "sharded_path" (AdamW's state then keyed by parameter name);
    `tensors=False` reads everything but the DCP entries (resuming reshards them into the
    live modules instead)."""
    path = Path(path)
    if path.is_dir() and sharded_store.is_sharded(path):
        return _load_sharded(path, verify=verify, tensors=tensors, required=required)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    checksum_ok = False
    if verify:
        record = _read_sidecar(path)
        if isinstance(record, dict):
            problem = _check_record(path, record)
            if problem:
                verdict = "does not match its integrity record" if isinstance(problem, RecordMismatch) else "is damaged"
                raise CheckpointError(f"checkpoint {path} {verdict}: {problem}{_earlier_hint(path)}")
            checksum_ok = True
        elif isinstance(record, str):
            log.warning("%s; verifying %s by its zip CRCs and by loading it", record, path)
        if not checksum_ok:
            problem = zip_crc_problem(path)
            if problem:
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}{_earlier_hint(path)}")
    try:
        state = load_weights_only(path, map_location, mmap)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if is_weights_only_refusal(exc):
            raise CheckpointError(
                f"{path} contains non-weights objects ({refusal_detail(exc)}) and will not be "
                f"loaded; only load checkpoints written by dinox or another trusted tool") from None
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        if checksum_ok:
            raise CheckpointError(f"could not load {path} although its checksum matches: "
                                  f"{first_line(exc)}") from exc
        raise CheckpointError(f"checkpoint {path} {_unloadable(path, exc)}{_earlier_hint(path)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dictionary")
    if verify:
        problem = content_problem(state, required)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}{_earlier_hint(path)}")
    return state


# ----------------------------------------------------------------------------- rotation / resume

def _looks_intact(path: Path) -> bool:
    """Cheap check (no hashing): the sidecar exists and the size matches."""
    if path.is_dir():
        manifest = sharded_store.read_manifest(path)
        return isinstance(manifest, dict) and sharded_store.check_files(path, manifest, hashes=False) is None
    record = _read_sidecar(path)
    try:
        return isinstance(record, dict) and path.stat().st_size == record["size"]
    except OSError:
        return False


def rotate_checkpoints(run_dir, keep_last: int, milestone_every: int = 0, kind: str = "periodic") -> list[Path]:
    """Delete the oldest checkpoints of `kind` (periodic or emergency; and their sidecars)
    beyond the newest `keep_last` (at least 1). Milestones (step % milestone_every == 0) and
    final checkpoints are never deleted. If none of the kept ones looks intact, the newest
    older one that does is spared too. Returns the deleted checkpoint paths."""
    run_dir = Path(run_dir)
    keep_last = max(1, int(keep_last))
    rotating = []
    for path in list_checkpoints(run_dir):
        step, its_kind = parse_checkpoint_name(path)
        if its_kind != kind or (milestone_every > 0 and step % milestone_every == 0):
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
        if path.is_dir():
            if not sharded_store.remove_dir(path, temp_path(path)):
                continue
        elif not unlink_quietly(path):
            continue
        unlink_quietly(sidecar_path(path))
        deleted.append(path)
        log.debug("rotated out %s", path.name)
    for orphan in run_dir.glob(f"checkpoint_*.pth{SIDECAR_SUFFIX}"):
        if not orphan.with_name(orphan.name[: -len(SIDECAR_SUFFIX)]).exists():
            unlink_quietly(orphan)
    _remove_stale_temps(run_dir)
    if deleted:
        _fsync_dir(run_dir)
    return deleted


def checkpoint_saved_time(path) -> float:
    """When a checkpoint was saved: its file's modification time (the atomic rename keeps
    the time the bytes were written); -inf when it cannot be read."""
    path = Path(path)
    try:
        return (path / sharded_store.MANIFEST if path.is_dir() else path).stat().st_mtime
    except OSError:
        return float("-inf")


def _runs_by_last_save(out_root) -> list[Path]:
    """Run folders, the one saved into most recently first.

    Folder names are local start times: after a time-zone or clock change, or for a branch
    started from an old checkpoint, they do not say which run holds the latest work; the
    checkpoints' own save times do. Equal times fall back to the name order."""
    runs = list_run_dirs(out_root)
    last = {run: max((checkpoint_saved_time(p) for p in list_checkpoints(run)), default=float("-inf"))
            for run in runs}
    order = {run: i for i, run in enumerate(runs)}
    return sorted(runs, key=lambda run: (last[run], order[run]), reverse=True)


def latest_run_never_saved(out_root) -> Path | None:
    """The run folder under `out_root` that was written to last, where it holds no checkpoint
    while an older run does (else None). `--resume auto` must not continue that older run: it
    is another experiment's, or this one's earlier life, and the latest launch's flags would be
    applied to it as changes (or, were it finished at the same --max-steps, nothing would
    train). The folder's own time counts its files' creation (config.json, a lock, a save)."""
    runs = list_run_dirs(out_root)

    def last_write(run: Path) -> float:
        try:
            folder = run.stat().st_mtime
        except OSError:
            folder = float("-inf")
        return max([folder, *(checkpoint_saved_time(p) for p in list_checkpoints(run))])

    if not runs:
        return None
    latest = max(runs, key=last_write)
    if list_checkpoints(latest) or not any(list_checkpoints(run) for run in runs):
        return None
    return latest


def find_resume_checkpoint(out_root, required: tuple[str, ...] | list[str] = ()) -> Path | None:
    """The newest intact checkpoint of the run under `out_root` saved into last.

    Within a run, newest = highest step; at equal step final > periodic > emergency.
    Emergency checkpoints are candidates: they hold the state before the anomalous update
    (or at an interruption), so they resume exactly, unless they fail the content checks
    (non-finite weights, `required` entries). Damaged checkpoints are skipped with a warning
    and the search falls back to older checkpoints, then to other runs.
    """
    for run in _runs_by_last_save(out_root):
        checkpoints = list_checkpoints(run)
        if not checkpoints:
            continue
        for path in reversed(checkpoints):
            intact, reason = verify_checkpoint(path, required)
            if intact:
                if parse_checkpoint_name(path)[1] == "emergency":
                    log.warning("resuming from emergency checkpoint %s (saved after an anomaly "
                                "or interruption)", path)
                return path
            log.warning("skipping damaged checkpoint %s: %s", path, reason)
        log.warning("run %s has no intact checkpoint; looking at older runs", run)
    return None


def set_aside_damaged_after(chosen) -> list[Path]:
    """Rename the damaged checkpoints newer than `chosen` in its run folder (those `--resume
    auto` skipped) to ``<name>.damaged``: kept for inspection, but no longer listed, rotated,
    resumed or reported as the run's checkpoints. Call with the run folder locked. Returns
    the new paths."""
    chosen = Path(chosen)
    names = [p.name for p in list_checkpoints(chosen.parent)]
    if chosen.name not in names:
        return []
    moved = []
    for name in names[names.index(chosen.name) + 1:]:
        path = chosen.parent / name
        intact, reason = verify_checkpoint(path)
        if intact:
            continue
        target = path.with_name(path.name + ".damaged")
        try:
            os.replace(path, target)
            if sidecar_path(path).exists():
                os.replace(sidecar_path(path), target.with_name(target.name + SIDECAR_SUFFIX))
        except OSError as exc:
            log.warning("could not set aside damaged checkpoint %s: %s", path, exc)
            continue
        if isinstance(reason, RecordMismatch):   # not damage: the advice must name the files as they are now
            log.warning("set aside checkpoint %s as %s: it does not match its integrity record, yet %s (an "
                        "edited record, or another checkpoint copied over it); if it is the one you want, rename "
                        "it back to %s, delete %s and resume from it", path.name, target.name, WHOLE_FILE,
                        path.name, target.name + SIDECAR_SUFFIX)
        else:
            log.warning("set aside damaged checkpoint %s as %s (%s); delete it once inspected", path.name,
                        target.name, reason)
        moved.append(target)
    if moved:
        _fsync_dir(chosen.parent)
    return moved


# ----------------------------------------------------------------------------- run folder lock

RunLockedError = FolderLockedError


def _locked_message(run_dir: Path, path: Path, holder: dict) -> str:
    return (f"run folder {run_dir} is in use by {holder_text(holder)}; wait for that run to end or stop it, or "
            f"train into another --out; if that process no longer exists, delete {path}")


def run_dir_holder(run_dir) -> dict | None:
    """The live process holding `run_dir` (its pid, host and start), or None; a stale lock
    is cleared on the way, as `lock_run_dir` would."""
    return lock_holder(Path(run_dir) / LOCK_NAME)


def lock_run_dir(run_dir) -> FolderLock:
    """Hold `run_dir` for this process (`folder_lock.take_lock` on its `train.lock`), or raise
    RunLockedError naming the live holder: two processes continuing one folder would
    overwrite each other's checkpoints, metrics and config.json."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        _remove_stale_temps(run_dir)
        lock = take_lock(path, lambda holder: _locked_message(run_dir, path, holder))
        with contextlib.suppress(OSError):
            _remove_stale_temps(run_dir)   # held now: other hosts' debris too, before the first save
        return lock
    except OSError as exc:
        raise CheckpointError(f"cannot lock the run folder {run_dir} ({exc.strerror or exc}); "
                              f"check that it is writable") from None
