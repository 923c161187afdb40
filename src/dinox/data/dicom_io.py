"""Reading DICOM CT series: header scan, grouping into series, slice ordering, pixel decoding.

Files are grouped by SeriesInstanceUID wherever they lie (one that several patients or
studies share is no one scan, and is skipped). Within a series, slices are ordered by their
position along the slice normal (the cross product of the two ImageOrientationPatient
direction cosines), never by file name or InstanceNumber. Sagittal, coronal and tilted
stacks keep their acquired layout, with a note.

A slice is one single-frame file or one frame of a multi-frame file (Enhanced CT, Legacy
Converted Enhanced CT), whose geometry and rescale come from its per-frame functional
groups, or from the shared ones where a frame has none. Both kinds go through the same
ordering and checks, so a series may mix them.

Two acquisitions or reconstructions of one stretch under one SeriesInstanceUID (a second
contrast phase, a thin and a thick kernel) are not interleaved: the larger is kept and the
other's files are reported (`_one_acquisition`).
"""
from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dinox.data.layout import code_version

HU_MIN, HU_MAX = -1024, 3071
# A CT volume in HU holds air (about -1000 HU) around or inside the body; one whose lowest
# value is above this is not CT in HU (a mask, MR, or stored values without their rescale).
HU_AIR_MAX = -500
# Rows or columns above this are taken as a corrupt header: CT slices are 512 or 1024 px a
# side, and a bogus 65535 x 65535 would have prep allocate 8 GiB per slice.
MAX_SLICE_SIZE = 4096
_HEADER_TAGS = [
    "SOPClassUID", "Modality", "ImageType", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesDescription", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient",
    "PixelSpacing", "SliceThickness", "InstanceNumber", "NumberOfFrames", "BitsAllocated",
    "SamplesPerPixel", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "RescaleSlope", "RescaleIntercept", "AcquisitionNumber", "ConvolutionKernel", "SOPInstanceUID",
]
_PIP_NAMES = {"gdcm": "python-gdcm"}
CODECS_HINT = 'pip install "dinox[codecs]"'

SliceRef = tuple[str, int | None]   # (path, frame index; None for a single-frame file)


@dataclass(frozen=True)
class SliceHeader:
    """What the series assembly needs from one slice (a file, or one frame of a multi-frame
    file), read without its pixel data."""

    path: str
    frame: int | None                       # index into a multi-frame file; None: single-frame
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
    problem: str | None = None              # why the header alone rules this image out
    rescaled: bool = True                   # has RescaleSlope and RescaleIntercept (else: stored = HU)
    # (AcquisitionNumber, ConvolutionKernel, SliceThickness) as written: slices that differ
    # here and cover the same stretch are two acquisitions or reconstructions (_one_acquisition)
    acquisition: tuple[str, str, str] = ("", "", "")
    sop_uid: str = ""                       # SOPInstanceUID, as LIDC's XML names an image ("" for a frame)

    @property
    def ref(self) -> SliceRef:
        return (self.path, self.frame)

    @property
    def label(self) -> str:
        return slice_label(self.path, self.frame)


class Unreadable(str):
    """`read_headers`' reason for a file it could not read now (no permission, a disk
    error, no memory): unlike the file's content, that may pass, so it is not cached."""


# The header cache (`layout.StampedCache`, prep's HEADERS_FILE): per file, the reason it is
# unusable, or its SliceHeaders without their path, each as (what the slices of a series
# share, stored once per cache; the slice's own fields). On LIDC-IDRI that is ~250 k files.
_SHARED_FIELDS = ("series_uid", "patient_id", "study_uid", "modality", "image_type", "description", "rows",
                  "cols", "orientation", "pixel_spacing", "transfer_syntax", "acquisition")
_OWN_FIELDS = tuple(f.name for f in fields(SliceHeader) if f.name not in (*_SHARED_FIELDS, "path"))
_TUPLE_FIELDS = frozenset({"image_type", "orientation", "position", "pixel_spacing", "acquisition"})


