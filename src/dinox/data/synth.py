"""`dinox synth`: procedural CT phantoms written as real DICOM CT series.

Three families (`--family`), structurally different so that a recipe tuned on one can be
checked on another: chest (dinox.data.phantom, the default: lungs, vessels, nodules), head
(dinox.data.phantom_head: skull, brain, sinuses, orbits; haemorrhages as findings) and
limb (dinox.data.phantom_limb: thigh, leg or forearm, muscles, long bones, vessels, metal
implants; bone lesions and soft-tissue masses as findings).

Layout: <out>/<patient_id>/<series_uid>/slice_XXXX.dcm (CT Image Storage, explicit VR little
endian, 16-bit stored values with RescaleSlope/Intercept), plus <out>/labels.json with the
nodules (or, for head and limb, the findings, recorded the same way) and the family of
every series. Half of the patients (chosen by the seed) are stored like some
scanners do, as signed values with intercept 0 and -3024 outside the reconstruction circle,
the other half as unsigned values with intercept -1024.

Beside each series' slices lies annotations.xml: LIDC-IDRI style reads of four simulated
radiologists (dinox.data.annotations has the schema). Each reader's outlines follow the
nodules of labels.json with small, reader-specific differences in size, centre and shape;
readers miss nodules (small ones more often), call some nodules under 3 mm (marked by a
point only, as LIDC does) and mark a few vessel ends as non-nodules, so a consensus over
readers decides what counts as a nodule, as it does for LIDC-IDRI. Only chest series get
the XML: the reader model (miss rates by nodule size, LIDC characteristics such as texture
and malignancy, vessel ends marked as non-nodules) describes lung-nodule reads and has no
counterpart for haemorrhages or bone lesions; their ground truth reaches
_labels/nodules.csv through labels.json alone.

Everything is derived from --seed (numpy Generator per patient, UIDs hashed from the seed
and the patient ID, which names the family for head and limb): the same seed gives
byte-identical files, and the chest family's files are those it gave before the other
families existed. The readers draw from their own Generator, so
the images are the same with or without them.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from dinox.data.annotations import (CHARACTERISTICS, RATING_RANGES, SMALL_NODULE_MM, TEXTURE_OF_TYPE, Mark,
                                    ReadingSession, Roi, synth_nodule_id, to_lidc_xml)
from dinox.data.parallel import process_map
from dinox.data.phantom import NODULE_TYPES, Phantom, make_phantom
from dinox.data.phantom_head import HAEMORRHAGE_TYPES, make_head_phantom
from dinox.data.phantom_limb import LIMB_FINDING_TYPES, make_limb_phantom
from dinox.errors import UserError
from dinox.run.device import available_memory_bytes
from dinox.run.files import atomic_write_text, remove_write_temps

PADDING_HU = -3024
FAMILY_CONVENTION = "chest | head | limb: the phantom family (dinox synth --family)"
LABEL_CONVENTIONS = {
    "center_zyx_vox": "fractional (slice, row, column) index; slice 0 is the most inferior, "
                      "i.e. the order of a prepared volume",
    "center_mm": "(x, y, z) in DICOM patient coordinates (LPS), millimetres",
    "radius_mm": "nominal radius; the drawn nodule is slightly elliptical and lobulated",
    "type": " | ".join(NODULE_TYPES),
    "annotation_xml": "LIDC-IDRI style XML of four simulated readers beside the slices, relative "
                      "to this file's folder",
    "vessels": "lung vessel segments drawn in the volume, [z0, y0, x0, z1, y1, x1, r0_mm, r1_mm]: "
               "both ends as fractional (slice, row, column) indices like center_zyx_vox, radii in "
               "mm; the vessels are the union of these tapered cylinders (ends may lie outside "
               "the volume)",
    "family": FAMILY_CONVENTION,
}
_FINDING_CONVENTIONS = {
    "center_zyx_vox": LABEL_CONVENTIONS["center_zyx_vox"],
    "center_mm": LABEL_CONVENTIONS["center_mm"],
    "radius_mm": "nominal radius; for a subdural haematoma half its thickness at the centre",
    "hu": "HU the finding was drawn with at its centre, before blur, artefacts and noise",
    "extent_mm": "subdural haematoma only: distance from the centre at which the crescent thins to nothing",
    "vessels": "limb only: vessel segments, as for the chest's lung vessels: [z0, y0, x0, z1, y1, x1, r0_mm, "
               "r1_mm] in fractional (slice, row, column) indices and mm",
    "anatomy": "per-patient facts of the phantom (head: tilt in degrees yaw, pitch, roll, ventricle scale, "
               "atrophy; limb: site, laterality, implant, contrast, bones)",
    "family": FAMILY_CONVENTION,
}


@dataclass(frozen=True)
class Family:
    """How one phantom family is made and described in the DICOM headers and labels."""

    make: Callable[..., Phantom]   # (rng, slices, size, slice_thickness=None)
    finding_types: tuple[str, ...]
    study: str                      # StudyDescription
    window: tuple[str, str]         # WindowCenter, WindowWidth for a first display
    position: str                   # PatientPosition
    stream: tuple[int, ...]         # appended to [seed, index] in the patient's SeedSequence
    reads: bool                     # LIDC-style reader XML beside the series
    findings: str                   # what its labels.json "nodules" are, in words


FAMILIES = {
    # chest keeps its SeedSequence([seed, index]) and headers: its files must not change
    "chest": Family(make_phantom, NODULE_TYPES, "CHEST (synthetic)", ("-600", "1500"), "FFS", (), True,
                    "nodules"),
    "head": Family(make_head_phantom, HAEMORRHAGE_TYPES, "HEAD (synthetic)", ("40", "80"), "HFS", (1,), False,
                   "haemorrhages"),
    "limb": Family(make_limb_phantom, LIMB_FINDING_TYPES, "EXTREMITY (synthetic)", ("50", "400"), "FFS", (2,),
                   False, "lesions (bone, soft-tissue, lipoma)"),
}


def family_conventions(family: str) -> dict:
    """labels.json's "conventions" for a dataset of one family."""
    if family == "chest":
        return LABEL_CONVENTIONS
    return {**_FINDING_CONVENTIONS, "type": " | ".join(FAMILIES[family].finding_types)}


