"""`dinox prep`: DICOM series and NIfTI volumes -> the processed data root.

    <output>/volumes/<series_id>.npy    int16 HU (Z, H, W), ascending along the slice normal
    <output>/_index/index.csv           one row per series (see dinox.data.layout; the slice
                                        positions of a series with gaps or uneven steps)
    <output>/_splits/val10_seed0.json   patient-level train/val split
    <output>/prep_report.json           everything skipped, with reasons
    <output>/_labels/nodules.csv        nodule marks from LIDC XML and synth labels.json
                                        (see dinox.data.annotations)
    <output>/_index/*.json              caches that spare a re-run reading what has not changed:
                                        DICOM headers, LIDC XML reads, the volumes' digests
                                        (layout.StampedCache; deleting them costs time only)

Each volume is written to a temporary file in the same folder, fsynced and renamed, so an
interrupted prep never leaves a half-written volume; an interrupted one (Ctrl-C, or SIGTERM
under `dinox prep`) stops its workers and indexes the volumes written before it re-raises.
A re-run keeps the series whose volume exists and matches the index (unless --force) and
rewrites the index and split over all series present.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinox.data import annotations, dicom_io, nifti_io
from dinox.data.layout import (DIGESTS_FILE, HEADERS_FILE, INDEX_FILE, PREP_LOCK_FILE, REPORT_FILE, SPLITS_DIR,
                               VOLUMES_DIR, StampedCache, code_version, confined_path, default_manifest, read_index,
                               split_name, write_index)
from dinox.data.parallel import process_map
from dinox.data.splits import extend_split, same_scan_patients
from dinox.errors import UserError
from dinox.run.files import atomic_write, atomic_write_text, printable, remove_write_temps
from dinox.run.folder_lock import FolderLock, holder_text, take_lock
from dinox.run.signals import interrupt_name

INDEX_FLUSH_S = 30.0


@dataclass
class Task:
    """One series to turn into a volume: a planned DICOM series or a NIfTI file."""

    series_id: str
    patient_id: str
    source: str
    n_source_files: int
    plan: dicom_io.SeriesPlan | None = None
    nifti_path: str | None = None


def safe_id(text: str) -> str:
    """A file-system safe identifier (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "unnamed"


def _short_hash(text: str) -> str:
    # surrogatepass: a path that is not UTF-8 (lone surrogates) hashes too, and distinctly
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def dicom_series_id(series_uid: str) -> str:
    """The series id (and volume file name) of a DICOM series.

    A UID that already is a safe, lower-case name (as every conformant UID, digits and
    dots, is) is its own id. Any other gets a hash of the full UID appended to its
    sanitised form, because sanitising can map two UIDs to one name, and so can a
    case-insensitive file system. The id depends on the UID alone, so a re-run over other
    inputs never renames a series."""
    sid = safe_id(series_uid)
    if sid == series_uid and sid == sid.lower():
        return sid
    return f"{sid}_{_short_hash(series_uid)}"


def save_volume(path: Path, vol: np.ndarray) -> None:
    """np.save through an atomic write (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: np.save(f, vol, allow_pickle=False))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def process_task(task: Task, root: str) -> dict:
    """Read, convert and write one series. Runs in a worker process; returns a plain dict."""
    dropped: list[tuple[str, str]] = []
    z_positions = ""
    try:
        if task.plan is not None:
            plan = task.plan
            vol, positions = dicom_io.read_volume(plan)
            dropped = plan.dropped
            if vol.shape[0] < 2:
                return {"status": "skipped", "task": task, "dropped": dropped,
                        "reason": "fewer than 2 slices with readable pixel data"}
            problem = dicom_io.hu_problem(plan, vol)
            if problem:
                return {"status": "skipped", "task": task, "dropped": dropped, "reason": problem}
            uneven = dicom_io.spacing_notes(positions)
            notes = plan.notes + uneven
            spacing = (float(np.median(np.diff(positions))),) + plan.spacing_yx
            if uneven:   # the 2.5D stacks then pick their neighbours by position (data.dataset)
                z_positions = " ".join(_fmt(p - positions[0]) for p in positions)
        else:
            try:
                vol, spacing, notes = nifti_io.read_nifti(task.nifti_path)
            except ValueError as exc:
                return {"status": "skipped", "task": task, "dropped": dropped, "reason": str(exc)}
            notes = nifti_io.orientation_notes(task.nifti_path) + notes
            if vol.shape[0] < 2:
                return {"status": "skipped", "task": task, "dropped": dropped,
                        "reason": "single slice (not a volume)"}
    except MemoryError:
        return {"status": "skipped", "task": task, "dropped": dropped,
                "reason": "too large for the memory available here (or a damaged header declaring so)"}
    except Exception as exc:   # the reason on one line: some readers' messages hold line breaks
        return {"status": "skipped", "task": task, "dropped": dropped,
                "reason": f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"}
    if min(vol.shape[1:]) < 2:
        return {"status": "skipped", "task": task, "dropped": dropped,
                "reason": f"slices of {vol.shape[1]}x{vol.shape[2]} voxels: a line, not a CT volume"}
    saturated = dicom_io.saturation_note(vol)
    if saturated:
        notes = notes + [saturated]
    rel = f"{VOLUMES_DIR}/{task.series_id}.npy"
    save_volume(Path(root) / rel, vol)
    row = {
        "series_id": task.series_id, "patient_id": task.patient_id, "path": rel,
        "num_slices": vol.shape[0], "rows": vol.shape[1], "cols": vol.shape[2],
        "spacing_z": _fmt(spacing[0]), "spacing_y": _fmt(spacing[1]), "spacing_x": _fmt(spacing[2]),
        "source": task.source, "modality": "CT", "n_source_files": task.n_source_files,
        "notes": "; ".join(notes), "z_positions": z_positions,
    }
    return {"status": "written", "task": task, "row": row, "notes": notes, "dropped": dropped}


def _discover(inputs: list[Path], output: Path) -> tuple[list[str], list[str], list[dict]]:
    """(DICOM candidates, NIfTI files, the folders that could not be listed, as skipped
    entries) under the inputs, skipping the output root. A folder without read permission
    must be reported: its series would otherwise be missing from the index unsaid."""
    seen_dirs = {os.path.realpath(output)}
    seen_files: set[str] = set()
    dicom, nifti, unreadable = [], [], []

    def unlisted(exc: OSError) -> None:
        unreadable.append({"path": printable(str(exc.filename)),
                           "reason": f"folder not readable ({exc.strerror or type(exc).__name__})"})

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen_files:          # overlapping inputs or links: each file once
            seen_files.add(real)
            (nifti if nifti_io.is_nifti(path) else dicom).append(path)

    for inp in inputs:
        if inp.is_file():
            add(str(inp))
            continue
        for dirpath, dirnames, filenames in os.walk(inp, onerror=unlisted, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:           # the output root, a link loop, or a repeated input
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames.sort()
            for name in sorted(filenames):
                add(os.path.join(dirpath, name))
    return dicom, nifti, unreadable


def _check_paths(inputs: list[Path], output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is an existing file; give a folder (default data/processed)")
    for inp in inputs:
        if not inp.exists():
            raise UserError(f"input not found: {inp}")
        if inp.is_dir() and not any(files for _, _, files in os.walk(inp)):
            raise UserError(f"input folder {inp} is empty; point --input at DICOM or NIfTI scans")
        if inp.is_dir() and os.path.realpath(inp) == os.path.realpath(output):
            raise UserError(f"--input {inp} is also the --output folder: the processed root is never read as "
                            f"input; write it elsewhere, e.g. --output {inp.parent / 'processed'}")


def _dicom_tasks(by_series: dict[str, list[dicom_io.SliceHeader]],
                 files_skipped: list[dict]) -> tuple[list[Task], list[dict]]:
    """A task per DICOM series that can be read, and a skipped entry (with the reason) per
    series that cannot; the slices a plan drops go to `files_skipped`. An unforeseen error
    while planning one series skips that series alone: an archive holds thousands, and one
    odd header must not cost the others."""
    tasks: list[Task] = []
    skipped: list[dict] = []
    for uid in sorted(by_series):
        headers = by_series[uid]
        sid = dicom_series_id(uid)
        try:
            plan = dicom_io.plan_series(headers)
        except Exception as exc:
            paths = sorted({h.path for h in headers})
            reason = (str(exc) if isinstance(exc, dicom_io.SeriesSkipped)
                      else f"cannot plan series ({type(exc).__name__}: {str(exc)[:120]})")
            skipped.append({"series_id": sid, "patient_id": printable(headers[0].patient_id),
                            "source": _source(dicom_io.common_folder(paths)), "n_files": len(paths),
                            "reason": reason})
            continue
        files_skipped.extend({"path": p, "reason": r, "series_id": sid} for p, r in plan.dropped)
        plan.dropped = []
        tasks.append(Task(series_id=sid, patient_id=printable(plan.patient_id), source=_source(plan.source),
                          n_source_files=plan.n_source_files, plan=plan))
    return tasks, skipped


def _nifti_stem(path: str) -> str:
    return printable(nifti_io.nifti_stem(path))


def _source(path: str) -> str:
    """A series' `source` as recorded: absolute, so that a re-run from another working
    directory reads it alike, and printable (see run.files.printable)."""
    return printable(os.path.abspath(path))


NIFTI_PATIENT_CHOICES = ("name", "folder")


def _nifti_tasks(paths: list[str], taken: set[str], old_rows: dict[str, dict],
                 patient_from: str = "name") -> list[Task]:
    """Series id and patient id from the file name; files that share a name (e.g. every
    patient folder holding ct.nii.gz) are told apart by their parent folder. `patient_from`
    "folder": the patient is the parent folder (`<patient>/<scan>.nii.gz`, where one patient's
    several scans, e.g. T0 and T1, must stay on one side of the split) and the series id is
    folder_name. A file the
    processed root already holds (`old_rows`, see `_earlier_nifti_rows`) keeps the ids it was
    given, whatever else this run reads: a re-run over other inputs neither indexes it twice
    nor leaves it out. The stems of other files already in the root count as shared, and an id
    that is already taken (`taken`: lower-case ids, as a case-insensitive file system sees
    them, DICOM series' included) gets a hash of the file's path appended."""
    earlier = _earlier_nifti_rows(paths, old_rows)
    matched = {row["series_id"] for row in earlier.values()}
    stems = Counter(_nifti_stem(p) for p in paths)
    stems.update(_nifti_stem(row["source"]) for row in old_rows.values()
                 if nifti_io.is_nifti(row.get("source", "")) and row["series_id"] not in matched)
    used = set(taken) | {sid.lower() for sid in old_rows}
    tasks = []
    for p in paths:
        source = _source(p)
        old = earlier.get(p)
        if old is not None:
            tasks.append(Task(series_id=old["series_id"], patient_id=old["patient_id"], source=source,
                              n_source_files=1, nifti_path=p))
            continue
        stem, folder = _nifti_stem(p), printable(Path(p).parent.name)
        by_name = stem if stems[stem] == 1 and patient_from == "name" else f"{folder}_{stem}"
        patient = folder if patient_from == "folder" else by_name
        sid = safe_id(by_name)
        if sid.lower() in used:
            sid = f"{sid}_{_short_hash(os.path.realpath(p))}"
        used.add(sid.lower())
        tasks.append(Task(series_id=sid, patient_id=patient, source=source, n_source_files=1, nifti_path=p))
    return tasks


def _earlier_nifti_rows(paths: list[str], old_rows: dict[str, dict]) -> dict[str, dict]:
    """The index row an earlier prep wrote for each of `paths` that it prepared, found by the
    real path of the row's source. A source that names no file any more (a relative path
    from an older prep, run from another working directory; a folder moved since; a name
    that was not UTF-8, recorded with U+FFFD) is found by its file name, its folder's name
    (where it has one) and the volume's dimensions, when exactly one such row fits:
    otherwise every re-run would index the scan again under a new id and patient."""
    rows = [r for r in old_rows.values() if nifti_io.is_nifti(r.get("source", ""))]
    by_real = {os.path.realpath(r["source"]): r for r in rows if os.path.isfile(r["source"])}
    lost: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if not os.path.isfile(r["source"]):
            lost[printable(Path(r["source"]).name)].append(r)
    found = {}
    for p in paths:
        row = by_real.get(os.path.realpath(p)) or _lost_row(p, lost)
        if row is not None:
            found[p] = row
    return found


def _lost_row(path: str, lost: dict[str, list[dict]]) -> dict | None:
    """The one row of `lost` (rows by file name) that fits the file at `path` by its folder's
    name, where the row's source has one, and its volume's dimensions; taken off `lost`."""
    candidates = lost.get(printable(Path(path).name))
    if not candidates:
        return None
    dims, folder = nifti_io.volume_dims(path), printable(Path(path).parent.name)
    fits = [r for r in candidates
            if dims is not None and _row_dims(r) == dims and Path(r["source"]).parent.name in ("", folder)]
    if len(fits) != 1:
        return None
    candidates.remove(fits[0])
    return fits[0]


def _row_dims(row: dict) -> tuple[int, ...] | None:
    try:
        return tuple(sorted(int(row[k]) for k in ("num_slices", "rows", "cols")))
    except (KeyError, ValueError):
        return None


def _writable(root: Path) -> None:
    """Create the processed root and prove it can be written, before any work is done."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the processed root {root} ({exc.strerror or exc}); give --output a "
                        f"folder on a writable disk") from None


