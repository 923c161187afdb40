"""Sharded checkpoints: a directory written by every rank with torch.distributed.checkpoint.

Layout of ``checkpoint_[final_|emergency_]%08d.dcp/``::

    .metadata, __<rank>_<n>.distcp    DCP: the networks, the centres and the AdamW state, each
                                      rank writing its own shards (FSDP2 DTensors)
    meta.pt                           everything else (step, configuration, RNG states of
                                      every rank, data position, ...), weights_only-loadable
    manifest.json                     written last: format, step, the entries DCP holds, and
                                      the size and sha256 of every other file

Atomicity: the ranks write into a hidden ``.<name>.<host>.<pid>.tmp`` directory (the pid of
rank 0); rank 0 writes the manifest after every rank's shards are on disk and hashed, then
renames the directory to its final name. A final name therefore only ever holds a
complete checkpoint, and a kill at any moment leaves at most a hidden temporary directory
(removed by the next save once its process is gone). DCP reshards on load: a checkpoint
written by N ranks loads on M ranks, or into a plain module in a single process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path


log = logging.getLogger("dinox.checkpoint")

SUFFIX = ".dcp"
MANIFEST = "manifest.json"
META = "meta.pt"
_CHUNK = 16 << 20


def is_sharded(path) -> bool:
    return Path(path).suffix == SUFFIX


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks into one buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Make a file's bytes, or a directory's renames and unlinks, durable (best effort: some
    filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _records(directory: Path, names) -> dict[str, dict]:
    out = {}
    for name in names:
        path = directory / name
        fsync_path(path)
        out[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def write(path: Path, tmp: Path, tensors: dict, meta: dict, *, rank: int, save_meta,
          gather, barrier) -> int:
    """Collective: every rank writes its shards of `tensors` into `tmp`; rank 0 adds
    `meta` (through `save_meta(path, obj)`) and the manifest and renames `tmp` to `path`.

    `gather(obj)` returns the list of every rank's `obj` on rank 0 and `barrier()` waits for
    all ranks (identity functions in a single process). Returns the bytes written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # a single process saving alone is intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    barrier()  # every rank's shards are complete before anyone hashes
    own = sorted(p.name for p in tmp.iterdir() if p.name.startswith(f"__{rank}_"))
    records = gather(_records(tmp, own))
    if rank != 0:
        return 0
    files: dict[str, dict] = {}
    for part in records:
        files.update(part)
    save_meta(tmp / META, meta)
    files.update(_records(tmp, [".metadata", META]))
    manifest = {"format": "dinox-sharded-checkpoint", "step": int(meta.get("step", 0)),
                "world_size": len(records), "entries": sorted(tensors), "files": files}
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    replace_dir(tmp, path)
    return sum(r["size"] for r in files.values())


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, replacing an existing `dst` (moved aside first, so the
    final name never holds a half-deleted directory)."""
    aside = None
    if dst.exists():
        aside = dst.with_name(f".{dst.name}.replaced.{os.getpid()}.tmp")
        os.replace(dst, aside)
    os.replace(src, dst)
    fsync_path(dst.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_dir(path: Path, trash: Path) -> bool:
    """Delete a checkpoint directory: renamed to the hidden `trash` name first (atomic), then
    removed. False when the rename fails."""
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def link_dir(src: Path, dst: Path, tmp: Path) -> None:
    """Give checkpoint directory `src` a second name `dst` (hard links where possible)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for entry in src.iterdir():
        try:
            os.link(entry, tmp / entry.name)
        except OSError:
            shutil.copyfile(entry, tmp / entry.name)
    fsync_path(tmp)
    replace_dir(tmp, dst)


def read_manifest(path: Path) -> dict | str:
    """The manifest, or a string saying why there is none usable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete save)"
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} unreadable ({exc})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} malformed"
    return manifest


def check_files(path: Path, manifest: dict, *, hashes: bool = True) -> str | None:
    """None when every file of the manifest is present with its size (and sha256)."""
    for name, record in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != record.get("size"):
            return f"{name} is {size} bytes but {record.get('size')} were written at save time"
        if hashes and sha256_file(file) != record.get("sha256"):
            return f"{name}: sha256 differs from the one recorded at save time (bytes damaged)"
    return None


def load_into(path: Path, template: dict) -> None:
    """Read the DCP entries named in `template` into its tensors in place (resharding to
    whatever placement they have: DTensor shards under FSDP, whole tensors otherwise)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    single = not dist.is_initialized()
    with _single_process_intended() if single else contextlib.nullcontext():
        dcp.load(template, checkpoint_id=str(path), no_dist=single)


def load_full(path: Path) -> dict:
    """Every DCP entry as whole tensors in this process (eval, inspect, export: M = 1)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with _single_process_intended():
        return _load_state_dict_from_keys(checkpoint_id=str(path))


@contextlib.contextmanager
def _single_process_intended():
    """Silence DCP's "torch.distributed is ... uninitialized, assuming the intent is to load in
    a single process": loading a sharded checkpoint whole into this one process is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process",
                                category=UserWarning)
        yield


def tensor_entries(path: Path) -> list[str]:
    manifest = read_manifest(path)
    return list(manifest.get("entries", [])) if isinstance(manifest, dict) else []


__all__ = ["MANIFEST", "META", "SUFFIX", "check_files", "is_sharded", "link_dir", "load_full", "load_into",
           "fsync_path", "read_manifest", "remove_dir", "replace_dir", "sha256_file", "tensor_entries", "write"]
