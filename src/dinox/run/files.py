"""Writing files so that a killed process never leaves a half-written one under its final
name: a temporary file beside it (`temp_path`, named for its host and process, so that
whose debris it is can be told), fsynced, then renamed over the name. Shared by every
writer of dinox: the processed root, run folders, checkpoints, monitor outputs, exports."""
from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("dinox.checkpoint")


def host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def temp_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it: `.<name>.<host>.<pid>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def unlink_quietly(path: Path) -> bool:
    """Delete ``path``; a missing file counts as deleted. False (with a warning) on other errors."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)
        return False
    return True


def remove_write_temps(folder: Path) -> None:
    """Delete the temporary files (`temp_path`'s names) that killed or stopped writers left
    in `folder`; call it where no other process writes there."""
    for stale in Path(folder).glob(".*.tmp*"):
        stale.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file in the same folder, fsync, then rename over `path`,
    so a killed process never leaves a half-written file under the final name. Whatever
    stops the write (a full disk, Ctrl-C) removes the temporary file too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def printable(text: str) -> str:
    """`text` as valid Unicode: each byte of a file name that is not UTF-8 (which Python
    carries as a lone surrogate, e.g. 'caf\\udce9' for a Latin-1 'café') becomes U+FFFD.
    Valid text is returned unchanged. Such text cannot be written as UTF-8, so one badly
    encoded folder name in an archive would fail the index write after every volume."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:   # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text through an atomic write; file names in it that are not UTF-8 are made
    `printable` rather than failing the write."""
    atomic_write(path, lambda f: f.write(printable(text).encode("utf-8")))
