"""One process at a time in a folder: a run folder (`train.lock`, dinox.run.checkpoint) or a
processed data root (`prep.lock`, dinox.data.ingest).

The lock is a file naming its holder (pid, host, start), created whole in one step and
POSIX record-locked for the holder's lifetime, so that the kernel frees it when the holder
dies, even by SIGKILL; `release()` deletes it. Where a filesystem has no record locks, a
lock file whose process id is dead on this host counts as stale. A lock taken on another
host is only ever released by its holder (or by hand).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from dinox.errors import UserError
from dinox.run.files import host_tag, pid_alive, temp_path, unlink_quietly

try:
    import fcntl
except ImportError:  # not POSIX: the lock file alone, judged by its process id
    fcntl = None

log = logging.getLogger("dinox.checkpoint")


class FolderLockedError(UserError):
    """Another live process holds the folder."""


# The lock files this process holds. A POSIX record lock is dropped as soon as its process
# closes ANY descriptor of the file, so this process must never open a lock file it holds:
# asking for one of these again is answered from here.
_HELD: dict[str, FolderLock] = {}


def _lockf(fd: int) -> bool:
    """Take an exclusive POSIX record lock without waiting: True when taken, False when
    this filesystem has none; BlockingIOError when another process holds it.

    Record locks (not flock) because they are not inherited by fork: DataLoader workers
    outlive a SIGKILLed trainer by seconds and must not keep its folder locked."""
    if fcntl is None:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(exc.errno, exc.strerror) from None
        return False  # ENOLCK, EOPNOTSUPP, EINVAL, EBADF: some network filesystems
    return True


class FolderLock:
    """This process's hold on a folder: its lock file, locked for the process's lifetime.
    `release()` deletes it; also a context manager."""

    def __init__(self, path: Path, fd: int, holder: dict):
        self.path, self.holder = path, holder
        self._fd: int | None = fd
        self._inode = os.fstat(fd).st_ino
        self._pid = os.getpid()
        _HELD[_lock_key(path)] = self

    @property
    def held(self) -> bool:
        return self._fd is not None and os.getpid() == self._pid

    def release(self) -> None:
        if not self.held:  # released already, or a forked child's copy
            return
        if _HELD.get(_lock_key(self.path)) is self:
            del _HELD[_lock_key(self.path)]
        try:
            if os.stat(self.path).st_ino == self._inode:  # only our own file, never a successor's
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_key(path: Path) -> str:
    return os.path.abspath(path)


def holds_lock(path: Path) -> bool:
    """Whether this process holds the lock file `path`."""
    lock = _HELD.get(_lock_key(Path(path)))
    return lock is not None and lock.held


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _create_lock(path: Path, holder: dict) -> FolderLock | None:
    """Create the lock file with its content in one step (a hard link to a finished, already
    locked temporary file, so the name never shows an empty or unlocked file); None when it
    exists already."""
    content = (json.dumps(holder) + "\n").encode("utf-8")
    tmp = temp_path(path)
    fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, content)
        _lockf(fd)  # a fresh inode: nobody else can hold it
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        except OSError:  # no hard links on this filesystem: create exclusively, then write
            os.close(fd)
            fd = None
            return _create_lock_exclusive(path, content, holder)
        lock, fd = FolderLock(path, fd, holder), None
        return lock
    finally:
        if fd is not None:
            os.close(fd)
        unlink_quietly(tmp)


def _create_lock_exclusive(path: Path, content: bytes, holder: dict) -> FolderLock | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    try:
        _lockf(fd)
        os.write(fd, content)
        return FolderLock(path, fd, holder)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise


def _remove_stale_lock(path: Path, inode: int) -> None:
    """Delete the lock file `path` if it is still the one (inode) judged stale: moved aside
    first, so that a fresh lock created meanwhile by another process is put back, not lost."""
    aside = path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    try:
        if os.stat(aside).st_ino != inode:
            try:
                os.link(aside, path)
            except OSError:
                pass
    finally:
        unlink_quietly(aside)


def _probe_lock(path: Path) -> tuple[str, dict]:
    """("held", holder) when a live process holds the existing lock file `path`; ("gone",
    holder) when it is absent, was replaced meanwhile, or was stale and has been removed.

    Stale: nobody holds its record lock (its process died: the kernel dropped the lock),
    or, on a filesystem without record locks, its process id is dead on this host."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "gone", {}
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)  # cannot be locked: judged by its process id
    try:
        holder = _read_holder(fd)
        try:
            lock = "free" if _lockf(fd) else "unsupported"
        except BlockingIOError:
            lock = "held"
        inode = os.fstat(fd).st_ino
        try:
            if os.stat(path).st_ino != inode:
                return "gone", holder
        except FileNotFoundError:
            return "gone", holder
        if lock == "held":
            return "held", holder
        if lock == "unsupported":
            pid = holder.get("pid")
            dead = (holder.get("host") == socket.gethostname() and isinstance(pid, int)
                    and pid != os.getpid() and not pid_alive(pid))
            if not dead:
                return "held", holder
        elif not holder and time.time() - os.fstat(fd).st_mtime < 5:
            return "held", holder  # created without hard links, content not written yet
        log.info("removing stale lock %s of pid %s on %s (that process is gone)",
                 path, holder.get("pid", "?"), holder.get("host", "?"))
    finally:
        os.close(fd)
    _remove_stale_lock(path, inode)
    return "gone", holder


def lock_holder(path) -> dict | None:
    """The live process holding the lock file `path` (its pid, host and start), or None; a
    stale lock is cleared on the way, as `take_lock` would."""
    path = Path(path)
    mine = _HELD.get(_lock_key(path))
    if mine is not None and mine.held:        # never open a lock file this process holds
        return mine.holder
    if not path.exists():
        return None
    try:
        status, holder = _probe_lock(path)
    except OSError:
        return None
    return holder if status == "held" else None


def holder_text(holder: dict) -> str:
    """"pid N on host H (since T)", for the messages of a folder in use."""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('since', '?')})")


def take_lock(path, in_use: Callable[[dict], str]) -> FolderLock:
    """Hold the lock file `path` for this process, or raise FolderLockedError with
    `in_use(holder)` (what the live holder is doing and what to do about it). OSError where
    the folder cannot take the file."""
    path = Path(path)
    mine = _HELD.get(_lock_key(path))
    if mine is not None and mine.held:
        raise FolderLockedError(in_use(mine.holder))
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now().astimezone().isoformat(timespec="seconds")}
    for _ in range(20):
        lock = _create_lock(path, holder)
        if lock is not None:
            return lock
        status, other = _probe_lock(path)
        if status == "held":
            raise FolderLockedError(in_use(other))
        time.sleep(0.05)
    raise FolderLockedError(f"could not lock {path.parent}: its lock file {path} keeps changing; check for other "
                            f"processes working there")