def _kept_volume(root: Path, row: dict) -> Path | None:
    """The volume of an earlier index row, if it exists inside the root (a row naming a path
    outside it, hand-edited or forged, is dropped and its series rewritten)."""
    try:
        path = confined_path(root, row.get("path", ""))
    except ValueError:
        return None
    return path if path.is_file() else None


def _volume_matches(root: Path, row: dict, task: Task) -> bool:
    """Whether an earlier run's volume is this task's, so the series need not be read again.

    A DICOM series must also have as many slices planned as the volume holds: where the
    earlier run dropped slices whose pixel data it could not read, only reading the series
    again tells which, and the nodule table needs that to tie marks to slices."""
    path = _kept_volume(root, row)
    if path is None:
        return False
    try:
        vol = np.load(path, mmap_mode="r")
        shape = (int(row["num_slices"]), int(row["rows"]), int(row["cols"]))
        return (vol.dtype == np.int16 and vol.shape == shape
                and str(row.get("n_source_files", "")) == str(task.n_source_files)
                and (task.plan is None or len(task.plan.slices) == shape[0]))
    except Exception:
        return False


def _reason_key(reason: str) -> str:
    return reason.split(" (", 1)[0].split(":", 1)[0]


def _top_reason(series_skipped: list[dict]) -> str | None:
    reasons = Counter(_reason_key(s["reason"]) for s in series_skipped)
    return reasons.most_common(1)[0][0] if reasons else None


