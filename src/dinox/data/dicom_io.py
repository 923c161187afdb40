"""Reading DICOM CT series: header scan, grouping into series, slice ordering, pixel decoding.

Files are grouped by SeriesInstanceUID wherever they lie. Within a series, slices are
ordered by their position along the slice normal (the cross product of the two
ImageOrientationPatient direction cosines), never by file name or InstanceNumber.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

HU_MIN, HU_MAX = -1024, 3071
_HEADER_TAGS = [
    "SOPClassUID", "Modality", "ImageType", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesDescription", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient",
    "PixelSpacing", "SliceThickness", "InstanceNumber", "NumberOfFrames",
]
_PIP_NAMES = {"gdcm": "python-gdcm"}


@dataclass(frozen=True)
class SliceHeader:
    """What the series assembly needs from one file, read without its pixel data."""

    path: str
    series_uid: str
    patient_id: str
    study_uid: str
    modality: str
    image_type: tuple[str, ...]
    description: str
    rows: int
    cols: int
    orientation: tuple[float, ...] | None   # 6 direction cosines
    position: tuple[float, ...] | None      # ImagePositionPatient
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    transfer_syntax: str
    frames: int


@dataclass
class SeriesPlan:
    """A series ready to be read: files in slice order and what was dropped on the way."""

    series_uid: str
    patient_id: str
    files: list[str]                       # ascending along the slice normal
    positions: list[float]                 # along the normal, mm
    rows: int
    cols: int
    spacing_yx: tuple[float, float]
    transfer_syntax: str
    source: str                            # common folder of the files
    n_source_files: int                    # files of this series seen by the scan
    notes: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)


class SeriesSkipped(Exception):
    """The whole series cannot be used; the message is the reason."""


def _text(ds, name: str, default: str = "") -> str:
    value = ds.get(name, default)
    return default if value is None else str(value).strip()


def _floats(ds, name: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(name)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _looks_like_dicom(path: str) -> bool:
    """A Part 10 file ('DICM' after the preamble) or a bare dataset that starts with a
    group 0002/0008 element, as old files without preamble do. Saves parsing other files."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and int.from_bytes(head[:2], "little") in (0x0002, 0x0008)