N_READERS = 4                # LIDC-IDRI: four radiologists read every scan
READS_XML = "annotations.xml"
# Spawn key of the readers' Generator: a stream of its own next to the phantom's
# SeedSequence([seed, index]), whose draws therefore do not move.
READER_STREAM = (1,)


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["dinox-synth", str(seed), *map(str, parts)])


def _stored_values(ph: Phantom, signed: bool) -> tuple[np.ndarray, float]:
    """Integer pixel values and the RescaleIntercept that maps them back to HU."""
    hu = np.rint(ph.hu)
    size = hu.shape[-1]
    r = np.arange(size) - (size - 1) / 2.0
    outside = (r[:, None] ** 2 + r[None, :] ** 2) > (size / 2.0) ** 2
    if signed:
        np.clip(hu, PADDING_HU, 3071, out=hu)
        hu[:, outside] = PADDING_HU
        return hu.astype("<i2"), 0.0
    np.clip(hu, -1024, 3071, out=hu)
    hu[:, outside] = -1024
    return (hu + 1024).astype("<u2"), -1024.0


def _family_of(ph: Phantom) -> str:
    return getattr(ph, "family", "chest")


def _series_template(seed: int, index: int, patient_id: str, study_uid: str, series_uid: str,
                     ph: Phantom, signed: bool, intercept: float) -> Dataset:
    family = _family_of(ph)
    spec = FAMILIES[family]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dz, dy, dx = ph.spacing_zyx_mm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "dinox synthetic phantom"
    ds.StudyDescription = spec.study
    ds.SeriesDescription = f"phantom seed {seed} patient {index}" if family == "chest" \
        else f"{family} phantom seed {seed} patient {index}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = getattr(ph, "body_part", "CHEST")
    ds.SliceThickness = f"{dz:.4g}"
    ds.KVP = "120"
    ds.PatientPosition = spec.position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = _uid(seed, patient_id, "frame")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ph.hu.shape[1:]
    ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter, ds.WindowWidth = spec.window
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def patient_id_of(seed: int, index: int, family: str = "chest") -> str:
    """SYNTH<seed>-<index> for chest (as before the families); the family's name in the
    others' IDs keeps their patient IDs and UIDs apart when datasets of several families
    share a seed (and a processed root)."""
    return f"SYNTH{seed}-{index:04d}" if family == "chest" else f"SYNTH{seed}-{family.upper()}-{index:04d}"