def prepare(inputs, output="data/processed", workers: int = 1, force: bool = False,
            val_fraction: float = 0.1, split_seed: int = 0, progress: bool = True,
            nifti_patient: str = "name") -> dict:
    """Build or update the processed root; returns the report (also written to prep_report.json).
    `nifti_patient`: where a NIfTI file's patient id comes from (`_nifti_tasks`)."""
    start = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    root = Path(output)
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError("--val-fraction must be in [0, 1)")
    if nifti_patient not in NIFTI_PATIENT_CHOICES:
        raise UserError(f"--nifti-patient must be one of {', '.join(NIFTI_PATIENT_CHOICES)}")
    _check_paths(inputs, root)
    _writable(root)
    with _lock_root(root):
        return _prepare(inputs, root, workers, force, val_fraction, split_seed, progress, nifti_patient, start)


def _lock_root(root: Path) -> FolderLock:
    """One prep at a time in a processed root: a second one (a job launched twice, or two
    halves of an archive at once) would delete the first's unfinished volume files as stale,
    and the index, split and nodule table each wrote last would lack the other's series."""
    path = root / PREP_LOCK_FILE
    try:
        return take_lock(path, lambda holder: (
            f"the processed root {root} is in use by {holder_text(holder)}: another dinox prep writes there; wait "
            f"for it to end (one prep with more --workers reads faster), or give --output another folder; if that "
            f"process no longer exists, delete {path}"))
    except OSError as exc:
        raise UserError(f"cannot lock the processed root {root} ({exc.strerror or exc}); give --output a folder on "
                        f"a writable disk") from None


