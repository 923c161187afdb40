"""Provenance of a run: code version, data manifest, software and hardware, seed.

Saved in config.json and in every checkpoint so any result can be traced back to the
exact code and data that produced it. Nothing here raises: a missing git or an unusual
checkout yields "unknown", not a failed launch.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("dinox.provenance")

UNKNOWN = "unknown"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(args: list[str], cwd: Path, timeout: float = 10.0) -> str | None:
    """stdout of `git args` in `cwd`, or None on any failure (no git, not a repo, timeout)."""
    # Optional locks off: `git status` must not take index.lock while someone else commits.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return res.stdout if res.returncode == 0 else None


def _repo_dir(repo_dir: str | os.PathLike | None) -> Path | None:
    """The directory to ask git about, or None when dinox is not running from a checkout.

    By default: dinox's own source directory, provided its files are tracked there (an
    installed copy inside some other repository's virtualenv is not that repository's code).
    """
    if repo_dir is not None:
        path = Path(repo_dir)
        return path if path.is_dir() else None
    tracked = _git(["ls-files", "--", "__init__.py"], _PACKAGE_DIR)
    return _PACKAGE_DIR if tracked and tracked.strip() else None


def is_dirty(repo_dir: str | os.PathLike | None = None) -> bool | None:
    """True when tracked files have uncommitted changes (untracked files do not count);
    None outside a git checkout."""
    path = _repo_dir(repo_dir)
    if path is None:
        return None
    out = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return None if out is None else bool(out.strip())


def git_commit(repo_dir: str | os.PathLike | None = None, short: bool = True) -> str:
    """HEAD of the repository holding dinox (or `repo_dir`), e.g. "a1b2c3d4e5f6-dirty".

    12 hex digits when `short`, else the full hash; "-dirty" when tracked files have
    uncommitted changes; "unknown" without git or outside a checkout.
    """
    path = _repo_dir(repo_dir)
    if path is None:
        return UNKNOWN
    out = _git(["rev-parse", "--short=12" if short else "--verify", "HEAD"], path)
    if not out or not out.strip():
        return UNKNOWN
    commit = out.strip().splitlines()[0]
    return commit + "-dirty" if is_dirty(path) else commit


def data_manifest_hash(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 (first 16 hex) over the data manifest files: index CSV and split JSON.

    Files are hashed in order of file name, each as name + size + bytes, so the hash does not
    depend on where the data root lives or the order of `paths`. A missing file contributes a
    "missing" marker with its name, so the hash still differs from the complete manifest.
    """
    h = hashlib.sha256()
    for path in sorted((Path(p) for p in paths), key=lambda p: (p.name, str(p))):
        h.update(path.name.encode() + b"\0")
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                h.update(f"size={size}\0".encode())
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            h.update(b"<missing>\0")
    return h.hexdigest()[:16]


def _device_name(device) -> str:
    try:
        import torch

        d = torch.device(device)
        if d.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name(d)
        if d.type == "mps":
            return "Apple MPS"
    except Exception:
        pass
    return platform.processor() or platform.machine() or "cpu"


def collect_provenance(data_files: Iterable[str | os.PathLike], seed: int | None, device) -> dict:
    """Everything needed to trace a run back to its code, data, software and machine.

    Logs a warning (logger "dinox.provenance") when the checkout has uncommitted changes.
    """
    import numpy
    import torch

    files = [Path(p) for p in data_files]
    commit = git_commit()
    dirty = is_dirty()
    if dirty:
        log.warning("git checkout has uncommitted changes (%s); this run is not exactly "
                    "reproducible from a commit", commit)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "data_manifest_hash": data_manifest_hash(files),
        "data_files": [str(p.resolve()) for p in files],
        # one hash per file: an evaluation can tell that the split it reads changed since
        "data_file_hashes": [data_manifest_hash([p]) for p in files],
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "device": str(device),
        "device_name": _device_name(device),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "seed": seed,
        "argv": list(sys.argv),
        "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
