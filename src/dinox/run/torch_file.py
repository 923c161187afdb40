"""Reading files written by ``torch.save``, safely, with a one-line reason when one cannot be
read: used by checkpoints (dinox.run.checkpoint) and by imported weights (dinox.model.weights).

Files load with ``weights_only=True``, so a pickle that carries code is refused, never run.
When loading fails, `header_problem` says what the file is from its first bytes and its zip
directory (torch's own message for a text file is "KeyError: 101", and for a cut-off file a
paragraph about zip archives)."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

ZIP_MAGIC = b"PK\x03\x04"   # torch.save's format since PyTorch 1.6
# the legacy format (before 1.6, or _use_new_zipfile_serialization=False): a protocol-2
# pickle that opens with torch's magic number 0x1950a86a20f9469cfc6c as a 10-byte LONG1
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class NotATorchFile(ValueError):
    """The file's bytes are not a torch.save file; the message (phrased to follow the path)
    says what they are instead."""


def load_weights_only(path, map_location="cpu", mmap: bool = False):
    """``torch.load(weights_only=True)``; `mmap` maps the tensor data instead of reading it,
    except for the legacy (non-zip) format, which cannot be mapped and is read whole.
    Raises NotATorchFile when loading fails on a file whose bytes are no torch.save file
    (torch's own error then misleads: a binary file reads as a refused pickle)."""
    try:
        # torch warns about pickle protocols and the like of files it then refuses anyway;
        # the refusal, with its reason, is what the caller reports
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if mmap and "mmap" in str(exc):
                    return torch.load(path, map_location=map_location, weights_only=True)
                raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        problem = header_problem(path)
        if problem:
            raise NotATorchFile(problem) from exc
        raise


def is_weights_only_refusal(exc: BaseException) -> bool:
    """True when the weights-only unpickler refused an object (a pickled global: code)."""
    return isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower()


def refusal_detail(exc: BaseException) -> str:
    """The refused global as the unpickler names it (e.g. "GLOBAL posix.system")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    return lines[0] if lines else "unsupported pickled object"


def first_line(exc: BaseException) -> str:
    """"Type: first sentence" of an exception; torch appends paragraphs of advice, which are
    cut at a sentence end rather than mid-word."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > 120 and ". " in first:
        first = first.split(". ", 1)[0]
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def zip_crc_problem(path) -> str | None:
    """Why the zip members of a ``torch.save`` file fail their CRC-32 (bytes changed after
    the save: a bad disk, a broken copy), phrased to follow the path, or None when every
    member matches or the file is not a zip. Reads the whole file: the check for files
    that have no sha256 record, on which torch.load itself loads changed tensor bytes
    without a word. Phrased to follow "is damaged: "."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"it cannot be read as a zip archive ({exc})"
    if bad is not None:
        return f"its member {bad} fails the zip's CRC-32 check (bytes changed after the save)"
    return None


def header_problem(path) -> str | None:
    """Why `path` cannot be a ``torch.save`` file, judged from its bytes (phrased to follow
    the path in a message), or None when it looks like one (then the reason it failed to
    load lies deeper, and the loader's own message is the one to show)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not head:
        return "is empty (0 bytes): an interrupted save or copy"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "is truncated: its zip directory is missing (an interrupted save or copy)"
        return None
    if len(head) > 9 and head[8:10] == b'{"':   # a little-endian header length, then JSON
        return "is a safetensors file, not a PyTorch file (its name ends otherwise; load it as .safetensors)"
    if head.startswith(LEGACY_MAGIC):
        return None
    if head[0] == 0x80:
        return "is a plain Python pickle, not a PyTorch file (torch.save writes a zip archive)"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"is a text file ({head[:24].decode('ascii').splitlines()[0]!r}...), not a PyTorch file"
    return f"is not a PyTorch file (it starts with {head[:8]!r}, neither a zip nor a pickle header)"
