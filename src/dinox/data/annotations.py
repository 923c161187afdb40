"""Nodule annotations: LIDC-IDRI reader XML, `dinox synth`'s labels.json, and the one
table `dinox prep` writes from them, <processed root>/_labels/nodules.csv.

LIDC-IDRI (Armato et al., Med. Phys. 38(2), 2011) had four radiologists read every CT, first
blinded, then unblinded with the others' marks in view; the XML beside each series holds the
unblinded reads. Its schema (root LidcReadMessage, namespace http://www.nih.gov):

    ResponseHeader/SeriesInstanceUid, StudyInstanceUID
    readingSession*                      one per reader
        servicingRadiologistID
        unblindedReadNodule*             a nodule the reader saw
            noduleID                     the reader's own ID: the same lesion has a
                                         different ID in every session
            characteristics?             subtlety 1-5, internalStructure 1-4,
                                         calcification 1-6, sphericity, margin, lobulation,
                                         spiculation, texture, malignancy 1-5; only for
                                         nodules >= 3 mm
            roi*                         one per slice (sometimes more)
                imageZposition, imageSOP_UID, inclusion (TRUE, or FALSE for a hole)
                edgeMap* (xCoord = column, yCoord = row, 0-based pixel indices)
        nonNodule*                       a lesion >= 3 mm that is no nodule
            nonNoduleID, imageZposition, imageSOP_UID, locus (xCoord, yCoord)

A nodule < 3 mm is one roi with a single edgeMap point (its centre) and no characteristics;
>= 3 mm nodules are outlined on every slice, the outline drawn just outside the nodule so
that its pixels are not part of it (LIDC reader instructions).

Table rows (NODULE_COLUMNS), one per reader per mark per slice:
    kind                 nodule (outlined, >= 3 mm), small_nodule (< 3 mm, a point) or
                         non_nodule
    source, reader       lidc-xml and the reader's name (reader_names), or synth and "truth"
                         for `dinox synth`'s ground truth: each nodule's nominal sphere cut
                         by the plane of every slice it reaches
    slice_index          index into the prepared volume; z_mm and sop_uid of that slice
    row0, col0, row1, col1
                         inclusive pixel box of the outline (of the point for small nodules
                         and non-nodules); center_row, center_col its middle (the nodule
                         centre for synth)
    diameter_mm          per reader's nodule: the largest distance between two outline
                         points on one of its slices, less a pixel (the outline lies outside
                         the nodule); 2 * radius for synth; empty for points
    subtlety ... malignancy
                         the reader's characteristics where given (texture from the nodule
                         type for synth); empty otherwise
    file                 the annotation file the row came from
Marks are tied to prepared slices by SOP instance UID, else by z position within half the
slice spacing.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dinox.data import dicom_io
from dinox.data.layout import LIDC_READS_FILE, StampedCache, code_version
from dinox.run.files import atomic_write_text

LIDC_NS = "http://www.nih.gov"
NODULES_TABLE = "_labels/nodules.csv"
LABELS_FILE = "labels.json"
KINDS = ("nodule", "small_nodule", "non_nodule")
SMALL_NODULE_MM = 3.0           # LIDC: below this a nodule is marked by its centre only
MAX_XML_BYTES = 64 << 20        # LIDC files are below 2 MB; anything far larger is no read
# LIDC element name -> table column, in the schema's order
CHARACTERISTICS = {
    "subtlety": "subtlety", "internalStructure": "internal_structure",
    "calcification": "calcification", "sphericity": "sphericity", "margin": "margin",
    "lobulation": "lobulation", "spiculation": "spiculation", "texture": "texture",
    "malignancy": "malignancy",
}
# the LIDC-IDRI rating scales (Armato et al. 2011, Table 2; McNitt-Gray et al. 2007)
RATING_RANGES = {name: (1, {"internalStructure": 4, "calcification": 6}.get(name, 5)) for name in CHARACTERISTICS}
NODULE_COLUMNS = (["series_id", "patient_id", "source", "reader", "kind", "nodule_id", "slice_index",
                   "z_mm", "sop_uid", "center_row", "center_col", "row0", "col0", "row1", "col1",
                   "diameter_mm"] + list(CHARACTERISTICS.values()) + ["file"])
# synth nodule type -> LIDC texture (1 non-solid / ground glass, 3 part solid, 5 solid)
TEXTURE_OF_TYPE = {"ground_glass": 1, "part_solid": 3, "solid": 5}


class AnnotationError(ValueError):
    """An annotation file (or one mark in it) that cannot be used; the message says why."""


# --- the LIDC XML model ------------------------------------------------------------------

@dataclass(frozen=True)
class Roi:
    """A reader's outline (or point) on one image."""

    z: float | None                      # imageZposition, mm
    sop_uid: str                         # imageSOP_UID
    points: tuple[tuple[int, int], ...]  # (x = column, y = row) pixel indices
    inclusion: bool = True               # False: a hole cut out of the outline


@dataclass(frozen=True)
class Mark:
    """One reader's nodule, small nodule or non-nodule."""

    kind: str                            # one of KINDS
    mark_id: str                         # noduleID / nonNoduleID, per reader
    rois: tuple[Roi, ...]
    characteristics: dict[str, int] = field(default_factory=dict)  # LIDC element names


@dataclass
class ReadingSession:
    reader: str                          # servicingRadiologistID (may be empty)
    marks: list[Mark] = field(default_factory=list)