def _prepare(inputs: list[Path], root: Path, workers: int, force: bool, val_fraction: float, split_seed: int,
             progress: bool, nifti_patient: str, start: float) -> dict:
    dicom_paths, nifti_paths, files_skipped = _discover(inputs, root)
    by_series: dict[str, list[dicom_io.SliceHeader]] = defaultdict(list)
    scanned, header_cache = _scan_headers(dicom_paths, root, workers, progress, force)
    for path, headers in scanned:
        if isinstance(headers, str):
            files_skipped.append({"path": path, "reason": headers})
        else:
            by_series[headers[0].series_uid].extend(headers)

    tasks, series_skipped = _dicom_tasks(by_series, files_skipped)
    index_path = root / INDEX_FILE
    old_rows = _read_old_index(index_path)
    tasks.extend(_nifti_tasks(nifti_paths, {t.series_id.lower() for t in tasks}, old_rows, nifti_patient))

    report = {"inputs": [str(p) for p in inputs], "output": str(root), "nifti_patient": nifti_patient,
              "series_written": [], "series_kept": [], "series_skipped": series_skipped,
              "files_skipped": files_skipped, "series_notes": {}}
    if not tasks:
        _finish_report(root, report, start)
        top = _top_reason(series_skipped)
        why = f"; {len(series_skipped)} series skipped, mostly: {top}" if top else ""
        raise UserError(f"no usable CT series found in {', '.join(map(str, inputs))}{why} "
                        f"(details in {root / REPORT_FILE})")

    (root / VOLUMES_DIR).mkdir(parents=True, exist_ok=True)
    remove_write_temps(root / VOLUMES_DIR)
    rows = {sid: row for sid, row in old_rows.items() if _kept_volume(root, row) is not None}

    todo = []
    for task in tasks:
        old = rows.get(task.series_id)
        if not force and old is not None and _volume_matches(root, old, task):
            old["source"] = task.source   # where it is now (absolute, where an older prep wrote it relative)
            report["series_kept"].append(task.series_id)
            if old.get("notes"):   # as the run that read it wrote them (joined: a note may hold "; ")
                report["series_notes"][task.series_id] = [old["notes"]]
        else:
            rows.pop(task.series_id, None)
            todo.append(task)

    last_flush = time.monotonic()
    n_planned_skips = len(series_skipped)
    results = process_map(_Worker(str(root)), todo, workers, "prep", progress)
    try:
        for result in results:
            task = result["task"]
            files_skipped.extend({"path": p, "reason": r, "series_id": task.series_id}
                                 for p, r in result["dropped"])
            if result["status"] == "written":
                rows[task.series_id] = result["row"]
                report["series_written"].append(task.series_id)
                if result["notes"]:
                    report["series_notes"][task.series_id] = result["notes"]
            else:
                series_skipped.append({"series_id": task.series_id, "patient_id": task.patient_id,
                                       "source": task.source, "n_files": task.n_source_files,
                                       "reason": result["reason"]})
            if time.monotonic() - last_flush > INDEX_FLUSH_S:
                write_index(index_path, list(rows.values()))
                last_flush = time.monotonic()
    except BaseException as exc:
        # interrupted (or failed): keep what is done so that a re-run need not read it again
        results.close()     # the workers stopped first: none writes after the index
        write_index(index_path, list(rows.values()))
        header_cache.save()
        remove_write_temps(root / VOLUMES_DIR)   # a worker stopped mid-write
        if isinstance(exc, KeyboardInterrupt):
            # the series that failed in this run are not indexed: a re-run reads them again too
            written = len(report["series_written"])
            raise type(exc)(f"prep stopped by {interrupt_name(exc)} after {written} of the {len(todo)} series to "
                            f"prepare: the volumes written are in {index_path} and are not read again; run the "
                            f"same command again to prepare the other {len(todo) - written} and write the split, "
                            f"the nodule table and the report") from None
        raise
    if not report["series_written"] and not report["series_kept"]:
        # every series failed while being read: an index and split of nothing (or of
        # earlier runs only) would let the user go on to train on nothing
        _finish_report(root, report, start)
        raise UserError(f"no volume written: all {len(todo)} series failed, mostly with "
                        f"'{_top_reason(series_skipped[n_planned_skips:])}'; fix or remove those scans and run prep "
                        f"again (details in {root / REPORT_FILE})")

    write_index(index_path, list(rows.values()))
    header_cache.save()
    patients = {sid: r["patient_id"] for sid, r in rows.items()}
    report["same_scans"] = _same_scans(root, rows)
    split_as = same_scan_patients(patients, report["same_scans"])
    split_file = Path(SPLITS_DIR) / split_name(val_fraction, split_seed)
    split = extend_split(_previous_split(root / split_file), split_as, val_fraction, split_seed)
    atomic_write_text(root / split_file, json.dumps(split, indent=1) + "\n")
    refreshed = _refresh_other_splits(root, split_as, split_file)
    report["index"] = {"file": INDEX_FILE, "series": len(rows), "patients": len(set(patients.values()))}
    report["split"] = {"file": split_file.as_posix(), "val_fraction": val_fraction, "seed": split_seed,
                       "train_series": len(split["train"]), "val_series": len(split["val"]),
                       "train_patients": len({patients[s] for s in split["train"]}),
                       "val_patients": len({patients[s] for s in split["val"]}), "refreshed": refreshed}
    report["annotations"] = annotations.update_table(root, inputs, tasks, rows, files_skipped, fresh=force)
    _finish_report(root, report, start)
    return report