def _tuples(names, values: list) -> list:
    """`values` (of the fields `names`) with JSON's lists back as tuples, in place."""
    for i, name in enumerate(names):
        if name in _TUPLE_FIELDS and values[i] is not None:
            values[i] = tuple(values[i])
    return values


def header_cache_version() -> str:
    """The header cache's `version`: this reader's code and pydicom's."""
    return code_version(__file__, extra=f"pydicom {pydicom.__version__}")


def header_record(headers: list[SliceHeader] | str) -> list | str:
    """What the header cache keeps of `read_headers`' answer for one file (see `headers_of_record`)."""
    if isinstance(headers, str):
        return str(headers)
    return [(tuple(getattr(h, f) for f in _SHARED_FIELDS), [getattr(h, f) for f in _OWN_FIELDS]) for h in headers]


def headers_of_record(path: str, record: list | str) -> list[SliceHeader] | str:
    """`read_headers(path)` again from its `header_record`."""
    if isinstance(record, str):
        return record
    return [SliceHeader(path=path, **dict(zip(_SHARED_FIELDS, shared)), **dict(zip(_OWN_FIELDS, own)))
            for shared, own in record]


def pack_header_records(records: list) -> dict:
    """JSON for the header cache: each distinct shared part once, slices by its number."""
    shared: list[tuple] = []
    number: dict[tuple, int] = {}
    files = []
    for record in records:
        if isinstance(record, str):
            files.append(record)
            continue
        rows = []
        for common, own in record:
            if common not in number:
                number[common] = len(shared)
                shared.append(common)
            rows.append([number[common], *own])
        files.append(rows)
    return {"fields": [list(_SHARED_FIELDS), list(_OWN_FIELDS)], "shared": shared, "files": files}


def unpack_header_records(data: dict) -> list:
    """`pack_header_records` undone (refused, so the cache is read anew, if its fields are not
    this SliceHeader's)."""
    if data["fields"] != [list(_SHARED_FIELDS), list(_OWN_FIELDS)]:
        raise ValueError("the header cache holds other fields")
    shared = [tuple(_tuples(_SHARED_FIELDS, common)) for common in data["shared"]]
    return [record if isinstance(record, str)
            else [(shared[row[0]], _tuples(_OWN_FIELDS, row[1:])) for row in record]   # row[1:]: a copy
            for record in data["files"]]


@dataclass
class SeriesPlan:
    """A series ready to be read: slices in order and what was dropped on the way."""

    series_uid: str
    patient_id: str
    slices: list[SliceRef]                 # ascending along the slice normal
    positions: list[float]                 # along the normal, mm
    sop_uids: list[str]                    # per slice: its SOPInstanceUID ("" for a frame)
    image_z: list[float | None]            # per slice or frame: ImagePositionPatient z
    rows: int
    cols: int
    spacing_yx: tuple[float, float]
    transfer_syntax: str
    source: str                            # common folder of the files
    n_source_files: int                    # files of this series seen by the scan
    unrescaled: int = 0                    # slices without RescaleSlope/RescaleIntercept
    notes: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)   # (slice label, reason)


def slice_label(path: str, frame: int | None) -> str:
    """How a slice is named in the report: the path, plus the 1-based frame number."""
    return path if frame is None else f"{path} [frame {frame + 1}]"


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


def _number_text(ds, name: str) -> str:
    """A numeric element as text that compares by value ("1.250" and "1.25" alike)."""
    text = _text(ds, name)
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _has_rescale(ds) -> bool:
    """Whether pydicom's modality LUT will rescale this image (it needs both tags); without
    them the stored values pass through unchanged."""
    return "RescaleSlope" in ds and "RescaleIntercept" in ds