def write_series(out: Path, seed: int, index: int, ph: Phantom, signed: bool) -> dict:
    """Write one phantom as a DICOM series; returns its labels.json entry."""
    family = _family_of(ph)
    patient_id = patient_id_of(seed, index, family)
    study_uid = _uid(seed, patient_id, "study")
    series_uid = _uid(seed, patient_id, "series")
    series_dir = out / patient_id / series_uid
    series_dir.mkdir(parents=True, exist_ok=True)
    stored, intercept = _stored_values(ph, signed)
    ds = _series_template(seed, index, patient_id, study_uid, series_uid, ph, signed, intercept)
    x0, y0, z0 = ph.origin_xyz_mm
    dz = ph.spacing_zyx_mm[0]
    sop_uids, zs = [], []
    for k in range(stored.shape[0]):
        sop_uid = _uid(seed, patient_id, "image", k)
        z = z0 + k * dz
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(series_dir / f"slice_{k:04d}.dcm", enforce_file_format=True)
        sop_uids.append(sop_uid)
        zs.append(float(ds.ImagePositionPatient[2]))   # as written, so XML and DICOM agree
    entry = {
        "patient_id": patient_id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "series_dir": series_dir.relative_to(out).as_posix(),
        "family": family,
        "num_slices": int(stored.shape[0]),
        "rows": int(stored.shape[1]),
        "cols": int(stored.shape[2]),
        "spacing_zyx_mm": [float(s) for s in ph.spacing_zyx_mm],
        "nodules": [_finding_label(n) for n in ph.nodules],
    }
    if not FAMILIES[family].reads:
        entry["vessels"] = vessel_labels(ph)
        entry["anatomy"] = getattr(ph, "anatomy", {})
        return entry
    entry["annotation_xml"] = (series_dir / READS_XML).relative_to(out).as_posix()
    entry["vessels"] = vessel_labels(ph)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=READER_STREAM))
    reads = simulated_reads(entry, sop_uids, zs, rng)
    (series_dir / READS_XML).write_text(to_lidc_xml(reads, series_uid, study_uid), encoding="utf-8")
    return entry


def _finding_label(n) -> dict:
    """A nodule's labels.json record; a head or limb Finding adds its HU (and extent)."""
    label = {
        "center_zyx_vox": [round(c, 3) for c in n.center_zyx_vox],
        "center_mm": [round(c, 3) for c in n.center_xyz_mm],
        "radius_mm": round(n.radius_mm, 3),
        "type": n.kind,
    }
    if hasattr(n, "hu"):
        label["hu"] = round(float(n.hu), 1)
        if n.extent_mm is not None:
            label["extent_mm"] = round(float(n.extent_mm), 3)
    return label


def vessel_labels(ph: Phantom) -> list[list[float]]:
    """The phantom's lung vessel segments in voxel indices (see LABEL_CONVENTIONS)."""
    x0, y0, z0 = ph.origin_xyz_mm
    dz, dy, dx = ph.spacing_zyx_mm

    def zyx(p) -> list[float]:
        return [round((p[2] - z0) / dz, 2), round((p[1] - y0) / dy, 2), round((p[0] - x0) / dx, 2)]

    return [zyx(v.a_xyz_mm) + zyx(v.b_xyz_mm) + [round(v.r0_mm, 2), round(v.r1_mm, 2)] for v in ph.vessels]


def _miss_probability(diameter_mm: float) -> float:
    """LIDC readers disagreed most on small nodules; a 3 mm one is missed by 40 %, 15 mm by 5 %."""
    return float(np.clip(0.49 - 0.03 * diameter_mm, 0.05, 0.4))


def _outline(cy: float, cx: float, ry: float, rx: float, ellipticity: float, angle: float,
             shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """A closed chain of (x, y) pixels around an ellipse, sampled twice per pixel of arc so
    that consecutive pixels touch."""
    n = max(8, math.ceil(4.0 * math.pi * max(ry, rx)))
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    u, v = (1.0 + ellipticity) * np.cos(t), (1.0 - ellipticity) * np.sin(t)
    x = cx + rx * (u * math.cos(angle) - v * math.sin(angle))
    y = cy + ry * (u * math.sin(angle) + v * math.cos(angle))
    pts = np.stack([np.clip(np.rint(x), 0, shape[1] - 1), np.clip(np.rint(y), 0, shape[0] - 1)], 1).astype(int)
    pts = pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]
    return tuple(map(tuple, np.concatenate([pts, pts[:1]]).tolist()))