def _scan_headers(paths: list[str], root: Path, workers: int, progress: bool,
                  fresh: bool) -> tuple[list[tuple[str, list[dicom_io.SliceHeader] | str]], StampedCache]:
    """(path, `dicom_io.read_headers(path)`) for each path, in order, and the header cache to
    save once the root holds volumes (a prep that writes none leaves no `_index`). Files as
    they were at the last run are answered from that cache: reading ~250 k LIDC-IDRI headers
    takes ~6 min of one core on every re-run, the cache a few seconds. `fresh` (--force)
    reads them all."""
    cache = StampedCache(root / HEADERS_FILE, dicom_io.header_cache_version(),
                         pack=dicom_io.pack_header_records, unpack=dicom_io.unpack_header_records, fresh=fresh)
    known, unread = {}, []
    for path in paths:
        found, record = cache.lookup(os.path.abspath(path))
        if found:
            known[path] = dicom_io.headers_of_record(path, record)
        else:
            unread.append(path)
    read = zip(unread, process_map(dicom_io.read_headers, unread, workers, "headers", progress, unit="file",
                                   chunksize=64),
               strict=True)   # strict: runs the map to its end, so its pool shuts down here
    for path, headers in read:
        if not isinstance(headers, dicom_io.Unreadable):
            cache.store(os.path.abspath(path), dicom_io.header_record(headers))
        known[path] = headers
    return [(path, known[path]) for path in paths], cache