def _looks_like_dicom(path: str) -> bool:
    """A Part 10 file ('DICM' after the preamble) or a bare dataset that starts with a
    group 0002/0008 element, as old files without preamble do. Saves parsing other files."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and int.from_bytes(head[:2], "little") in (0x0002, 0x0008)


def _not_dicom(path: str) -> str:
    """Why a file is skipped as not DICOM: named more closely where its first bytes are those
    of a NIfTI file (or of gzip data) whose name lacks the ending prep recognises NIfTI by."""
    with open(path, "rb") as f:
        head = f.read(348)
    if head[344:348] == b"n+1\0" or head[4:8] == b"n+2\0":
        return "not a DICOM file: a NIfTI volume named without .nii; rename it to end in .nii to prepare it"
    if head[344:348] == b"ni1\0":
        return "not a DICOM file: the header of a NIfTI .hdr/.img pair, which prep does not read; convert it to .nii"
    if head[:2] == b"\x1f\x8b":
        return "not a DICOM file: gzip data (if it is a NIfTI volume, name it *.nii.gz to prepare it)"
    if path.lower().endswith(".xml"):
        # prep reads the XML beside each prepared series as its annotations and takes those off
        # the skipped files: one left here lies beside none (LIDC-IDRI's radiograph reads, say)
        return ("XML beside no prepared CT series (LIDC reads are taken from the folder of the series they "
                "annotate, or a folder above it)")
    return "not a DICOM file"


def _quiet(read):
    """`read` with pydicom's warnings silenced. pydicom warns about each value it finds off
    the standard (a UID with a letter, a decimal string too long, an unknown character set),
    one or two lines per file: on an archive exported by one non-conformant scanner that is
    tens of thousands of lines burying prep's own output. prep checks every value it uses
    itself and reports what it cannot use in prep_report.json."""
    @functools.wraps(read)
    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            return read(*args, **kwargs)
    return quiet


@_quiet
def read_headers(path: str) -> list[SliceHeader] | str:
    """The slice headers of one file (one per frame of a multi-frame file), or the reason
    it is not a usable DICOM image."""
    try:
        try:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes): a copy or download cut short? copy it again"
            looks = _looks_like_dicom(path)
        except OSError as exc:   # no permission, a disk error: the file, not its header, is at fault
            return Unreadable(f"not readable ({exc.strerror or type(exc).__name__})"
                              + (": give the user running prep read access" if isinstance(exc, PermissionError)
                                 else ""))
        if not looks:
            return _not_dicom(path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
            if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
                return "not a DICOM file"
        if not _text(ds, "SeriesInstanceUID"):
            if os.path.basename(path).upper() == "DICOMDIR":
                return "a DICOMDIR (the index of a DICOM disc or export), not an image"
            return "no SeriesInstanceUID in its header (a truncated file, or not part of an image series)"
        if "Rows" not in ds or "Columns" not in ds:
            return "not an image (no Rows/Columns)"
        return _slice_headers(path, ds)
    except Exception as exc:  # any parser failure means the file cannot be used
        reason = f"unreadable header ({type(exc).__name__})"
        return Unreadable(reason) if isinstance(exc, (OSError, MemoryError)) else reason


def _slice_headers(path: str, ds) -> list[SliceHeader]:
    meta = getattr(ds, "file_meta", None)
    ts = (_text(meta, "TransferSyntaxUID") if meta is not None else "") or "1.2.840.10008.1.2"
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    common = dict(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(str(t).strip().upper() for t in image_type),
        description=_text(ds, "SeriesDescription"),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        # only breaks ties in the ordering: a malformed value must not cost a good slice
        instance_number=_int(ds.get("InstanceNumber")),
        transfer_syntax=ts,
        sop_uid=_text(ds, "SOPInstanceUID"),
        acquisition=(_number_text(ds, "AcquisitionNumber"), _text(ds, "ConvolutionKernel"),
                     _number_text(ds, "SliceThickness")),
    )
    frames = int(ds.get("NumberOfFrames") or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    problem = _size_problem(path, ds, ts, frames) or _frames_problem(ds, frames, enhanced)
    if problem or not enhanced:
        return [SliceHeader(**common, frame=None, orientation=_floats(ds, "ImageOrientationPatient", 6),
                            position=_floats(ds, "ImagePositionPatient", 3),
                            pixel_spacing=_floats(ds, "PixelSpacing", 2), problem=problem,
                            rescaled=_has_rescale(ds))]
    return [SliceHeader(**common, frame=i,
                        orientation=_frame_floats(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient", 6),
                        position=_frame_floats(ds, i, "PlanePositionSequence", "ImagePositionPatient", 3),
                        pixel_spacing=_frame_floats(ds, i, "PixelMeasuresSequence", "PixelSpacing", 2),
                        rescaled=_has_rescale(_frame_item_or(ds, i, "PixelValueTransformationSequence")))
            for i in range(frames)]


def _size_problem(path: str, ds, transfer_syntax: str, frames: int) -> str | None:
    """A declared image size that is implausible, or that the file is too short to hold.

    Checked on the header so that a corrupt one never makes prep allocate for it."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not (0 < rows <= MAX_SLICE_SIZE and 0 < cols <= MAX_SLICE_SIZE):
        return f"slice size {rows}x{cols} outside 1..{MAX_SLICE_SIZE} pixels per side (corrupt header?)"
    if frames < 1:
        return f"invalid NumberOfFrames {frames}"
    try:
        uid = UID(transfer_syntax)
        native = not (uid.is_encapsulated or uid.is_deflated)
    except ValueError:        # not a known transfer syntax; the decoder check reports it
        native = False
    if not native:            # compressed: its length says nothing about the image size
        return None
    bits = int(ds.get("BitsAllocated") or 16)
    samples = int(ds.get("SamplesPerPixel") or 1)
    needed = (rows * cols * frames * samples * bits + 7) // 8
    size = os.path.getsize(path)
    if size < needed:
        return (f"pixel data truncated: file is {size} bytes, its header declares {frames} x {rows}x{cols} "
                f"x {bits}-bit pixels ({needed} bytes)")
    return None


