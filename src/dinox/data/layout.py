"""The processed data root: where volumes, the index and the splits live, and how the
index is read and written. Shared by `dinox prep` (writer) and the dataset (reader).
Index paths are relative to the root and never leave it (`confined_path`)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

from dinox.errors import UserError
from dinox.run.files import atomic_write, atomic_write_text

VOLUMES_DIR = "volumes"
INDEX_FILE = "_index/index.csv"
SPLITS_DIR = "_splits"
REPORT_FILE = "prep_report.json"
PREP_LOCK_FILE = "prep.lock"   # while a prep writes the root (run.folder_lock)
# prep's caches (StampedCache): volume digests, DICOM headers, parsed LIDC XML reads
DIGESTS_FILE = "_index/voxel_digests.json"
HEADERS_FILE = "_index/dicom_headers.json"
LIDC_READS_FILE = "_index/lidc_reads.json"
INDEX_COLUMNS = ["series_id", "patient_id", "path", "num_slices", "rows", "cols",
                 "spacing_z", "spacing_y", "spacing_x"]
# z_positions: each slice's position along the normal, in mm from the first, where the steps
# between slices are not all spacing_z (gaps, irregular steps); empty where they are.
EXTRA_COLUMNS = ["source", "modality", "n_source_files", "notes", "z_positions"]


def split_name(val_fraction: float, seed: int) -> str:
    """File name of a split manifest, e.g. val10_seed0.json for 10 % and seed 0; a share
    that is no whole per cent keeps its decimals (val12.5_seed0.json), so that two
    fractions never write one file."""
    percent = round(100 * val_fraction, 6)
    text = str(int(percent)) if percent == int(percent) else f"{percent:g}"
    return f"val{text}_seed{seed}.json"


def default_manifest(root) -> Path:
    return Path(root) / SPLITS_DIR / split_name(0.1, 0)


def root_of_index(index_csv) -> Path:
    """The processed root of an index CSV given without a root: the folder above its _index/
    (the index's volume paths are relative to the root, so no other folder will do)."""
    index = Path(index_csv)
    if index.parent.name != Path(INDEX_FILE).parent.name:
        raise UserError(f"--index-csv {index} is not in a processed root's _index/ folder, so the root its "
                        f"volume paths start from is unknown; give --data-root too")
    return index.parent.parent


def same_path(a, b) -> bool:
    """Whether two paths name the same file or folder (after resolving links and `..`)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, TypeError):
        return False


def root_tag(root) -> str:
    """root{hash8}: names a processed root other than a run's own in the name of a result
    or an output folder."""
    return path_tag("root", root)


def path_tag(prefix: str, path) -> str:
    """{prefix}{hash8} of `path` resolved: a file or folder an input came from, in a name."""
    return prefix + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]


def confined_path(root, relative: str) -> Path:
    """`root / relative` for an index path, which must stay inside the root.

    Raises ValueError (saying why) for an empty or absolute path, or one whose `..` parts
    leave the root: an index must never make training read arbitrary files. The check is
    on the text, so a volumes folder that is a symlink to another disk still works."""
    text = str(relative).strip()
    if not text:
        raise ValueError("the path is empty")
    if os.path.isabs(text) or text.startswith(("/", "\\")):
        raise ValueError(f"the path {text!r} is absolute")
    normal = os.path.normpath(text)
    if normal == ".":
        raise ValueError(f"the path {text!r} names the root itself, not a volume")
    if normal == ".." or normal.startswith(".." + os.sep):
        raise ValueError(f"the path {text!r} leaves the processed root")
    return Path(root) / normal


def read_index(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {', '.join(missing)}")
        return list(reader)


def write_index(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS + EXTRA_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["series_id"]):
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def code_version(*sources, extra: str = "") -> str:
    """sha1 of the source files that compute a cached result, and of `extra` (a library's
    version): a cache stamped with it is never served by code that would compute otherwise.
    '' where a source cannot be read, which turns the cache off."""
    digest = hashlib.sha1(extra.encode())
    try:
        for source in sources:
            digest.update(Path(source).read_bytes())
    except OSError:
        return ""
    return digest.hexdigest()


class StampedCache:
    """Results computed from files, kept between runs in one JSON file by each file's key
    (`path_of(key)` is the file), size and modification time (nanoseconds), and by `version`,
    the code that computed them (`code_version`): a file written anew, or changed code, is
    computed again.

    Only a cache: a missing, damaged (its sha256 is kept with it) or unwritable file, or one
    of another version, costs a recomputation, never a result. `save` keeps what was looked
    up this run and the other entries whose files are still as they were (a prep of another
    part of an archive keeps the first part's), so files gone or changed drop out.
    `pack(values) -> JSON` and `unpack(JSON) -> values` convert all values at once (so that
    a packing can store what many values share once); values must compare equal across a
    round trip. `fresh`: read nothing from the file (prep --force)."""

    def __init__(self, file, version: str, path_of: Callable[[str], Path] = Path,
                 pack: Callable[[list], Any] | None = None, unpack: Callable[[Any], list] | None = None,
                 fresh: bool = False) -> None:
        self.file, self.version, self.path_of = Path(file), version, path_of
        self._pack = pack or list
        self._unpack = unpack or list
        self.known: dict[str, tuple[tuple[int, int], Any]] = {} if fresh or not version else self._load()
        self.used: dict[str, tuple[tuple[int, int], Any]] = {}
        self._stamps: dict[str, tuple[int, int] | None] = {}

    def _load(self) -> dict:
        try:
            head, body = self.file.read_bytes().split(b"\n", 1)
            stamp = json.loads(head)
            if stamp != {"version": self.version, "sha256": hashlib.sha256(body).hexdigest()}:
                return {}   # other code's, or damaged (a flipped byte can leave valid JSON)
            data = json.loads(body)
            keys, stamps, values = data["keys"], data["stamps"], self._unpack(data["values"])
            if not len(keys) == len(stamps) == len(values):
                return {}
            return {key: ((int(stamp[0]), int(stamp[1])), value)
                    for key, stamp, value in zip(keys, stamps, values)}
        except Exception:   # missing, cut short, edited, of an older layout: compute again
            return {}

    def _stamp(self, key: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path_of(key))
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def lookup(self, key: str) -> tuple[bool, Any]:
        """(True, value) where the file is as it was when its value was stored, else (False,
        None) (then `store` the value computed). The file is stat'ed before it is read, so a
        file changed while being read is computed again next time."""
        stamp = self._stamps[key] = self._stamp(key)
        entry = self.known.get(key)
        if stamp is not None and entry is not None and entry[0] == stamp:
            self.used[key] = entry
            return True, entry[1]
        return False, None

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        """The stored value of the file, else `compute()`, stored unless it is None (a failure
        that may pass, computed again next time)."""
        found, value = self.lookup(key)
        if not found:
            value = compute()
            if value is not None:
                self.store(key, value)
        return value

    def store(self, key: str, value: Any) -> None:
        """Keep `value` for the file `lookup` stat'ed under `key`."""
        if self._stamps.get(key) is not None:
            self.used[key] = (self._stamps[key], value)

    def save(self) -> None:
        if not self.version:
            return
        kept = dict(self.used)
        for key, entry in self.known.items():   # not looked up this run: kept while their files are unchanged
            if key not in self._stamps and self._stamp(key) == entry[0]:
                kept[key] = entry
        if kept == self.known or not (kept or self.file.exists()):
            return
        keys = sorted(kept)
        data = {"keys": keys, "stamps": [kept[k][0] for k in keys], "values": self._pack([kept[k][1] for k in keys])}
        try:
            body = json.dumps(data, separators=(",", ":")).encode("utf-8")
            head = json.dumps({"version": self.version, "sha256": hashlib.sha256(body).hexdigest()})
            atomic_write(self.file, lambda f: f.write(head.encode("utf-8") + b"\n" + body))
        except (OSError, ValueError):
            pass