def _ratings(nodule: dict, noise: np.ndarray) -> dict[str, int]:
    """LIDC characteristics a reader would give, from the nodule's size and type, each
    moved by the reader's noise (-1, 0, +1); soft-tissue interior and no calcification are
    kept, as for most LIDC nodules."""
    d, kind = 2.0 * nodule["radius_mm"], nodule["type"]
    base = {"subtlety": 2 if kind == "ground_glass" or d < 6.0 else 4, "internalStructure": 1,
            "calcification": 6, "sphericity": 4, "margin": {"solid": 4, "part_solid": 3}.get(kind, 2),
            "lobulation": 2, "spiculation": 1, "texture": TEXTURE_OF_TYPE[kind],
            "malignancy": 1 + int(np.searchsorted([4.0, 8.0, 15.0, 22.0], d))}
    fixed = ("internalStructure", "calcification")
    return {k: int(np.clip(base[k] + (0 if k in fixed else int(noise[i])), *RATING_RANGES[k]))
            for i, k in enumerate(CHARACTERISTICS)}


def _read_nodule(j: int, nodule: dict, entry: dict, sop_uids: list[str], zs: list[float],
                 rng: np.random.Generator) -> Mark | None:
    """One reader's mark of labels nodule j, or None when the reader misses it. The same
    number of draws every time, so one reader's choice never shifts another's."""
    u, g = rng.random(2), rng.standard_normal(4)
    noise = rng.choice(3, size=len(CHARACTERISTICS), p=[0.2, 0.6, 0.2]) - 1
    if u[0] < _miss_probability(2.0 * nodule["radius_mm"]):
        return None
    dz, dy, dx = entry["spacing_zyx_mm"]
    shape = (entry["rows"], entry["cols"])
    cz, cy, cx = nodule["center_zyx_vox"]
    cy, cx = cy + 0.3 * g[1], cx + 0.3 * g[2]
    radius = nodule["radius_mm"] * math.exp(0.1 * g[0])
    if 2.0 * radius < SMALL_NODULE_MM:   # LIDC: a point at the centre, no characteristics
        k = int(np.clip(round(cz), 0, len(zs) - 1))
        point = (int(np.clip(round(cx), 0, shape[1] - 1)), int(np.clip(round(cy), 0, shape[0] - 1)))
        return Mark("small_nodule", synth_nodule_id(j), (Roi(zs[k], sop_uids[k], (point,)),))
    rois = []
    for k in range(len(zs)):
        off = (k - cz) * dz
        if abs(off) >= radius:           # the slice plane misses the nodule
            continue
        half = math.sqrt(radius * radius - off * off)
        # LIDC outlines run just outside the nodule: half a pixel beyond its edge, and at
        # least a pixel from the centre, so that a nodule under a pixel across is outlined
        # (a single point would make it a nodule under 3 mm)
        ry, rx = max(half / dy + 0.5, 1.0), max(half / dx + 0.5, 1.0)
        rois.append(Roi(zs[k], sop_uids[k], _outline(cy, cx, ry, rx, 0.05 * g[3], math.pi * u[1], shape)))
    if not rois:
        return None
    return Mark("nodule", synth_nodule_id(j), tuple(rois), _ratings(nodule, noise))


def _vessel_ends(entry: dict) -> list[tuple[int, int, int]]:
    """(slice, row, column) of thick vessel ends in the volume and clear of nodules: what
    LIDC readers often marked as non-nodules."""
    dz, dy, _ = entry["spacing_zyx_mm"]
    ends = []
    for seg in entry["vessels"]:
        k, i, j = (round(c) for c in seg[3:6])
        if seg[6] < 1.5 or not (0 <= k < entry["num_slices"] and 0 <= i < entry["rows"] and 0 <= j < entry["cols"]):
            continue
        clear = all(math.hypot((k - n["center_zyx_vox"][0]) * dz,
                               math.hypot(i - n["center_zyx_vox"][1], j - n["center_zyx_vox"][2]) * dy)
                    > n["radius_mm"] + 5.0 for n in entry["nodules"])
        if clear:
            ends.append((k, i, j))
    return ends