@dataclass
class LidcRead:
    """A parsed LidcReadMessage: the readers' sessions and what was wrong with single marks."""

    series_uid: str
    study_uid: str
    sessions: list[ReadingSession]
    problems: list[str] = field(default_factory=list)


def _local(tag) -> str:
    # comments and processing instructions have a function as tag
    return tag.rsplit("}", 1)[-1].lower() if isinstance(tag, str) else ""


def _kids(el: ET.Element, name: str) -> list[ET.Element]:
    """Children by local name, ignoring namespace and case: LIDC files differ in both
    (e.g. SeriesInstanceUid next to StudyInstanceUID)."""
    name = name.lower()
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str:
    kids = _kids(el, name)
    return (kids[0].text or "").strip() if kids else ""


def _int(text: str, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise AnnotationError(f"{what} {text!r} is not a number")
    return round(value)


def _z_and_sop(el: ET.Element) -> tuple[float | None, str]:
    z_text = _text(el, "imageZposition")
    try:
        z = float(z_text) if z_text else None
    except ValueError:
        raise AnnotationError(f"imageZposition {z_text!r} is not a number") from None
    sop = _text(el, "imageSOP_UID")
    if z is None and not sop:
        raise AnnotationError("neither imageZposition nor imageSOP_UID")
    return z, sop


def _point(el: ET.Element) -> tuple[int, int]:
    return _int(_text(el, "xCoord"), "xCoord"), _int(_text(el, "yCoord"), "yCoord")


def _parse_roi(el: ET.Element) -> Roi:
    z, sop = _z_and_sop(el)
    points = tuple(_point(p) for p in _kids(el, "edgeMap"))
    if not points:
        raise AnnotationError("roi without edgeMap points")
    return Roi(z=z, sop_uid=sop, points=points, inclusion=_text(el, "inclusion").upper() != "FALSE")


def _characteristics(el: ET.Element, rejected: list[str] | None = None) -> dict[str, int]:
    """The ratings present on LIDC's scales (RATING_RANGES); empty entries (seen in LIDC) are
    left out silently, any other value off its scale is left out and named in `rejected`."""
    names = {k.lower(): k for k in CHARACTERISTICS}
    out = {}
    for group in _kids(el, "characteristics"):
        for c in group:
            name = names.get(_local(c.tag))
            text = (c.text or "").strip()
            if not name or not text:
                continue
            lo, hi = RATING_RANGES[name]
            if text.lstrip("-").isdigit() and lo <= int(text) <= hi:
                out[name] = int(text)
            elif rejected is not None:
                rejected.append(f"{name} {text!r} is not a rating {lo}-{hi}; left out")
    return out


def _parse_nodule(el: ET.Element, rejected: list[str] | None = None) -> Mark:
    """A reader's nodule. A roi that cannot be read is left out and named in `rejected`, the
    nodule's other slices kept: dropping the whole nodule would leave its slices unmarked,
    and a slice without a mark is a negative to the probe."""
    rois, bad = [], []
    for k, el_roi in enumerate(_kids(el, "roi"), 1):
        try:
            rois.append(_parse_roi(el_roi))
        except AnnotationError as exc:
            bad.append(f"roi {k}: {exc}")
    rois = tuple(rois)
    if not any(r.inclusion for r in rois):
        raise AnnotationError("nodule without a readable inclusion roi" + (f" ({'; '.join(bad)})" if bad else ""))
    if rejected is not None:
        rejected.extend(f"{text}; that slice's outline left out" for text in bad)
    outlined = any(len(r.points) > 1 for r in rois if r.inclusion)
    return Mark(kind="nodule" if outlined else "small_nodule", mark_id=_text(el, "noduleID"),
                rois=rois, characteristics=_characteristics(el, rejected))


def _parse_non_nodule(el: ET.Element) -> Mark:
    loci = _kids(el, "locus")
    if not loci:
        raise AnnotationError("nonNodule without locus")
    z, sop = _z_and_sop(el)
    return Mark(kind="non_nodule", mark_id=_text(el, "nonNoduleID"),
                rois=(Roi(z=z, sop_uid=sop, points=(_point(loci[0]),)),))


def _parse_session(el: ET.Element, number: int, problems: list[str]) -> ReadingSession:
    session = ReadingSession(reader=_text(el, "servicingRadiologistID"))
    for child in el:
        rejected: list[str] = []
        parse = {"unblindedreadnodule": lambda c: _parse_nodule(c, rejected),
                 "nonnodule": _parse_non_nodule}.get(_local(child.tag))
        if parse is None:
            continue
        where = f"reading session {number}, {_local(child.tag)} " \
                f"{(_text(child, 'noduleID') or _text(child, 'nonNoduleID') or '?')!r}"
        try:
            session.marks.append(parse(child))
        except AnnotationError as exc:
            problems.append(f"{where}: {exc}")
            continue
        problems.extend(f"{where}: {text}" for text in rejected)
    return session


def _distinct_sessions(sessions: list[ReadingSession], problems: list[str]) -> list[ReadingSession]:
    """The sessions, less any that repeats an earlier one mark for mark, outlines included: a
    copied session would count as another reader towards the consensus. Sessions without an
    outline are kept: independent readers do click the same pixel for a small nodule or a
    non-nodule, and such marks never vote."""
    kept: list[tuple[int, ReadingSession]] = []
    for number, session in enumerate(sessions, 1):
        outlined = any(m.kind == "nodule" for m in session.marks)
        same = next((k for k, other in kept if outlined and other.marks == session.marks), None)
        if same is None:
            kept.append((number, session))
        else:
            problems.append(f"reading session {number} repeats session {same} mark for mark; counted once")
    return [session for _, session in kept]


def parse_lidc_xml(data: bytes | str) -> LidcRead:
    """Parse one LIDC read message. Raises AnnotationError for a file that is no such message;
    a single bad mark is left out and described in LidcRead.problems.

    Safety: the standard library's ElementTree (expat) never loads external entities or DTDs,
    and expat >= 2.4.1 limits entity amplification; LIDC files are UTF-8 (ASCII) without a
    DTD, so anything else, or a file that declares a DTD, is refused before parsing, which
    leaves no entity to expand. No defusedxml is needed for that."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_XML_BYTES:
        raise AnnotationError(f"larger than {MAX_XML_BYTES >> 20} MB")
    try:   # checked as text: in UTF-16 a DOCTYPE would hide from a byte search
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AnnotationError("not UTF-8 text (LIDC files are ASCII)") from None
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise AnnotationError("declares a DTD or entities (LIDC files have none)")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise AnnotationError(f"malformed XML ({exc})") from None
    if _local(root.tag) != "lidcreadmessage":
        raise AnnotationError(f"root element {_local(root.tag)!r} is not LidcReadMessage")
    headers = _kids(root, "ResponseHeader")
    header = headers[0] if headers else ET.Element("ResponseHeader")
    problems: list[str] = []
    sessions = _distinct_sessions([_parse_session(s, k + 1, problems)
                                   for k, s in enumerate(_kids(root, "readingSession"))], problems)
    return LidcRead(series_uid=_text(header, "SeriesInstanceUid"), study_uid=_text(header, "StudyInstanceUID"),
                    sessions=sessions, problems=problems)


def read_record(read: LidcRead) -> dict:
    """A parsed read as JSON for prep's cache of LIDC reads (`read_of_record` undoes it):
    re-parsing LIDC-IDRI's ~1,000 XML files costs tens of seconds of one core per prep run."""
    return {"series_uid": read.series_uid, "study_uid": read.study_uid, "problems": read.problems,
            "sessions": [{"reader": session.reader,
                          "marks": [{"kind": mark.kind, "mark_id": mark.mark_id,
                                     "characteristics": mark.characteristics,
                                     "rois": [[roi.z, roi.sop_uid, roi.inclusion, roi.points] for roi in mark.rois]}
                                    for mark in session.marks]}
                         for session in read.sessions]}


def read_of_record(record: dict) -> LidcRead:
    return LidcRead(series_uid=record["series_uid"], study_uid=record["study_uid"], problems=list(record["problems"]),
                    sessions=[ReadingSession(reader=session["reader"], marks=[
                        Mark(kind=mark["kind"], mark_id=mark["mark_id"], characteristics=dict(mark["characteristics"]),
                             rois=tuple(Roi(z=z, sop_uid=sop, inclusion=inclusion,
                                            points=tuple((int(x), int(y)) for x, y in points))
                                        for z, sop, inclusion, points in mark["rois"]))
                        for mark in session["marks"]])
                              for session in record["sessions"]])


def _parsed(path: str) -> dict:
    """The cache record of one XML file: its read, or why it is no LIDC read."""
    with open(path, "rb") as f:
        raw = f.read(MAX_XML_BYTES + 1)
    try:
        return {"read": read_record(parse_lidc_xml(raw))}
    except AnnotationError as exc:
        return {"error": str(exc)}


def reader_names(read: LidcRead) -> list[str]:
    """One distinct name per session: the radiologist ID where it is present and unique in
    the file (LIDC has files with an empty or repeated ID), else session<k>."""
    ids = [s.reader for s in read.sessions]
    return [r if r and ids.count(r) == 1 else f"session{k + 1}" for k, r in enumerate(ids)]


def _sub(parent: ET.Element, name: str, text: object | None = None) -> ET.Element:
    el = ET.SubElement(parent, f"{{{LIDC_NS}}}{name}")
    if text is not None:
        el.text = str(text)
    return el


def _write_roi(parent: ET.Element, roi: Roi) -> None:
    el = _sub(parent, "roi")
    _sub(el, "imageZposition", f"{roi.z:.4f}" if roi.z is not None else "")
    _sub(el, "imageSOP_UID", roi.sop_uid)
    _sub(el, "inclusion", "TRUE" if roi.inclusion else "FALSE")
    for x, y in roi.points:
        edge = _sub(el, "edgeMap")
        _sub(edge, "xCoord", x)
        _sub(edge, "yCoord", y)


def _write_mark(parent: ET.Element, mark: Mark) -> None:
    if mark.kind == "non_nodule":
        roi = mark.rois[0]
        el = _sub(parent, "nonNodule")
        _sub(el, "nonNoduleID", mark.mark_id)
        _sub(el, "imageZposition", f"{roi.z:.4f}" if roi.z is not None else "")
        _sub(el, "imageSOP_UID", roi.sop_uid)
        locus = _sub(el, "locus")
        _sub(locus, "xCoord", roi.points[0][0])
        _sub(locus, "yCoord", roi.points[0][1])
        return
    el = _sub(parent, "unblindedReadNodule")
    _sub(el, "noduleID", mark.mark_id)
    if mark.characteristics:
        chars = _sub(el, "characteristics")
        for name in CHARACTERISTICS:
            if name in mark.characteristics:
                _sub(chars, name, mark.characteristics[name])
    for roi in mark.rois:
        _write_roi(el, roi)


def to_lidc_xml(sessions: list[ReadingSession], series_uid: str, study_uid: str = "") -> str:
    """A LidcReadMessage document (the inverse of parse_lidc_xml), deterministic for the
    same input. Nodules come before non-nodules in a session, as in LIDC files."""
    root = ET.Element(f"{{{LIDC_NS}}}LidcReadMessage")
    header = _sub(root, "ResponseHeader")
    _sub(header, "SeriesInstanceUid", series_uid)
    _sub(header, "StudyInstanceUID", study_uid)
    for session in sessions:
        el = _sub(root, "readingSession")
        _sub(el, "servicingRadiologistID", session.reader)
        for mark in sorted(session.marks, key=lambda m: m.kind == "non_nodule"):
            _write_mark(el, mark)
    ET.indent(root, space=" ")
    body = ET.tostring(root, encoding="unicode", default_namespace=LIDC_NS)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


# --- marks -> table rows -------------------------------------------------------------------

@dataclass
class SeriesSlices:
    """Where the slices of a prepared volume came from: per volume index the SOP instance
    UID and the z position (ImagePositionPatient[2]), both as LIDC refers to images."""

    series_id: str
    patient_id: str
    series_uid: str
    sop_uids: list[str]
    z: list[float]
    spacing_z: float                       # along the slice normal, mm
    spacing_yx: tuple[float, float]
    shape_yx: tuple[int, int]
    # the slices prep left out of the volume (pixel data it could not read): SOP UIDs and z
    dropped_sops: frozenset = frozenset()
    dropped_z: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self._by_sop = {u: k for k, u in enumerate(self.sop_uids) if u}

    def locate(self, sop_uid: str, z: float | None) -> int | None:
        """Volume index of the image a mark refers to: by SOP UID, else the nearest slice
        within half the spacing around it (the smaller of its two steps: across a gap or an
        uneven step the median would reach the next slice), else None."""
        if sop_uid in self._by_sop:
            return self._by_sop[sop_uid]
        if z is None or not self.z:
            return None
        zs = np.asarray(self.z, np.float64)
        dist = np.abs(zs - z)
        k = int(np.argmin(dist))
        steps = np.abs(np.diff(zs))
        local = min([steps[j] for j in (k - 1, k) if 0 <= j < len(steps)], default=self.spacing_z)
        return k if dist[k] <= 0.5 * local + 1e-3 else None

    def names_dropped(self, sop_uid: str, z: float | None) -> bool:
        """Whether a mark refers to a slice prep left out: by its SOP UID, or by a z nearer a
        left-out slice than any slice of the volume. Its outline must not move to a neighbour."""
        if sop_uid and sop_uid in self.dropped_sops:
            return True
        if sop_uid in self._by_sop or z is None or not self.dropped_z:
            return False
        nearest_kept = min((abs(v - z) for v in self.z), default=math.inf)
        return min(abs(v - z) for v in self.dropped_z) < nearest_kept


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _fmt_mm(x: float) -> str:
    """Positions to 0.1 micrometre, as DICOM's decimal strings usually carry them."""
    return f"{x:.4f}".rstrip("0").rstrip(".")


def _base_row(s: SeriesSlices, source: str, reader: str, kind: str, mark_id: str, k: int, file: str) -> dict:
    row = dict.fromkeys(NODULE_COLUMNS, "")
    row.update(series_id=s.series_id, patient_id=s.patient_id, source=source, reader=reader, kind=kind,
               nodule_id=mark_id, slice_index=k, z_mm=_fmt_mm(s.z[k]), sop_uid=s.sop_uids[k], file=file)
    return row


def _box(row: dict, r0: float, c0: float, r1: float, c1: float) -> dict:
    row.update(row0=int(r0), col0=int(c0), row1=int(r1), col1=int(c1),
               center_row=_fmt((r0 + r1) / 2.0), center_col=_fmt((c0 + c1) / 2.0))
    return row


def _diameter_mm(points_by_slice: dict[int, list], spacing_yx: tuple[float, float]) -> float:
    """Largest distance between two outline points of one slice, over all slices, less one
    pixel: LIDC outlines run just outside the nodule, about half a pixel beyond each edge."""
    best = 0.0
    for pts in points_by_slice.values():
        p = np.asarray(pts, np.float64) * np.array([spacing_yx[1], spacing_yx[0]])
        d = p[:, None, :] - p[None, :, :]
        best = max(best, float(np.sqrt((d ** 2).sum(-1)).max()))
    return max(best - 0.5 * (spacing_yx[0] + spacing_yx[1]), 0.0)


def mark_rows(mark: Mark, reader: str, s: SeriesSlices, file: str, problems: list[str]) -> list[dict]:
    """Table rows of one reader's mark, one per slice; rois on no prepared slice go to
    `problems`. Holes (inclusion FALSE) lie inside their outline and do not change its box."""
    by_slice: dict[int, list] = defaultdict(list)
    rows_, cols_ = s.shape_yx
    for roi in mark.rois:
        # an outline drawn around a nodule at the border may run one pixel past it (kept, held
        # to the image); one further off would make a box that no cell of the slice holds
        off = next(((x, y) for x, y in roi.points if not (-1 <= x <= cols_ and -1 <= y <= rows_)), None)
        if off is not None:
            problems.append(f"reader {reader}, {mark.kind} {mark.mark_id!r}: roi at z={roi.z} has the point "
                            f"x={off[0]:g}, y={off[1]:g} outside the {cols_}x{rows_} image; left out")
            continue
        roi = replace(roi, points=tuple((min(max(x, 0), cols_ - 1), min(max(y, 0), rows_ - 1))
                                        for x, y in roi.points))
        if s.names_dropped(roi.sop_uid, roi.z):
            problems.append(f"reader {reader}, {mark.kind} {mark.mark_id!r}: roi at z={roi.z} "
                            f"(SOP {roi.sop_uid or '-'}) is on a slice prep left out (its pixel data could not be "
                            f"read); left out")
            continue
        k = s.locate(roi.sop_uid, roi.z)
        if k is None:
            problems.append(f"reader {reader}, {mark.kind} {mark.mark_id!r}: roi at z={roi.z} "
                            f"(SOP {roi.sop_uid or '-'}) matches no prepared slice")
        elif roi.inclusion:
            by_slice[k].extend(roi.points)
    diameter = _fmt(_diameter_mm(by_slice, s.spacing_yx)) if mark.kind == "nodule" and by_slice else ""
    chars = {CHARACTERISTICS[k]: v for k, v in mark.characteristics.items()}
    rows = []
    for k in sorted(by_slice):
        xs, ys = zip(*by_slice[k])
        row = _base_row(s, "lidc-xml", reader, mark.kind, mark.mark_id, k, file)
        row.update(chars, diameter_mm=diameter)
        rows.append(_box(row, min(ys), min(xs), max(ys), max(xs)))
    return rows


def lidc_rows(read: LidcRead, s: SeriesSlices, file: str) -> tuple[list[dict], list[str]]:
    problems = list(read.problems)
    rows = []
    for session, reader in zip(read.sessions, reader_names(read)):
        for mark in session.marks:
            rows.extend(mark_rows(mark, reader, s, file, problems))
    return rows, problems


def synth_rows(entry: dict, s: SeriesSlices, file: str) -> tuple[list[dict], list[str]]:
    """Ground-truth rows of one labels.json series: each nodule's nominal sphere cut by the
    plane of every slice it reaches, located by z (labels.json has no SOP UIDs)."""
    dz, dy, dx = (float(v) for v in entry["spacing_zyx_mm"])
    rows, problems = [], []
    for j, n in enumerate(entry["nodules"]):
        cz, cy, cx = (float(v) for v in n["center_zyx_vox"])
        radius, z_center = float(n["radius_mm"]), float(n["center_mm"][2])
        kind = "nodule" if 2.0 * radius >= SMALL_NODULE_MM else "small_nodule"
        for k in range(int(entry["num_slices"])):
            off = (k - cz) * dz
            if abs(off) >= radius:
                continue
            idx = s.locate("", z_center + off)
            if idx is None:
                problems.append(f"nodule {j + 1} at z={z_center + off:.4f} matches no prepared slice")
                continue
            half = math.sqrt(radius * radius - off * off)
            row = _base_row(s, "synth", "truth", kind, synth_nodule_id(j), idx, file)
            row.update(diameter_mm=_fmt(2.0 * radius), texture=TEXTURE_OF_TYPE.get(n.get("type"), ""))
            h, w = s.shape_yx
            rows.append(_box(row, max(0, round(cy - half / dy)), max(0, round(cx - half / dx)),
                             min(h - 1, round(cy + half / dy)), min(w - 1, round(cx + half / dx))))
            row.update(center_row=_fmt(round(cy, 3)), center_col=_fmt(round(cx, 3)))
    return rows, problems


def synth_nodule_id(j: int) -> str:
    """ID of the j-th (0-based) nodule of a labels.json series, in the table and in the
    synthetic readers' XML (real LIDC IDs differ between readers; consensus ignores IDs)."""
    return f"Nodule {j + 1:03d}"


# --- consensus -----------------------------------------------------------------------------

def _as_int(v) -> int:
    return int(float(v))


def _holds_centre(outer: dict, inner: dict) -> bool:
    """Whether `outer`'s box holds the centre of `inner`'s."""
    row, col = (inner["row0"] + inner["row1"]) / 2.0, (inner["col0"] + inner["col1"]) / 2.0
    return outer["row0"] <= row <= outer["row1"] and outer["col0"] <= col <= outer["col1"]


def _clusters(marks: list[dict]) -> list[list[dict]]:
    """Single-linkage groups of marks where one box holds the other's centre, transitively.
    Boxes that merely touch are not linked: the boxes of round outlines of two nodules side by
    side share corners where their masks share nothing."""
    parent = list(range(len(marks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(marks):
        for j in range(i):
            if _holds_centre(a, marks[j]) or _holds_centre(marks[j], a):
                parent[find(i)] = find(j)
    groups: dict[int, list[dict]] = defaultdict(list)
    for i, m in enumerate(marks):
        groups[find(i)].append(m)
    return list(groups.values())


def _agreed_regions(group: list[dict], min_readers: int) -> list[tuple[tuple[int, int, int, int], list[dict]]]:
    """The boxes of the connected areas whose pixels lie inside the boxes of at least
    min_readers different readers, each with the marks that cover it. One reader's outline
    round two nodules that the others outlined apart gives two areas, not one box over the
    lung between them."""
    from scipy import ndimage  # a dependency of scikit-learn

    r0, c0 = min(m["row0"] for m in group), min(m["col0"] for m in group)
    r1, c1 = max(m["row1"] for m in group), max(m["col1"] for m in group)
    count = np.zeros((r1 - r0 + 1, c1 - c0 + 1), np.int32)
    for reader in {m["reader"] for m in group}:
        mine = np.zeros_like(count, dtype=bool)
        for m in (m for m in group if m["reader"] == reader):
            mine[m["row0"] - r0:m["row1"] - r0 + 1, m["col0"] - c0:m["col1"] - c0 + 1] = True
        count += mine
    areas, n = ndimage.label(count >= min_readers)
    out = []
    for i in range(1, n + 1):
        rows, cols = np.nonzero(areas == i)
        box = (r0 + int(rows.min()), c0 + int(cols.min()), r0 + int(rows.max()), c0 + int(cols.max()))
        inside = areas == i
        members = [m for m in group if inside[m["row0"] - r0:m["row1"] - r0 + 1, m["col0"] - c0:m["col1"] - c0 + 1].any()]
        out.append((box, members))
    return out


BOX_COLUMNS = ("slice_index", "row0", "col0", "row1", "col1")   # whole numbers in every row


def consensus(rows, min_readers: int = 2, kinds=("nodule",), sources=("lidc-xml",)) -> list[dict]:
    """Per-slice nodule regions that at least `min_readers` different readers marked.

    LIDC practice: each lesion is judged by how many of the four readers marked it, e.g.
    >= 3 of 4 for the LUNA16 reference, >= 2 of 4 (the default here) for a lenient one; small
    nodules (< 3 mm) and non-nodules are usually left out (`kinds`). Readers' nodule IDs are
    their own, so the same lesion is found by place: on one slice, marks where one box holds
    the other's centre, transitively, are one lesion. Its regions are the boxes of the
    connected areas of pixels inside the boxes of at least `min_readers` readers (pylidc's
    consensus does the like on masks at 50 % agreement); where no pixel has that support there
    is no region. Only rows of `sources` count, so the
    synthetic ground truth (source synth) never votes.

    rows: dicts with the table's columns (as read_table returns them, or ints). Returns
    dicts with series_id, slice_index, row0, col0, row1, col1, center_row, center_col,
    readers (sorted) and marks ("reader:nodule_id", sorted), ordered by series and slice."""
    if min_readers < 1:
        raise ValueError("min_readers must be at least 1")
    by_slice: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] in kinds and r["source"] in sources:
            m = {k: _as_int(r[k]) for k in BOX_COLUMNS}
            m.update(reader=str(r["reader"]), nodule_id=str(r["nodule_id"]))
            by_slice[(str(r["series_id"]), m["slice_index"])].append(m)
    out = []
    for (series_id, k), marks in sorted(by_slice.items()):
        for group in _clusters(marks):
            if len({m["reader"] for m in group}) < min_readers:
                continue
            for box, members in _agreed_regions(group, min_readers):
                out.append({"series_id": series_id, "slice_index": k, "row0": box[0], "col0": box[1],
                            "row1": box[2], "col1": box[3], "center_row": (box[0] + box[2]) / 2.0,
                            "center_col": (box[1] + box[3]) / 2.0, "readers": sorted({m["reader"] for m in members}),
                            "marks": sorted(f"{m['reader']}:{m['nodule_id']}" for m in members)})
    out.sort(key=lambda c: (c["series_id"], c["slice_index"], c["row0"], c["col0"]))
    return out


# --- the table -------------------------------------------------------------------------------

def _sort_key(row: dict) -> tuple:
    return (str(row["series_id"]), str(row["source"]), str(row["reader"]), KINDS.index(row["kind"])
            if row["kind"] in KINDS else len(KINDS), str(row["nodule_id"]), _as_int(row["slice_index"]))


def write_table(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=NODULE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=_sort_key):
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


RATING_COLUMNS = tuple(CHARACTERISTICS.values())                 # numbers where given


def read_table(path, damaged: list[str] | None = None) -> list[dict[str, str]]:
    """The rows of a nodule table, checked: every row has the header's fields and numbers
    where the readers of the table compute with them. A truncated or damaged row raises
    ValueError naming its line, or, where a `damaged` list is given, is left out and
    described there (prep keeps the good rows of an earlier table)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NODULE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {', '.join(missing)}")
        rows = []
        for row in reader:
            problem = _row_problem(row)
            if problem is None:
                rows.append(row)
            elif damaged is None:
                raise ValueError(f"line {reader.line_num}{problem}")
            else:
                damaged.append(f"line {reader.line_num}{problem}")
        return rows


def _row_problem(row: dict) -> str | None:
    """Why a row of a nodule table cannot be used (phrased to follow "line N"), or None."""
    if None in row or None in row.values():
        return f" has {'more' if None in row else 'fewer'} fields than its header (a truncated or damaged table)"
    for column in BOX_COLUMNS + RATING_COLUMNS:
        value = row[column].strip()
        if column in RATING_COLUMNS and value == "":
            continue
        try:
            ok = math.isfinite(float(value))
        except ValueError:
            ok = False
        if not ok:
            return f": {column} {row[column]!r} is not a number (a damaged table)"
    return None


# --- prep: find, parse and tie annotation files to prepared series -------------------------------

def series_slices(series_id: str, patient_id: str, plan, num_slices: int, dropped: set[str]) -> SeriesSlices:
    """SOP UIDs and z of the slices of a prepared volume, from the plan (the header scan read
    them; reading every file again here cost a second pass over the archive on every run).
    Slices whose pixel data could not be read were left out of the volume (`dropped`: their
    report labels), so they are left out here too. A frame of a multi-frame file has no SOP
    UID of its own and is found by its own ImagePositionPatient z, as LIDC's imageZposition
    gives it (not the position along the slice normal, which runs the other way where the
    normal points to -z). Raises AnnotationError when the slices left do not add up to the volume (e.g. a
    volume kept from an earlier run that dropped others)."""
    planned = [(sop, pos if z is None else z, pos, dicom_io.slice_label(path, frame) in dropped)
               for (path, frame), pos, sop, z in zip(plan.slices, plan.positions, plan.sop_uids, plan.image_z)]
    kept = [(sop, z, pos) for sop, z, pos, lost in planned if not lost]
    if len(kept) != num_slices:
        raise AnnotationError(f"volume has {num_slices} slices but {len(kept)} planned slices remain; "
                              f"rerun prep with --force to tie annotations to slices")
    steps = np.diff(np.asarray([pos for _, _, pos in kept], np.float64))
    return SeriesSlices(series_id=series_id, patient_id=patient_id, series_uid=plan.series_uid,
                        sop_uids=[sop for sop, _, _ in kept], z=[z for _, z, _ in kept],
                        spacing_z=float(np.median(steps)) if steps.size else 1.0,
                        spacing_yx=tuple(plan.spacing_yx), shape_yx=(plan.rows, plan.cols),
                        dropped_sops=frozenset(sop for sop, _, _, lost in planned if lost and sop),
                        dropped_z=tuple(z for _, z, _, lost in planned if lost))


@dataclass
class _Series:
    task: object               # ingest.Task with a plan
    row: dict                  # its index row
    dropped: set[str]
    folders: set[str]          # folders holding its files
    _slices: SeriesSlices | None = None

    def slices(self) -> SeriesSlices:
        if self._slices is None:
            self._slices = series_slices(self.task.series_id, self.task.patient_id, self.task.plan,
                                         int(self.row["num_slices"]), self.dropped)
        return self._slices


def _input_root(folder: str, inputs: list[str]) -> str:
    """The deepest input folder holding `folder` (a file input stands for its folder)."""
    holding = [inp for inp in inputs if folder == inp or folder.startswith(inp.rstrip(os.sep) + os.sep)]
    return max(holding, key=len) if holding else folder


def _annotation_files(folder: str, listing: dict[str, list[str]]) -> list[str]:
    if folder not in listing:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        listing[folder] = [os.path.join(folder, n) for n in names
                           if n.lower().endswith(".xml") or n == LABELS_FILE]
    return listing[folder]


def _nearby_files(folders: set[str], inputs: list[str], listing: dict[str, list[str]]) -> list[str]:
    """LIDC XML and labels.json files in the series' folders and their parents, up to the
    input root (LIDC-IDRI keeps one XML per series folder; synth one labels.json on top)."""
    found = set()
    for folder in folders:
        root = _input_root(folder, inputs)
        here = folder
        found.update(_annotation_files(here, listing))
        while here != root and len(here) > len(root):
            here = os.path.dirname(here)
            found.update(_annotation_files(here, listing))
    return sorted(found)


def _read_json_labels(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        labels = json.load(f)
    if not isinstance(labels, dict) or labels.get("generator") != "dinox synth":
        raise AnnotationError("not a dinox synth labels.json (no generator 'dinox synth')")
    return labels


class _Collector:
    """Rows and problems of one prep run, per annotation file."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.problems: list[dict] = []
        self.used: list[str] = []
        self.contents: dict[tuple[str, str], str] = {}    # (series, sha256 of an XML's reads) -> the file read
        self.series_xml: dict[str, str] = {}    # series -> the one LIDC XML file read for it
        self.untied: set[str] = set()    # series whose slices could not be tied to the volume

    def problem(self, file: str, text: str, series_id: str | None = None) -> None:
        entry = {"file": file, "problem": text}
        if series_id:
            entry["series_id"] = series_id
        self.problems.append(entry)

    def add(self, file: str, series: _Series, make_rows) -> None:
        try:
            rows, problems = make_rows(series.slices())
        except AnnotationError as exc:
            self.problem(file, f"{exc} (its rows from earlier runs, if any, are kept)", series.task.series_id)
            self.untied.add(series.task.series_id)
            return
        self.rows.extend(rows)
        for text in problems:
            self.problem(file, text, series.task.series_id)


def _owner(read: LidcRead, path: str, by_uid: dict[str, _Series], series: list[_Series]) -> tuple[_Series | None, str]:
    """The prepared series an XML describes: by its SeriesInstanceUid, else the one series
    whose files share the XML's folder (a note says so), unless the XML's marks name images
    (SOP UIDs) and none of them is that series': then it is the XML of another series (one
    that was skipped, or whose files were moved), whose marks, tied by z alone, would label
    this scan with another patient's nodules."""
    if read.series_uid in by_uid:
        return by_uid[read.series_uid], ""
    folder = os.path.dirname(path)
    beside = [s for s in series if folder in s.folders]
    uid = read.series_uid or "missing"
    if len(beside) == 1:
        named = {roi.sop_uid for session in read.sessions for mark in session.marks for roi in mark.rois
                 if roi.sop_uid}
        if named and named.isdisjoint(beside[0].task.plan.sop_uids):
            return None, (f"belongs to no prepared series (SeriesInstanceUid {uid}, and none of the {len(named)} "
                          f"images its marks name is a slice of the series beside it): the XML of another series, "
                          f"skipped or moved away from it, or of DICOM files whose UIDs were since rewritten (an "
                          f"anonymiser: annotate the rewritten files, or keep their original UIDs)")
        note = (f"SeriesInstanceUid {read.series_uid!r} is not that of the series beside it; "
                f"matched by folder") if read.series_uid else "no SeriesInstanceUid; matched by folder"
        return beside[0], note
    return None, f"belongs to no prepared series (SeriesInstanceUid {uid})"


def _use_xml(path: str, out: _Collector, by_uid: dict[str, _Series], series: list[_Series],
             reads: StampedCache) -> None:
    record = reads.get(os.path.abspath(path), lambda: _parsed(path))
    if "error" in record:
        raise AnnotationError(record["error"])
    read = read_of_record(record["read"])
    owner, note = _owner(read, path, by_uid, series)
    if note:
        out.problem(path, note, owner.task.series_id if owner else None)
    if owner is not None:
        # by what it says, not its bytes: a copy saved again (other line ends, indentation,
        # encoding declaration) would count its readers twice all the same
        key = (owner.task.series_id, hashlib.sha256(repr(read.sessions).encode()).hexdigest())
        if key in out.contents:
            out.problem(path, f"the same content as {out.contents[key]}, read already for this series; left out",
                        owner.task.series_id)
            return
        sid = owner.task.series_id
        if sid in out.series_xml:   # reader names are a file's own: two files cannot share readers
            out.problem(path, f"a second LIDC XML file for this series ({out.series_xml[sid]} read already); left "
                              f"out, so that no reader is counted twice: keep one file per series beside it (where "
                              f"a file was resubmitted, the newer one)", sid)
            return
        out.contents[key] = out.series_xml[sid] = path
        out.add(path, owner, lambda s: lidc_rows(read, s, path))
        out.used.append(path)


def _use_labels(path: str, out: _Collector, by_uid: dict[str, _Series]) -> None:
    labels = _read_json_labels(path)
    for entry in labels.get("series", []):
        owner = by_uid.get(entry.get("series_uid"))
        if owner is not None:   # other entries describe series not prepared (reported as skipped)
            out.add(path, owner, lambda s, e=entry: synth_rows(e, s, path))
    out.used.append(path)


def update_table(root, inputs, tasks, index_rows: dict[str, dict], files_skipped: list[dict],
                 fresh: bool = False) -> dict:
    """Write <root>/_labels/nodules.csv from the annotation files beside the prepared DICOM
    series and return the prep report's "annotations" entry. Never raises for a missing,
    malformed or mismatched annotation file: those are listed under "problems". Rows of
    series prepared by earlier runs and not seen now, or whose slices cannot be tied to their
    volume this run, are kept. Annotation files, read or listed under "problems", are taken
    off `files_skipped` (the header scan listed them as not DICOM). XML files unchanged since
    the last run are not parsed again (LIDC_READS_FILE) unless `fresh`."""
    inputs = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in map(str, inputs)]
    dropped = defaultdict(set)
    for f in files_skipped:
        if f.get("series_id"):
            dropped[f["series_id"]].add(f["path"])
    series = [_Series(task=t, row=index_rows[t.series_id], dropped=dropped[t.series_id],
                      folders={os.path.abspath(os.path.dirname(p)) for p, _ in t.plan.slices})
              for t in tasks if getattr(t, "plan", None) is not None and t.series_id in index_rows]
    by_uid = {s.task.plan.series_uid: s for s in series}
    listing: dict[str, list[str]] = {}
    # deepest first: where two XML files name one series, the one in its own folder is read
    # (one in a folder above it, or a second beside it, is left out and named)
    candidates = sorted({p for s in series for p in _nearby_files(s.folders, inputs, listing)},
                        key=lambda p: (-p.count(os.sep), p))
    out = _Collector()
    reads = StampedCache(Path(root) / LIDC_READS_FILE, code_version(__file__), fresh=fresh)
    for path in candidates:
        try:
            if os.path.basename(path) == LABELS_FILE:
                _use_labels(path, out, by_uid)
            else:
                _use_xml(path, out, by_uid, series, reads)
        except Exception as exc:   # one bad file must not stop the prep (issue 13)
            out.problem(path, str(exc) if isinstance(exc, AnnotationError)
                        else f"unreadable ({type(exc).__name__}: {str(exc)[:120]})")
    reads.save()
    return _write(Path(root), out, {s.task.series_id for s in series}, index_rows, files_skipped, candidates)


def _write(root: Path, out: _Collector, seen: set[str], index_rows: dict, files_skipped: list[dict],
           candidates: list[str]) -> dict:
    path = root / NODULES_TABLE
    rows = out.rows
    if path.is_file():
        damaged: list[str] = []
        try:
            rows = rows + [r for r in read_table(path, damaged) if r["series_id"] in index_rows
                           and (r["series_id"] not in seen or r["series_id"] in out.untied)]
        except (OSError, ValueError) as exc:
            out.problem(str(path), f"earlier table unreadable, rewritten ({exc})")
        for what in damaged:
            out.problem(str(path), f"earlier table: {what}; the row was left out")
    if rows or candidates or path.is_file():
        write_table(path, rows)
    annotations = {os.path.realpath(p) for p in candidates}   # read or listed under "problems"
    files_skipped[:] = [f for f in files_skipped if os.path.realpath(f["path"]) not in annotations]
    return {"table": NODULES_TABLE if path.is_file() else None, "files": out.used, "rows": len(rows),
            "series": len({r["series_id"] for r in rows}), "problems": out.problems}