def _frames_problem(ds, frames: int, enhanced: bool) -> str | None:
    if frames > 1 and not enhanced:
        return "multi-frame image without functional groups (no per-frame positions)"
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if enhanced and per_frame is not None and len(per_frame) != frames:
        return f"NumberOfFrames is {frames} but there are {len(per_frame)} per-frame functional groups"
    return None


def _functional_item(ds, frame: int, macro: str):
    """The item of a functional group macro (e.g. PlanePositionSequence) that applies to
    one frame: its own per-frame item, else the shared one, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and index < len(seq):
            item = seq[index].get(macro)
            if item:
                return item[0]
    return None


def _frame_item_or(ds, frame: int, macro: str):
    """The functional group item of one frame, else the dataset itself (whose top-level
    tags then apply, as in slice_hu)."""
    item = _functional_item(ds, frame, macro)
    return item if item is not None else ds


def _frame_floats(ds, frame: int, macro: str, name: str, n: int) -> tuple[float, ...] | None:
    return _floats(_frame_item_or(ds, frame, macro), name, n)


def decoder_problem(transfer_syntax: str) -> str | None:
    """Why pixel data in this transfer syntax cannot be decoded here, or None if it can."""
    uid = UID(transfer_syntax)
    try:
        compressed = uid.is_compressed
    except ValueError:        # pydicom knows no such transfer syntax (e.g. GE's private 1.2.840.113619.5.2)
        return (f"unknown or private transfer syntax {transfer_syntax}: convert the series to a standard one "
                f"(e.g. gdcmconv --raw) and run prep again")
    if not compressed:
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
    if any(o.startswith("pip install pylibjpeg") for o in options):   # the codecs extra has it
        hint = f"{CODECS_HINT} (or: {'; or '.join(options[:2])})"
    elif options:
        hint = options[0] + (f" (or {options[1]})" if len(options) > 1 else "")
    else:
        hint = "install a pydicom pixel-data plugin"
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


def _unusable(h: SliceHeader) -> str | None:
    """Why one slice cannot be part of a CT volume, or None."""
    if h.problem:
        return h.problem
    if "LOCALIZER" in h.image_type:
        return "localizer/scout image"
    if h.modality != "CT":
        return f"modality {h.modality or 'missing'} (not CT)"
    if h.orientation is None or h.position is None:
        return "no ImagePositionPatient/ImageOrientationPatient"
    if not all(math.isfinite(v) for v in h.orientation + h.position):
        return "ImagePositionPatient/ImageOrientationPatient holds a value that is not a finite number"
    if h.pixel_spacing is not None and not all(math.isfinite(v) and v > 0 for v in h.pixel_spacing):
        return (f"PixelSpacing {'/'.join(f'{v:g}' for v in h.pixel_spacing)} is not a positive size in mm: "
                f"restore it from the scanner's export")
    return None


# A PatientID or StudyInstanceUID that at most this many slices give, against one value that
# at least STRAY_RATIO times as many give, is a damaged or stray header, not a second scan.
STRAY_MAX = 2
STRAY_RATIO = 20


def _stray_headers(headers: list[SliceHeader]) -> dict[int, str]:
    """{index into headers: why the slice is left out} for the slices that name another
    patient or study than all but a few of their series: one flipped byte in a file's
    StudyInstanceUID made the whole series "shared by 2 studies" and skipped it. Two real
    scans under one SeriesInstanceUID (an anonymiser's collision) each hold many slices, and
    stay a `_shared_uid_problem`."""
    stray: dict[int, str] = {}
    for attr, tag in (("patient_id", "PatientID"), ("study_uid", "StudyInstanceUID")):
        counts = Counter(getattr(h, attr) for h in headers if getattr(h, attr))
        if len(counts) < 2:
            continue
        (usual, n), *others = counts.most_common()
        if any(c > STRAY_MAX for _, c in others) or n < STRAY_RATIO * sum(c for _, c in others):
            continue
        for i, h in enumerate(headers):
            value = getattr(h, attr)
            if value and value != usual:
                stray.setdefault(i, f"{tag} {value!r} differs from the {n} other slices' {usual!r} (a damaged or "
                                    f"stray header): left out")
    return stray


def _shared_uid_problem(headers: list[SliceHeader]) -> str | None:
    """Why the files of one SeriesInstanceUID are not one scan: they name several patients
    or studies (colliding UIDs from an anonymiser or a re-export). Merged, their slices
    would interleave into one volume under the first patient's id. A file without the tag
    names none: it is one scan's file with an incomplete header (`_most_common_id`)."""
    for what, values in (("patients", {h.patient_id for h in headers} - {""}),
                         ("studies", {h.study_uid for h in headers} - {""})):
        if len(values) > 1:
            named = sorted(values)
            shown = ", ".join(named[:3]) + (", ..." if len(named) > 3 else "")
            return (f"one SeriesInstanceUID shared by {len(values)} {what}: {shown} (give each scan its own "
                    f"SeriesInstanceUID to prepare them)")
    return None


# Beyond this angle between the slice normal and the line through the slice positions, the
# stack is noted as sheared (gantry tilt); DICOM positions carry about 0.01 mm of precision.
TILT_NOTE_DEGREES = 1.0


def _plane_notes(normal: np.ndarray, ends: list) -> list[str]:
    """Notes on a series that is not a plain axial stack: slices in a sagittal or coronal
    plane, or a stack sheared by gantry tilt (`ends`: the first and last slice positions).
    The volume keeps the acquired layout either way; the notes tell the user so."""
    notes = []
    if abs(normal[2]) < np.cos(np.radians(45.0)):
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        notes.append(f"{plane} slices (normal {normal[0]:.2f}, {normal[1]:.2f}, {normal[2]:.2f}): kept in the "
                     f"acquired plane, not resliced to axial")
    step = np.asarray(ends[1], np.float64) - np.asarray(ends[0], np.float64)
    along = float(np.dot(step, normal))
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(step - along * normal), abs(along))))
    if tilt > TILT_NOTE_DEGREES:
        notes.append(f"slices offset {tilt:.1f} degrees from their normal (gantry tilt?): the stack is sheared, "
                     f"not resampled")
    return notes