def simulated_reads(entry: dict, sop_uids: list[str], zs: list[float],
                    rng: np.random.Generator) -> list[ReadingSession]:
    """Four LIDC-style reading sessions of one series from its labels.json entry."""
    sessions = [ReadingSession(reader=f"reader{r + 1}") for r in range(N_READERS)]
    for j, nodule in enumerate(entry["nodules"]):
        for session in sessions:
            mark = _read_nodule(j, nodule, entry, sop_uids, zs, rng)
            if mark is not None:
                session.marks.append(mark)
    ends = _vessel_ends(entry)
    for session in sessions:
        count = min(int(rng.integers(0, 3)), len(ends))
        picks = sorted(rng.choice(len(ends), size=count, replace=False)) if count else []
        for m, p in enumerate(picks):
            k, i, j = ends[p]
            session.marks.append(Mark("non_nodule", f"Non-nodule {m + 1:03d}",
                                      (Roi(zs[k], sop_uids[k], ((j, i),)),)))
    return sessions


def _json(obj, level: int = 0) -> str:
    """JSON with one indent per level like json.dumps(indent=1), but lists of plain values
    on one line: labels.json holds thousands of vessel segments per series."""
    pad, end = " " * (level + 1), "\n" + " " * level
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(k)}: {_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + end + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + _json(v, level + 1) for v in obj) + end + "]"
    return json.dumps(obj)


@dataclass(frozen=True)
class _SeriesWriter:
    """Writes patient i's series (picklable, for a process pool): every patient draws from
    its own seeded stream, so the files do not depend on the number of workers."""

    out: str
    seed: int
    family: str
    slices: int
    size: int
    slice_thickness: float | None = None

    def __call__(self, i: int) -> dict:
        spec = FAMILIES[self.family]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, i, *spec.stream]))
        signed = bool(rng.random() < 0.5)
        ph = spec.make(rng, self.slices, self.size, slice_thickness=self.slice_thickness)
        return write_series(Path(self.out), self.seed, i, ph, signed)


# What a synthesis was asked for, written before its first series and removed with its
# labels.json written: an interrupted run is continued only with the same request.
REQUEST_FILE = ".synth_request.json"


def _request(patients: int, slices: int, size: int, seed: int, family: str, slice_thickness: float | None) -> dict:
    return {"patients": patients, "slices": slices, "size": size, "seed": seed, "family": family,
            "slice_thickness": slice_thickness}


def _shape_text(request) -> str:
    if not isinstance(request, dict):
        return "unknown"
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in request.items() if v is not None)