def _voxels_digest(path: Path) -> str | None:
    """sha1 of a volume's shape and voxels, read slice by slice (a CT volume can be GBs)."""
    try:
        vol = np.load(path, mmap_mode="r")
        digest = hashlib.sha1(f"{vol.dtype}{vol.shape}".encode())
        for plane in vol:
            digest.update(np.ascontiguousarray(plane).data)
        return digest.hexdigest()
    except Exception:
        return None


def _same_scans(root: Path, rows: dict[str, dict]) -> list[list[str]]:
    """Groups of series that hold the same voxels, each group's first copy first: a NIfTI
    that dcm2niix wrote beside its DICOM series, or a series copied under new UIDs. Each copy
    takes a patient id from its own source, so a split by patient could put one copy on each
    side, and validation would then score training data; prep splits each group as one
    patient's. The first copy is the DICOM one, else the first by series id. Only series of
    one shape and spacing (mm, to 3 decimals) are read and compared, so a dataset of
    distinct scans costs nothing."""
    def spacing(row: dict) -> tuple:
        try:
            return tuple(round(float(row[k]), 3) for k in ("spacing_z", "spacing_y", "spacing_x"))
        except (KeyError, ValueError):
            return (row.get("spacing_z"), row.get("spacing_y"), row.get("spacing_x"))

    alike = defaultdict(list)
    for sid, row in rows.items():
        alike[(_row_dims(row), spacing(row))].append(sid)
    groups = []
    # without the cache every re-run read again, in full, each volume that shares its shape and
    # spacing with another (on LIDC-IDRI, GBs from disk per run)
    digests = StampedCache(root / DIGESTS_FILE, code_version(__file__), path_of=lambda key: root / key)
    for sids in (group for group in alike.values() if len(group) > 1):
        copies = defaultdict(list)
        for sid in sids:
            path = _kept_volume(root, rows[sid])
            digest = (digests.get(path.relative_to(root).as_posix(), lambda p=path: _voxels_digest(p))
                      if path is not None else None)
            if digest is not None:
                copies[digest].append(sid)
        for same in (group for group in copies.values() if len(group) > 1):
            first = min(same, key=lambda sid: (nifti_io.is_nifti(rows[sid].get("source", "")), sid))
            groups.append([first, *sorted(set(same) - {first})])
    digests.save()
    return sorted(groups)