def _most_common_id(values) -> str:
    """The id most of a series' files give, files without it left out ("" when none has it)."""
    named = Counter(v for v in values if v)
    return named.most_common(1)[0][0] if named else ""


# A group of slices lying mostly (this share) inside another group's stretch along the normal
# acquired that stretch again: a second contrast phase, or a second reconstruction.
SAME_STRETCH_SHARE = 0.5


def _one_acquisition(images: list[SliceHeader], pos: np.ndarray) -> tuple[list[int], list[str], dict[int, str]]:
    """Keep one acquisition or reconstruction where several share a SeriesInstanceUID.

    Some exports put two contrast phases, or a thin and a thick reconstruction, under one
    UID; ordered by position alone their slices would interleave into one volume of mixed
    phases or kernels. Slices are grouped by AcquisitionNumber, ConvolutionKernel and
    SliceThickness (each where every slice has it); the largest group is kept, and so is
    every group that covers another stretch (a sequential scan numbers its table positions
    as acquisitions). A group whose slices lie mostly inside a kept group's stretch is dropped.
    Returns (the indices kept, notes, {dropped index: reason})."""
    # a field some slices lack (an anonymiser's gap) tells nothing apart
    written = [j for j in range(3) if all(h.acquisition[j] for h in images)]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, h in enumerate(images):
        groups[tuple(v if j in written else "" for j, v in enumerate(h.acquisition))].append(i)
    if len(groups) == 1:
        return list(range(len(images))), [], {}

    def rank(item):
        key, members = item
        number = _int(key[0])
        return (-len(members), number if number is not None else math.inf, key)

    varying = [j for j in range(3) if len({key[j] for key in groups}) > 1]
    kept: list[tuple[tuple, list[int]]] = []
    dropped: dict[int, str] = {}
    notes = []
    for key, members in sorted(groups.items(), key=rank):
        inside = next((k for k, m in kept if np.mean((pos[members] >= pos[m].min() - 1e-3)
                                                      & (pos[members] <= pos[m].max() + 1e-3)) > SAME_STRETCH_SHARE),
                      None)
        if inside is None:
            kept.append((key, members))
            continue
        this, other = _describe_acquisition(key, varying), _describe_acquisition(inside, varying)
        for i in members:
            dropped[i] = (f"another acquisition or reconstruction ({this}) of the stretch that {other} covers, "
                          f"under the same SeriesInstanceUID")
        notes.append(f"{len(members)} slices of {this} dropped: they cover the stretch of {other} again (one "
                     f"SeriesInstanceUID for two acquisitions or reconstructions; the larger is kept)")
    return sorted(i for _, m in kept for i in m), notes, dropped