def _refuse_other_dataset(out: Path, patients: int, slices: int, size: int, seed: int, family: str,
                          slice_thickness: float | None = None) -> None:
    """Writing into a folder that holds another dataset would mix two datasets under one
    labels.json that lists only the second: refuse anything but an empty folder or the same
    dataset again (same seed, family, patients and shape: the same files), finished or
    interrupted before its labels.json."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = {patient_id_of(seed, i, family) for i in range(patients)} | {REQUEST_FILE}
    labels_temp = re.compile(r"\.labels\.json\..*\.tmp")   # run.files.temp_path's, of a write cut short
    if not (out / "labels.json").exists() and all(p.name in ours or labels_temp.fullmatch(p.name)
                                                  for p in out.iterdir()):
        # interrupted before its labels.json: the same dataset again only where it was asked
        # with the same shape (its patients' folders are named alike whatever the shape)
        try:
            asked = json.loads((out / REQUEST_FILE).read_text())
        except (OSError, ValueError):
            asked = None
        if asked is None or asked == _request(patients, slices, size, seed, family, slice_thickness):
            return
        raise UserError(f"--out {out} holds an interrupted synthesis of another shape ({_shape_text(asked)}); "
                        f"give an empty or new folder, or delete {out} first (writing into it would mix the two)")
    what = "other files"
    try:
        old = json.loads((out / "labels.json").read_text())
        series = old["series"]
        same = (old.get("seed") == seed and old.get("family", "chest") == family and len(series) == patients
                and old.get("slice_thickness") == slice_thickness
                and all((e["num_slices"], e["rows"]) == (slices, size) for e in series))
        if same:
            return
        what = (f"another synthetic dataset ({len(series)} {old.get('family', 'chest')} series, seed "
                f"{old.get('seed')})")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise UserError(f"--out {out} already holds {what}; give an empty or new folder (writing into it "
                    "would mix two datasets)")


MIN_SLICE_THICKNESS, MAX_SLICE_THICKNESS = 0.25, 20.0


MAX_SLICES = 4096                 # clinical series hold up to ~2000 (thin-slice whole-body CT)
# peak memory of one phantom being built, per voxel of its series: about 19 float32 arrays
# of the volume's shape at once (measured: 64 -> 256 slices of 128 px add 233 MB of peak RSS)
SYNTH_BYTES_PER_VOXEL = 80


def check_request(patients: int, slices: int, size: int, workers: int = 1,
                  family: str = "chest", slice_thickness: float | None = None, workers_flag: bool = True) -> None:
    """Refuses, in one line, a dataset that cannot be written: bad shapes, or series too
    large for this machine's free memory (a worker would otherwise be killed without a word).
    `workers_flag`: the command has a --workers flag to name as a remedy (the demo has not)."""
    if family not in FAMILIES:
        raise UserError(f"--family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if patients < 1:
        raise UserError("--patients must be at least 1")
    if not 3 <= slices <= MAX_SLICES:
        raise UserError(f"--slices must be between 3 (a sample stacks slices z-1, z, z+1) and {MAX_SLICES}, "
                        f"not {slices}")
    if not 32 <= size <= 2048:
        raise UserError("--size must be between 32 and 2048 pixels")
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1")
    if slice_thickness is not None and not MIN_SLICE_THICKNESS <= slice_thickness <= MAX_SLICE_THICKNESS:
        raise UserError(f"--slice-thickness {slice_thickness:g} mm is outside {MIN_SLICE_THICKNESS:g}-"
                        f"{MAX_SLICE_THICKNESS:g} mm; clinical CT slices are 0.5-5 mm (LIDC-IDRI: mostly 1-2.5)")
    at_once = min(workers, patients)
    need = SYNTH_BYTES_PER_VOXEL * slices * size * size * at_once
    free = available_memory_bytes()
    if free is not None and need > free:
        raise UserError(f"--slices {slices} x --size {size} needs about {need / 1e9:.1f} GB to build "
                        f"{at_once} series at once, and {free / 1e9:.1f} GB is free; give fewer --slices, a "
                        f"smaller --size" + (" or fewer --workers" if at_once > 1 and workers_flag else ""))


def generate_dataset(out, patients: int, slices: int, size: int, seed: int = 0,
                     progress: bool = False, family: str = "chest", workers: int = 1,
                     slice_thickness: float | None = None) -> dict:
    """Write `patients` synthetic CT series of one phantom family under `out` with
    `workers` processes and return the labels (also written to <out>/labels.json).
    `slice_thickness` (mm) fixes the slice spacing (thin-slice CT such as LIDC-IDRI's
    1-2.5 mm); without it each phantom spreads its slices over its anatomy (0.625-5 mm)."""
    out = Path(out)
    check_request(patients, slices, size, workers, family, slice_thickness)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a folder")
    _refuse_other_dataset(out, patients, slices, size, seed, family, slice_thickness)
    out.mkdir(parents=True, exist_ok=True)
    remove_write_temps(out)   # a labels.json cut short (prep would list it as a file that is no DICOM)
    request = out / REQUEST_FILE
    request.write_text(_json(_request(patients, slices, size, seed, family, slice_thickness)) + "\n")
    writer = _SeriesWriter(str(out), seed, family, slices, size, slice_thickness)
    series = list(process_map(writer, range(patients), workers, "synth", progress, unit="patient"))
    labels = {"generator": "dinox synth", "seed": seed, "family": family,
              "conventions": family_conventions(family), "series": series}
    if slice_thickness is not None:
        labels["slice_thickness"] = slice_thickness
    atomic_write_text(out / "labels.json", _json(labels) + "\n")
    request.unlink(missing_ok=True)
    return labels