class _Worker:
    """Picklable callable binding the output root for process_task."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __call__(self, task: Task) -> dict:
        return process_task(task, self.root)


def _read_old_index(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        return {row["series_id"]: row for row in read_index(path)}
    except (OSError, ValueError) as exc:
        print(f"warning: ignoring unreadable {path} ({exc}); all series will be rewritten", file=sys.stderr)
        return {}


def _finish_report(root: Path, report: dict, start: float) -> None:
    report["elapsed_s"] = round(time.perf_counter() - start, 3)
    report["counts"] = {
        "series_written": len(report["series_written"]),
        "series_kept": len(report["series_kept"]),
        "series_skipped": len(report["series_skipped"]),
        "files_skipped": len(report["files_skipped"]),
    }
    report["series_skipped_by_reason"] = dict(Counter(_reason_key(s["reason"]) for s in report["series_skipped"]))
    report["files_skipped_by_reason"] = dict(Counter(_reason_key(f["reason"]) for f in report["files_skipped"]))
    root.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False: a file name that is not UTF-8 then reaches atomic_write_text as
    # such and is made printable, instead of becoming an escaped lone surrogate in the JSON
    atomic_write_text(root / REPORT_FILE, json.dumps(report, indent=1, default=str, ensure_ascii=False) + "\n")


_SPLIT_NAME = re.compile(r"val(\d+(?:\.\d+)?)_seed(\d+)\.json")


def _previous_split(path: Path) -> dict | None:
    """The split an earlier prep wrote at `path`, or None (none, or not readable as one)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) else None