def read_header(path: str) -> SliceHeader | str:
    """The header of one file, or the reason it is not a usable DICOM image."""
    try:
        if not _looks_like_dicom(path):
            return "not a DICOM file"
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
            if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
                return "not a DICOM file"
        series_uid = _text(ds, "SeriesInstanceUID")
        if not series_uid:
            return "no SeriesInstanceUID"
        if "Rows" not in ds or "Columns" not in ds:
            return "not an image (no Rows/Columns)"
        meta = getattr(ds, "file_meta", None)
        ts = _text(meta, "TransferSyntaxUID") if meta is not None else ""
        instance = ds.get("InstanceNumber")
        spacing = _floats(ds, "PixelSpacing", 2)
        image_type = ds.get("ImageType") or ()
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        return SliceHeader(
            path=path,
            series_uid=series_uid,
            patient_id=_text(ds, "PatientID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            modality=_text(ds, "Modality").upper(),
            image_type=tuple(str(t).strip().upper() for t in image_type),
            description=_text(ds, "SeriesDescription"),
            rows=int(ds.Rows),
            cols=int(ds.Columns),
            orientation=_floats(ds, "ImageOrientationPatient", 6),
            position=_floats(ds, "ImagePositionPatient", 3),
            pixel_spacing=spacing,
            instance_number=int(instance) if instance not in (None, "") else None,
            transfer_syntax=ts or "1.2.840.10008.1.2",
            frames=int(ds.get("NumberOfFrames") or 1),
        )
    except Exception as exc:  # any parser failure means the file cannot be used
        return f"unreadable header ({type(exc).__name__})"


def decoder_problem(transfer_syntax: str) -> str | None:
    """Why pixel data in this transfer syntax cannot be decoded here, or None if it can."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"unsupported transfer syntax {transfer_syntax}"
    if decoder.is_available:
        return None
    options = []
    for dep in decoder.missing_dependencies:
        # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        wanted = dep.split("requires", 1)[-1]
        names = [re.split(r"[<>=!~ ]", part.strip())[0] for part in wanted.split(" and ")]
        names = [_PIP_NAMES.get(n, n) for n in names if n and n != "numpy"]
        if names:
            options.append("pip install " + " ".join(names))
    options.sort(key=lambda o: "gdcm" in o)   # the pure-pip pylibjpeg route first
    hint = options[0] if options else "install a pydicom pixel-data plugin"
    if len(options) > 1:
        hint += f" (or {options[1]})"
    return f"compressed pixel data ({uid.name}) and no decoder installed: {hint}"


def common_folder(paths: list[str]) -> str:
    parents = {str(Path(p).parent) for p in paths}
    if len(parents) == 1:
        return parents.pop()
    try:
        return os.path.commonpath(sorted(parents))
    except ValueError:
        return sorted(parents)[0]


def _geometry_key(h: SliceHeader) -> tuple:
    orient = tuple(round(v, 3) for v in h.orientation) if h.orientation else None
    spacing = tuple(round(v, 4) for v in h.pixel_spacing) if h.pixel_spacing else None
    return (h.rows, h.cols, orient, spacing)


def plan_series(headers: list[SliceHeader]) -> SeriesPlan:
    """Filter, check and order the files of one SeriesInstanceUID.

    Raises SeriesSkipped when nothing usable remains."""
    first = headers[0]
    patient_id = first.patient_id or f"study-{first.study_uid or first.series_uid}"
    n_files = len(headers)
    modalities = Counter(h.modality for h in headers)
    modality = modalities.most_common(1)[0][0]
    if modality != "CT":
        raise SeriesSkipped(f"modality {modality or 'missing'} (not CT)")
    dropped: list[tuple[str, str]] = []
    notes: list[str] = []

    images = []
    for h in headers:
        if "LOCALIZER" in h.image_type:
            dropped.append((h.path, "localizer/scout image"))
        elif h.modality != "CT":
            dropped.append((h.path, f"modality {h.modality or 'missing'} (not CT)"))
        elif h.frames > 1:
            dropped.append((h.path, "multi-frame image (enhanced CT) not supported"))
        elif h.orientation is None or h.position is None:
            dropped.append((h.path, "no ImagePositionPatient/ImageOrientationPatient"))
        else:
            images.append(h)
    if not images:
        reasons = Counter(r for _, r in dropped)
        raise SeriesSkipped(reasons.most_common(1)[0][0] if reasons else "no usable images")

    groups = Counter(_geometry_key(h) for h in images)
    if len(groups) > 1:
        majority = sorted(groups.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
        kept = [h for h in images if _geometry_key(h) == majority]
        for h in images:
            if _geometry_key(h) != majority:
                dropped.append((h.path, f"inconsistent geometry ({h.rows}x{h.cols}, orientation or "
                                        f"pixel spacing differs from the majority)"))
        notes.append(f"{len(images) - len(kept)} files with minority geometry dropped")
        images = kept

    ori = np.asarray(images[0].orientation, np.float64)
    normal = np.cross(ori[:3], ori[3:])
    if np.linalg.norm(normal) < 1e-3:
        raise SeriesSkipped("degenerate ImageOrientationPatient")
    normal /= np.linalg.norm(normal)
    pos = np.array([float(np.dot(h.position, normal)) for h in images])
    order = sorted(range(len(images)), key=lambda i: (pos[i], images[i].instance_number or 0, images[i].path))
    images = [images[i] for i in order]
    pos = pos[order]

    steps = np.diff(pos)
    positive = steps[steps > 1e-4]
    if positive.size:
        tol = max(1e-3, 0.05 * float(np.median(positive)))
        keep = np.concatenate([[True], steps > tol])
        for h in (h for h, k in zip(images, keep) if not k):
            dropped.append((h.path, "duplicate slice position"))
        if not keep.all():
            notes.append(f"{int((~keep).sum())} duplicate slice positions dropped")
        images = [h for h, k in zip(images, keep) if k]
        pos = pos[keep]
    elif len(images) > 1:
        for h in images[1:]:
            dropped.append((h.path, "duplicate slice position"))
        notes.append(f"{len(images) - 1} duplicate slice positions dropped")
        images, pos = images[:1], pos[:1]

    if len(images) < 2:
        raise SeriesSkipped("single slice (localizer or not a volume)")

    problem = next((p for p in map(decoder_problem, sorted({h.transfer_syntax for h in images})) if p), None)
    if problem:
        raise SeriesSkipped(problem)

    spacing = images[0].pixel_spacing
    if spacing is None:
        notes.append("no PixelSpacing; assumed 1 mm")
        spacing = (1.0, 1.0)
    return SeriesPlan(
        series_uid=first.series_uid,
        patient_id=patient_id,
        files=[h.path for h in images],
        positions=[float(p) for p in pos],
        rows=images[0].rows,
        cols=images[0].cols,
        spacing_yx=(float(spacing[0]), float(spacing[1])),
        transfer_syntax=images[0].transfer_syntax,
        source=common_folder([h.path for h in headers]),
        n_source_files=n_files,
        notes=notes,
        dropped=dropped,
    )


def spacing_notes(positions) -> list[str]:
    """Gaps and irregular steps between consecutive slice positions (sorted ascending)."""
    steps = np.diff(np.asarray(positions, np.float64))
    if steps.size == 0:
        return []
    med = float(np.median(steps))
    notes = []
    gaps = steps > 1.5 * med
    if gaps.any():
        missing = int(np.round(steps[gaps] / med - 1).sum())
        n = int(gaps.sum())
        notes.append(f"{n} gap{'s' if n > 1 else ''} in slice positions (about {missing} missing "
                     f"slice{'s' if missing > 1 else ''})")
    irregular = np.abs(steps - med) > max(0.01, 0.05 * med)
    if irregular.any() and not (irregular == gaps).all():
        notes.append(f"irregular slice spacing: steps {steps.min():.3g}..{steps.max():.3g} mm, "
                     f"median {med:.3g} mm")
    return notes


def slice_hu(path: str, rows: int, cols: int) -> np.ndarray:
    """One slice in HU (int16, clipped), with its own rescale slope/intercept applied."""
    ds = pydicom.dcmread(path, force=True)   # read_header already vetted the file
    if "TransferSyntaxUID" not in ds.file_meta:  # bare dataset without file meta
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    stored = ds.pixel_array
    if stored.shape != (rows, cols):
        raise ValueError(f"pixel array shape {stored.shape} != {(rows, cols)}")
    hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is None:
            hu[stored == padding] = HU_MIN
        else:
            lo, hi = sorted((padding, limit))
            hu[(stored >= lo) & (stored <= hi)] = HU_MIN
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def read_volume(plan: SeriesPlan) -> tuple[np.ndarray, list[float]]:
    """(Z, H, W) int16 HU volume of a planned series and the positions of its slices.

    Files whose pixel data cannot be read are dropped (recorded in plan.dropped)."""
    vol = np.empty((len(plan.files), plan.rows, plan.cols), np.int16)
    kept_pos = []
    n = 0
    for path, position in zip(plan.files, plan.positions):
        try:
            vol[n] = slice_hu(path, plan.rows, plan.cols)
        except Exception as exc:  # truncated or corrupt pixel data
            plan.dropped.append((path, f"unreadable pixel data ({type(exc).__name__}: {str(exc)[:80]})"))
            continue
        kept_pos.append(position)
        n += 1
    return vol[:n], kept_pos