def _describe_acquisition(key: tuple[str, str, str], varying: list[int]) -> str:
    """The fields of an acquisition key that tell the series' groups apart."""
    names, units = ("acquisition", "kernel", "thickness"), ("", "", " mm")
    return ", ".join(f"{names[j]} {key[j] or '(none)'}{units[j]}" for j in varying)


def plan_series(headers: list[SliceHeader]) -> SeriesPlan:
    """Filter, check and order the slices of one SeriesInstanceUID.

    Raises SeriesSkipped when nothing usable remains."""
    paths = sorted({h.path for h in headers})
    stray = _stray_headers(headers)
    dropped: list[tuple[str, str]] = [(headers[i].label, why) for i, why in sorted(stray.items())]
    headers = [h for i, h in enumerate(headers) if i not in stray]
    first = headers[0]
    study_uid = _most_common_id(h.study_uid for h in headers)
    patient_id = _most_common_id(h.patient_id for h in headers) or f"study-{study_uid or first.series_uid}"
    modalities = Counter(h.modality for h in headers)
    modality = modalities.most_common(1)[0][0]
    if modality != "CT":
        raise SeriesSkipped(f"modality {modality or 'missing'} (not CT)")
    shared = _shared_uid_problem(headers)
    if shared:
        raise SeriesSkipped(shared)
    notes: list[str] = []
    if stray:
        notes.append(f"{len(stray)} slice{'s' if len(stray) > 1 else ''} naming another patient or study left out "
                     f"(damaged or stray headers)")
    unnamed = sum(not h.patient_id for h in headers)
    if unnamed and unnamed < len(headers):
        notes.append(f"{unnamed} of {len(headers)} slices have no PatientID: taken as the series' patient {patient_id}")

    images = []
    for h in headers:
        reason = _unusable(h)
        if reason:
            dropped.append((h.label, reason))
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
                dropped.append((h.label, f"inconsistent geometry ({h.rows}x{h.cols}, orientation or "
                                         f"pixel spacing differs from the majority)"))
        notes.append(f"{len(images) - len(kept)} slices with minority geometry dropped")
        images = kept

    ori = np.asarray(images[0].orientation, np.float64)
    normal = np.cross(ori[:3], ori[3:])
    if np.linalg.norm(normal) < 1e-3:
        raise SeriesSkipped("degenerate ImageOrientationPatient")
    normal /= np.linalg.norm(normal)
    pos = np.array([float(np.dot(h.position, normal)) for h in images])
    kept, acquisition_notes, other_acquisition = _one_acquisition(images, pos)
    if other_acquisition:
        dropped.extend((images[i].label, reason) for i, reason in sorted(other_acquisition.items()))
        notes.extend(acquisition_notes)
        images, pos = [images[i] for i in kept], pos[kept]
    order = sorted(range(len(images)), key=lambda i: (pos[i], images[i].instance_number or 0,
                                                      images[i].path, images[i].frame or 0))
    images = [images[i] for i in order]
    pos = pos[order]

    steps = np.diff(pos)
    positive = steps[steps > 1e-4]
    if positive.size:
        tol = max(1e-3, 0.05 * float(np.median(positive)))
        keep = np.concatenate([[True], steps > tol])
        for h in (h for h, k in zip(images, keep) if not k):
            dropped.append((h.label, "duplicate slice position"))
        if not keep.all():
            notes.append(f"{int((~keep).sum())} duplicate slice positions dropped")
        images = [h for h, k in zip(images, keep) if k]
        pos = pos[keep]
    elif len(images) > 1:
        for h in images[1:]:
            dropped.append((h.label, "duplicate slice position"))
        notes.append(f"{len(images) - 1} duplicate slice positions dropped")
        images, pos = images[:1], pos[:1]

    if len(images) < 2:
        raise SeriesSkipped("single slice (localizer or not a volume)")

    problem = next((p for p in map(decoder_problem, sorted({h.transfer_syntax for h in images})) if p), None)
    if problem:
        raise SeriesSkipped(problem)

    notes.extend(_plane_notes(normal, [images[0].position, images[-1].position]))
    unrescaled = sum(not h.rescaled for h in images)
    if unrescaled:
        notes.append(f"{unrescaled} of {len(images)} slices have no RescaleSlope/RescaleIntercept: their stored "
                     f"values were taken as HU")
    spacing = images[0].pixel_spacing
    if spacing is None:
        notes.append("no PixelSpacing; assumed 1 mm")
        spacing = (1.0, 1.0)
    return SeriesPlan(
        series_uid=first.series_uid,
        patient_id=patient_id,
        slices=[h.ref for h in images],
        positions=[float(p) for p in pos],
        sop_uids=[h.sop_uid if h.frame is None else "" for h in images],
        image_z=[float(h.position[2]) for h in images],   # a frame's own (PlanePositionSequence)
        rows=images[0].rows,
        cols=images[0].cols,
        spacing_yx=(float(spacing[0]), float(spacing[1])),
        transfer_syntax=images[0].transfer_syntax,
        source=common_folder(paths),
        n_source_files=len(paths),
        unrescaled=unrescaled,
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


def read_dataset(path: str):
    """The whole dataset of a file that read_headers vetted, ready for pixel decoding."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # bare dataset without file meta
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    return ds


def slice_hu(ds, frame: int | None, rows: int, cols: int) -> np.ndarray:
    """One slice in HU (int16, clipped): the file's image, or one frame of it, with its own
    rescale slope/intercept (a frame's from its PixelValueTransformationSequence)."""
    stored = pixel_array(ds, index=frame)
    if stored.shape != (rows, cols):
        raise ValueError(f"pixel array shape {stored.shape} != {(rows, cols)}")
    rescale = ds if frame is None else _frame_item_or(ds, frame, "PixelValueTransformationSequence")
    hu = np.asarray(apply_modality_lut(stored, rescale), dtype=np.float64)
    if not np.isfinite(hu).all():   # a NaN or infinite RescaleSlope/RescaleIntercept would cast to 0 HU
        raise ValueError("RescaleSlope/RescaleIntercept give values that are not finite numbers")
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is None:
            hu[stored == padding] = HU_MIN
        else:
            lo, hi = sorted((padding, limit))
            hu[(stored >= lo) & (stored <= hi)] = HU_MIN
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def hu_problem(plan: SeriesPlan, vol: np.ndarray) -> str | None:
    """Why a series with slices read without rescale is not CT in HU, or None. Stored values
    are HU only where the writer stored them so (signed, air near -1000); unsigned ones
    with air at 0, from an anonymiser that stripped the rescale tags, are not."""
    lowest = int(vol.min()) if vol.size else HU_MIN
    if not plan.unrescaled or lowest <= HU_AIR_MAX:
        return None
    return (f"no RescaleSlope/RescaleIntercept and the values do not look like CT in HU (lowest {lowest}): restore "
            f"the rescale tags (CT usually has slope 1, intercept -1024) or export the series with them")


# CT holds little at the top of the HU range (metal, a few voxels); a volume with more than
# this share there holds padding or wrapped values read as dense bone.
SATURATED_SHARE = 0.01


def saturation_note(vol: np.ndarray) -> str | None:
    """A note when a volume has a large share of voxels at the top of the HU range: the
    padding outside a scan's circle stored as a large unsigned value without
    PixelPaddingValue (-2000 written as 63536), which the rescale turns into bone."""
    share = float(np.mean(vol >= HU_MAX)) if vol.size else 0.0
    if share <= SATURATED_SHARE:
        return None
    return (f"{100 * share:.0f} % of the voxels are at the top of the HU range ({HU_MAX} HU): padding outside the "
            f"scan stored without PixelPaddingValue? Check the series in a viewer; where it is padding, set "
            f"PixelPaddingValue and prepare it again")


def _unreadable(exc: Exception) -> str:
    return f"unreadable pixel data ({type(exc).__name__}: {str(exc)[:80]})"


@_quiet
def read_volume(plan: SeriesPlan) -> tuple[np.ndarray, list[float]]:
    """(Z, H, W) int16 HU volume of a planned series and the positions of its slices.

    Each file is read once, however many of its frames the series uses. Slices whose pixel
    data cannot be read are dropped (recorded in plan.dropped)."""
    vol = np.empty((len(plan.slices), plan.rows, plan.cols), np.int16)
    ok = np.zeros(len(plan.slices), bool)
    by_file: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for k, (path, frame) in enumerate(plan.slices):
        by_file[path].append((k, frame))
    for path, wanted in by_file.items():
        try:
            ds = read_dataset(path)
        except Exception as exc:  # truncated or corrupt file
            plan.dropped.extend((slice_label(path, frame), _unreadable(exc)) for _, frame in wanted)
            continue
        for k, frame in wanted:
            try:
                vol[k] = slice_hu(ds, frame, plan.rows, plan.cols)
                ok[k] = True
            except Exception as exc:  # truncated or corrupt pixel data
                plan.dropped.append((slice_label(path, frame), _unreadable(exc)))
        del ds   # a multi-frame file's pixel data can be large: free it before the next file
    positions = [p for p, good in zip(plan.positions, ok) if good]
    return (vol if ok.all() else vol[ok]), positions