def _refresh_other_splits(root: Path, patient_of: dict[str, str], written: Path) -> list[str]:
    """Extend the other split manifests an earlier prep wrote on this root (other
    --val-fraction or --split-seed) over the series now indexed: left as they were, they
    would leave out the series this prep added, and a run given one of them (the default
    val10_seed0.json, say) would train and validate on part of the data without a word.
    Every patient they held keeps its side (`extend_split`). Returns the names of those
    that changed."""
    changed = []
    for path in sorted((root / SPLITS_DIR).glob("val*_seed*.json")):
        found = _SPLIT_NAME.fullmatch(path.name)
        if path.name == written.name or not found:
            continue
        fraction, seed = float(found.group(1)) / 100, int(found.group(2))
        if not 0 <= fraction < 1 or split_name(fraction, seed) != path.name:
            continue   # not a name prep writes: a user's own manifest, left alone
        previous = _previous_split(path)
        split = extend_split(previous, patient_of, fraction, seed)
        if split == previous:
            continue
        atomic_write_text(path, json.dumps(split, indent=1) + "\n")
        changed.append(path.name)
    return changed


def format_summary(report: dict, next_step: bool = True) -> str:
    """The console summary of a prep; `next_step`: end with the `dinox train` command to run next."""
    c = report["counts"]
    lines = [f"prep: {c['series_written']} series written, {c['series_kept']} already done, "
             f"{c['series_skipped']} skipped; {c['files_skipped']} files skipped "
             f"({report['elapsed_s']:.1f} s)"]
    for title, key in (("skipped series", "series_skipped_by_reason"), ("skipped files", "files_skipped_by_reason")):
        if report[key]:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(report[key].items(), key=lambda kv: -kv[1]))
            lines.append(f"  {title}: {parts}")
    noted = report.get("series_notes") or {}
    if noted:
        first_id, first = next(iter(noted.items()))
        first = first if isinstance(first, str) else "; ".join(first)
        lines.append(f"  notes on {len(noted)} series (all in the report), e.g. {first_id}: {first}")
    if report.get("same_scans"):
        copies = sum(len(group) - 1 for group in report["same_scans"])
        lines.append(f"  {copies} series hold the voxels of another (one scan in two copies, e.g. "
                     f"{' = '.join(report['same_scans'][0])}; all in the report's same_scans): the split keeps "
                     f"the copies on one side; remove them to train on each scan once")
    labels = report.get("annotations") or {}
    if labels.get("table") or labels.get("problems"):
        problems = len(labels.get("problems") or [])
        lines.append(f"  nodule table: {labels['rows']} rows of {labels['series']} series"
                     + (f"; {problems} problem{'s' if problems > 1 else ''} with annotation files "
                        f"(listed in the report)" if problems else ""))
    if "index" in report:
        s = report["split"]
        lines.append(f"  index: {report['index']['series']} series, {report['index']['patients']} patient(s); "
                     f"split {s['file']}: {s['train_series']} train / {s['val_series']} val series "
                     f"({s['train_patients']} / {s['val_patients']} patients)")
        if s.get("refreshed"):
            lines.append(f"  also extended to the new series: {', '.join(s['refreshed'])} "
                         f"(split manifests of earlier preps; their patients keep their sides)")
        if s["val_series"] == 0 and s["val_fraction"] > 0:
            lines.append("  note: the validation split is empty (one patient only); add patients "
                         "before running the label-free evaluation")
    lines.append(f"  report: {Path(report['output']) / REPORT_FILE}")
    if next_step and "index" in report:
        lines.append(f"  next: {train_command(report)}  (plans the run on this machine's memory; the same without "
                     f"--dry-run trains; docs/phase5_big_run.md)")
    return "\n".join(lines)


def train_command(report: dict) -> str:
    """The `dinox train` dry run of the root a prep wrote, with the split it wrote where
    that is not the one train reads by default."""
    root = report["output"]
    split = Path(root) / report["split"]["file"]
    manifest = "" if split == default_manifest(root) else f" --split-manifest {shlex.quote(str(split))}"
    return f"dinox train --data-root {shlex.quote(str(root))}{manifest} --config vit-large --dry-run"
