"""Labelled validation (Phase 6): do the frozen features find nodules?

View retrieval (label-free) shows that two views of a slice match; it cannot show that the
features separate a nodule from a vessel. The field validates CT encoders with linear
probes on frozen features; this module does that on the labels `dinox prep` writes to
<processed root>/_labels/nodules.csv (LIDC-IDRI reader XML, or `dinox synth`'s simulated
readers) and, for synthetic phantoms, the vessel segments of `dinox synth`'s labels.json.

Labels (all documented in docs/phase5_big_run.md, "Labelled validation (probes)"):

- A **nodule** is a consensus region (`dinox.data.annotations.consensus`): on one slice,
  the pixels inside the outlines' boxes of at least `min_readers` (default 2) of the
  readers (LIDC-IDRI: 4); nodules under 3 mm (point marks) and non-nodules never count. A
  table without reader rows (only `dinox synth`'s ground truth) falls back to the truth
  rows, with a note.
- **Slice** (a 2.5D stack z-1, z, z+1): positive when slice z holds a consensus region;
  negative when no reader (nor the synthetic truth) marked any nodule, of any size, on
  any of the three slices; anything else is ambiguous and left out.
- **Patch** (a cell of the ViT's patch grid at the probe's input size: the training size
  unless `size` says otherwise; a larger size gives smaller cells, see `probe_size`): a nodule patch
  overlaps a consensus box by at least half of the smaller of the two (box or cell), or
  holds the box centre, so every region has one; it is a `patch_nodule` positive when at
  least `MIN_LUNG_FRACTION` (80 %) of it is lung or nodule. "Other lung" patches are at
  least as much lung (lung = low-HU pixels enclosed by the body, `lung_mask`) and touch no
  nodule mark of any reader: both classes lie in the lung, so that the share of chest wall
  or mediastinum in a cell cannot pass for nodule vs not (see MIN_LUNG_FRACTION).
  Vessel patches are such lung patches crossed, on slice z, by a labelled vessel segment
  at least `VESSEL_MIN_RADIUS_MM` thick (`dinox synth` only; LIDC has no vessel labels).
- Nodule type (LIDC texture 1-2 non-solid, 3 part solid, 4-5 solid; the generator's type
  for synthetic nodules) and malignancy (the readers' median rating, 1-2 / 3 / 4-5):
  multi-class on the mean nodule-patch token of each consensus region.

Probes: a scikit-learn pipeline of StandardScaler and LogisticRegression (L2, balanced
class weights), C chosen from `CS` by StratifiedGroupKFold cross-validation over training patients.
Train and test are disjoint by patient (`check_patient_disjoint`), always.

AUROC with a 95 % percentile interval from a cluster bootstrap (`dinox.eval.stats`):
`BOOTSTRAP` resamples of the test *patients* with replacement (slices and patches of a
patient are correlated, so resampling samples would make the interval too narrow); with fewer than
`MIN_BOOTSTRAP_PATIENTS` test patients the samples are resampled instead (recorded as the
bootstrap unit). The baselines (the same probe on the untrained network and on the
normalised input pixels of the same slices or patches) are scored on the same resamples,
so each baseline also gets a paired interval of its difference to the checkpoint.
"""
from __future__ import annotations

import json
import math
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinox.data.annotations import NODULES_TABLE, consensus, read_table
from dinox.data.augment import LUNG_WINDOW, fixed_window_input
from dinox.data.dataset import CTSliceDataset
from dinox.data.dicom_io import MAX_SLICE_SIZE
from dinox.data.layout import INDEX_FILE, default_manifest
from dinox.data.parallel import Progress
from dinox.data.splits import patient_split, read_split_manifest, split_patients
from dinox.errors import UserError
from dinox.eval.stats import (MIN_BOOTSTRAP_PATIENTS, auroc, bootstrap_weights, macro_auroc,
                               percentile_interval, score_with_ci)
from dinox.model.dino_model import build_dino_model

DEFAULT_MIN_AUROC = 0.7            # pass line of `dinox eval probe` on the gate tasks
GATE_TASKS = ("slice_nodule", "patch_nodule")
MIN_READERS = 2                    # LIDC's lenient consensus: >= 2 of the 4 readers
CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the C sweep (inverse L2 strength, standardised features)
CV_FOLDS = 3
BOOTSTRAP = 1000
REFIT_BOOTSTRAP = 0                # refit resamples (0: off; --refit-bootstrap)
DEFAULT_TEST_FRACTION = 0.3
DEFAULT_MAX_SLICES = 4096
LUNG_HU = -400.0                   # below: air or lung; above: tissue, bone (the body)
# Both patch classes must be at least this much lung (a nodule counts as lung). At 0.5 a
# cell could be half chest wall: that tissue outweighs a nodule of a few pixels, so the
# probes ranked cells by their wall share, and on the demo data (chest seed 0) the pixel
# probe scored 0.394, below chance, because the test side's nodule cells held less wall
# than its other-lung cells while the training side's held more; at 0.8 it scores 0.606
# (docs/recipes.md, "The patch task's chest-wall confound").
MIN_LUNG_FRACTION = 0.8
VESSEL_MIN_RADIUS_MM = 1.0         # thinner vessels vanish under CT's ~0.7-4 mm pixels
LUNG_PATCHES_PER_SLICE = 4         # other-lung negatives drawn per slice
VESSEL_PATCHES_PER_SLICE = 4
SLICE_PIXELS = 16                  # pixel baseline of a slice: the input pooled to 3x16x16
PATCH_PIXELS = 8                   # ... of a patch: its pixels, pooled to at most 3x8x8
# the patch tasks' reference: local features a blob detector would use (see hand_features)
HAND_FEATURES = ("mean", "max", "std", "blob", "z_contrast")
BLOB_SIGMA = 1.0                   # pixels of the probe input: bright blobs of ~3 px
NODULE_KINDS = ("nodule", "small_nodule")
TEXTURE_CLASSES = {1: "non_solid", 2: "non_solid", 3: "part_solid", 4: "solid", 5: "solid"}
MALIGNANCY_CLASSES = {1: "low", 2: "low", 3: "indeterminate", 4: "high", 5: "high"}
MIN_CLASS_TRAIN = 3                # a class needs this many training samples to be probed


# --------------------------------------------------------------------------- labels

@dataclass
class ProbeLabels:
    """What the table (and labels.json) says about every annotated series."""

    regions: dict[tuple[str, int], list[dict]]       # consensus regions per (series, slice)
    marks: dict[tuple[str, int], list[tuple]]         # every nodule mark's box (r0, c0, r1, c1)
    series: set[str]                                  # series with at least one table row
    patient_of: dict[str, str]
    vessels: dict[str, np.ndarray]                    # series -> (K, 8) labels.json segments
    rule: str
    notes: list[str] = field(default_factory=list)


def _median_rating(values: list[str]) -> int | None:
    nums = [int(float(v)) for v in values if str(v).strip() not in ("", "nan")]
    return math.floor(float(np.median(nums)) + 0.5) if nums else None   # half up, as LIDC tools round


def _overlap(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _characterise(regions: dict, rows: list[dict]) -> None:
    """Adds `texture` and `malignancy` to each region: the generator's type where a
    synthetic truth row overlaps it, else the median over the readers who marked it."""
    by_mark = defaultdict(list)
    truth = defaultdict(list)
    for r in rows:
        key = (r["series_id"], int(float(r["slice_index"])))
        if r["source"] == "synth":
            truth[key].append(r)
        else:
            by_mark[(*key, r["reader"], r["nodule_id"])].append(r)
    for key, found in regions.items():
        for reg in found:
            box = (reg["row0"], reg["col0"], reg["row1"], reg["col1"])
            mine = [m for mark in reg["marks"] for m in by_mark.get((*key, *mark.split(":", 1)), [])]
            reg["texture"] = _median_rating([m["texture"] for m in mine])
            reg["malignancy"] = _median_rating([m["malignancy"] for m in mine])
            for t in truth.get(key, []):
                tbox = tuple(int(float(t[k])) for k in ("row0", "col0", "row1", "col1"))
                if _overlap(box, tbox) and str(t["texture"]).strip():
                    reg["texture"] = int(float(t["texture"]))
                    break


def _vessel_files(rows: list[dict], labels_json) -> list[Path]:
    if labels_json is not None:
        path = Path(labels_json)
        if path.is_dir():
            inside = path / "labels.json"
            raise UserError(f"--labels-json {path} is a folder; give the labels.json file `dinox synth` wrote"
                            + (f" ({inside})" if inside.is_file() else ""))
        if not path.is_file():
            raise UserError(f"--labels-json {path} does not exist; give the labels.json `dinox synth` wrote")
        return [path]
    # synth truth rows name the labels.json they came from
    return sorted({Path(r["file"]) for r in rows if r["source"] == "synth" and r["file"]})


def _vessel_segments(path: Path) -> tuple[dict[str, np.ndarray], set[str]] | str:
    """({series uid: (K, 8) vessel segments}, every series uid) of a `dinox synth`
    labels.json, or why the file is not one (phrased to follow "the file:")."""
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"not readable JSON ({type(exc).__name__})"
    if not isinstance(labels, dict) or not isinstance(labels.get("series"), list):
        return "no \"series\" list, so not a labels.json of `dinox synth`"
    vessels = {}
    for k, entry in enumerate(labels["series"]):
        if not isinstance(entry, dict) or "series_uid" not in entry:
            return f"series entry {k} is not an object with a series_uid"
        segs = entry.get("vessels")
        if not segs:
            continue
        try:
            vessels[str(entry["series_uid"])] = np.asarray(segs, np.float64).reshape(-1, 8)
        except (TypeError, ValueError):
            return f"the vessels of series {entry['series_uid']} are not segments of 8 numbers"
    return vessels, {str(entry["series_uid"]) for entry in labels["series"]}


def load_labels(root: Path, min_readers: int = MIN_READERS, labels_json=None) -> ProbeLabels:
    """Consensus regions, every nodule mark, and the vessel segments where labels.json is at hand."""
    if min_readers < 1:
        raise UserError(f"--min-readers {min_readers}: give at least 1")
    path = Path(root) / NODULES_TABLE
    if not path.is_file():
        raise UserError(f"no nodule labels at {path}; run `dinox prep` on CT series with LIDC XML "
                        f"annotations beside them (or on `dinox synth` output)")
    try:
        rows = read_table(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable label table {path} ({exc}); re-run `dinox prep`") from None
    notes = []
    if any(r["source"] == "lidc-xml" for r in rows):
        readers = defaultdict(set)
        for r in rows:
            if r["source"] == "lidc-xml":
                readers[r["series_id"]].add(r["reader"])
        most = max(len(v) for v in readers.values())
        if min_readers > most:
            raise UserError(f"--min-readers {min_readers}: no series has more than {most} readers (LIDC has 4), so "
                            f"no nodule could reach consensus; give at most {most}")
        found = consensus(rows, min_readers=min_readers)
        rule = f"nodule where >= {min_readers} readers marked it (consensus of reader outlines)"
    else:
        found = consensus(rows, min_readers=1, sources=("synth",))
        rule = "nodule of the synthetic ground truth (the table has no reader rows)"
        notes.append("the label table has no reader rows; the probe uses dinox synth's ground truth")
    regions: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for reg in found:
        regions[(reg["series_id"], reg["slice_index"])].append(reg)
    _characterise(regions, rows)
    marks: dict[tuple[str, int], list[tuple]] = defaultdict(list)
    for r in rows:
        if r["kind"] in NODULE_KINDS:
            marks[(r["series_id"], int(float(r["slice_index"])))].append(
                tuple(int(float(r[k])) for k in ("row0", "col0", "row1", "col1")))
    vessels = {}
    for vf in _vessel_files(rows, labels_json):
        found_here = _vessel_segments(vf)
        if labels_json is not None and isinstance(found_here, tuple) and not found_here[1] & {
                r["series_id"] for r in rows}:
            found_here = "it describes none of the label table's series (the labels of another root?)"
        if isinstance(found_here, tuple):
            found_here = found_here[0]
        if isinstance(found_here, str):
            if labels_json is not None:
                raise UserError(f"--labels-json {vf}: {found_here}; give the labels.json `dinox synth` wrote "
                                f"for this root")
            notes.append(f"vessel labels {vf} unusable ({found_here}); nodule-vs-vessel skipped for its series")
            continue
        vessels.update(found_here)
    return ProbeLabels(regions=dict(regions), marks=dict(marks), series={r["series_id"] for r in rows},
                       patient_of={r["series_id"]: r["patient_id"] for r in rows}, vessels=vessels,
                       rule=rule, notes=notes)


def slice_label(labels: ProbeLabels, series_id: str, z: int, span: tuple[int, int]) -> int | None:
    """1: slice z holds a consensus nodule; 0: no nodule mark on the slices the stack spans
    (`span`: its lower and upper neighbour, `CTSliceDataset.stack_span`, and every slice
    between); None: ambiguous (a mark without consensus, or a nodule off slice z)."""
    if labels.regions.get((series_id, z)):
        return 1
    for k in range(span[0], span[1] + 1):
        if labels.marks.get((series_id, k)):
            return None
    return 0


# --------------------------------------------------------------------------- split

@dataclass
class ProbeSplit:
    train: list[str]
    test: list[str]
    mode: str                       # "manifest-val" or "patients"
    patient_of: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def patients(self, side: str) -> list[str]:
        return sorted({self.patient_of[s] for s in getattr(self, side)})


def check_patient_disjoint(train_patients, test_patients, what: str = "the probe") -> None:
    """Raises UserError naming a patient found on both sides (the probe would see the
    patient it is tested on)."""
    shared = sorted(set(train_patients) & set(test_patients))
    if shared:
        raise UserError(f"{what} puts {len(shared)} patient(s) on both the training and the test side "
                        f"(e.g. {shared[0]}); split by patient (e.g. re-run `dinox prep`, or --split patients)")


def _has_positive(series: list[str], labels: ProbeLabels) -> bool:
    wanted = set(series)
    return any(sid in wanted for sid, _ in labels.regions)


def choose_split(labels: ProbeLabels, index_patient: dict[str, str], *, mode: str = "auto", manifest=None,
                 root: Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> ProbeSplit:
    """Train/test series of the annotated series, split by patient.

    mode "val": the split manifest's val series are the test side, its train series the
    training side (series of the manifest's val split never trained the checkpoint's
    SSL either). mode "patients": a seeded patient split of all annotated series
    (`dinox.data.splits.patient_split`, test_fraction of the patients). "auto": "val"
    when the manifest exists and both sides hold consensus nodules, else "patients"."""
    if mode not in ("auto", "val", "patients"):
        raise UserError(f"--split {mode!r}: choose auto, val or patients")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction}: give a fraction between 0 and 1")
    patient_of = {s: index_patient[s] for s in labels.series if s in index_patient}
    if not labels.series:
        raise UserError("the label table holds no annotated series (no reader marked a nodule); the probe needs "
                        "CT series with LIDC XML annotations beside them (or `dinox synth` output) run through "
                        "`dinox prep`")
    if not patient_of:
        raise UserError("no annotated series of the label table is in the index; re-run `dinox prep`")
    notes = []
    path = Path(manifest) if manifest is not None else (default_manifest(root) if root is not None else None)
    if mode in ("auto", "val") and path is not None and path.is_file():
        sides = read_split_manifest(path, index_patient)
        if "train" not in sides or "val" not in sides:
            raise UserError(f'split manifest {path} needs both a "train" and a "val" list for the probe; give '
                            f"one that has both, or use --split patients")
        train = sorted(s for s in sides["train"] if s in patient_of)
        test = sorted(s for s in sides["val"] if s in patient_of)
        if _has_positive(train, labels) and _has_positive(test, labels):
            left = len(patient_of) - len(train) - len(test)
            if left:
                notes.append(f"{left} annotated series are in neither side of {path.name}; left out")
            return ProbeSplit(train, test, "manifest-val", patient_of, notes)
        if mode == "val":
            raise UserError(f"the val split of {path} holds {len(test)} annotated series, not enough with "
                            f"consensus nodules on both sides; use --split patients")
        notes.append(f"the val split of {path.name} lacks consensus nodules on one side; "
                     f"seeded patient split instead")
    elif mode == "val":
        raise UserError(f"split manifest {path} not found; give --split-manifest or use --split patients")
    split = patient_split(patient_of, test_fraction, seed)
    result = ProbeSplit(sorted(split["train"]), sorted(split["val"]), "patients", patient_of, notes)
    check_patient_disjoint(result.patients("train"), result.patients("test"))
    if not (_has_positive(result.train, labels) and _has_positive(result.test, labels)):
        raise UserError(f"the patient split (--seed {seed}, --test-fraction {test_fraction:g}) of "
                        f"{len(result.patients('train')) + len(result.patients('test'))} annotated patients puts "
                        f"consensus nodules on one side only; try another --seed or --test-fraction, or prepare "
                        f"more labelled series")
    return result


# --------------------------------------------------------------------------- geometry

def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Lung (and airway) pixels of one slice: below LUNG_HU and enclosed by the body, so the
    air around the patient never counts."""
    from scipy import ndimage  # a dependency of scikit-learn

    body = hu > LUNG_HU
    return ndimage.binary_fill_holes(body) & ~body


def cell_overlap(box, shape: tuple[int, int], grid: int) -> np.ndarray:
    """(grid, grid) pixel area each patch cell shares with an inclusive pixel box
    (r0, c0, r1, c1) of an image of `shape` (cells span H/grid x W/grid pixels)."""
    h, w = shape
    edges_r = np.arange(grid + 1) * h / grid
    edges_c = np.arange(grid + 1) * w / grid
    r = np.clip(np.minimum(edges_r[1:], box[2] + 1) - np.maximum(edges_r[:-1], box[0]), 0, None)
    c = np.clip(np.minimum(edges_c[1:], box[3] + 1) - np.maximum(edges_c[:-1], box[1]), 0, None)
    return r[:, None] * c[None, :]


def nodule_cells(box, shape: tuple[int, int], grid: int) -> np.ndarray:
    """Boolean (grid, grid): cells overlapping the box by at least half the smaller of
    box and cell, plus the cell holding the box centre."""
    h, w = shape
    area = cell_overlap(box, shape, grid)
    box_area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    cells = area >= 0.5 * min(box_area, (h / grid) * (w / grid))
    ci = min(int(((box[0] + box[2] + 1) / 2.0) * grid / h), grid - 1)
    cj = min(int(((box[1] + box[3] + 1) / 2.0) * grid / w), grid - 1)
    cells[ci, cj] = True
    return cells


def vessel_points(segments: np.ndarray) -> np.ndarray:
    """(P, 4) points (z, y, x in voxel indices, radius mm) sampled along each segment at
    least twice per voxel, keeping those at least VESSEL_MIN_RADIUS_MM thick."""
    if segments.size == 0:
        return np.zeros((0, 4))
    a, b, r0, r1 = segments[:, 0:3], segments[:, 3:6], segments[:, 6], segments[:, 7]
    steps = np.maximum(2, np.ceil(2.0 * np.abs(b - a).max(1)).astype(int) + 1)
    out = []
    for k in range(len(segments)):
        if max(r0[k], r1[k]) < VESSEL_MIN_RADIUS_MM:
            continue
        t = np.linspace(0.0, 1.0, steps[k])[:, None]
        pts = a[k] + t * (b[k] - a[k])
        rad = r0[k] + t[:, 0] * (r1[k] - r0[k])
        out.append(np.column_stack([pts, rad]))
    pts = np.concatenate(out) if out else np.zeros((0, 4))
    return pts[pts[:, 3] >= VESSEL_MIN_RADIUS_MM]


def vessel_cells(points: np.ndarray, z: int, shape: tuple[int, int], grid: int) -> np.ndarray:
    """Boolean (grid, grid): cells crossed by a vessel point within half a slice of z."""
    cells = np.zeros((grid, grid), bool)
    h, w = shape
    near = points[np.abs(points[:, 0] - z) <= 0.5]
    inside = near[(near[:, 1] >= -0.5) & (near[:, 1] < h - 0.5) & (near[:, 2] >= -0.5) & (near[:, 2] < w - 0.5)]
    if len(inside):
        i = np.clip(((inside[:, 1] + 0.5) * grid / h).astype(int), 0, grid - 1)
        j = np.clip(((inside[:, 2] + 0.5) * grid / w).astype(int), 0, grid - 1)
        cells[i, j] = True
    return cells


# --------------------------------------------------------------------------- samples

@dataclass
class PatchRecord:
    slice_pos: int                   # into ProbeData.slices
    cell: int                        # row-major index into the patch grid
    nodule: bool = False             # a nodule cell of a consensus region
    in_lung: bool = False            # ... at least MIN_LUNG_FRACTION lung (or nodule): a patch_nodule positive
    lung: bool = False               # an "other lung" negative
    vessel: bool = False
    region: int | None = None        # index into ProbeData.regions


@dataclass
class SliceRecord:
    index: int                       # dataset sample index
    series_id: str
    patient: str
    z: int
    side: str                        # "train" or "test"
    label: int | None


@dataclass
class ProbeData:
    slices: list[SliceRecord] = field(default_factory=list)
    patches: list[PatchRecord] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)   # with slice_pos, texture, malignancy
    features: dict = field(default_factory=dict)         # name -> {"cls", "mean", "tokens"} arrays
    pixels: dict = field(default_factory=dict)           # "slice", "patch" arrays

    def region_patch_rows(self) -> list[list[int]]:
        """Per region, the rows in `patches` of its nodule cells."""
        index = {(p.slice_pos, p.cell): i for i, p in enumerate(self.patches)}
        return [[index[(reg["slice_pos"], c)] for c in reg["cells"]] for reg in self.regions]


def select_slices(dataset: CTSliceDataset, labels: ProbeLabels, split: ProbeSplit, max_slices: int,
                  seed: int) -> list[SliceRecord]:
    """Every slice of the split's series, or at most max_slices of them: the positives (up
    to half the budget), then negatives and ambiguous slices at random."""
    side = {s: "train" for s in split.train} | {s: "test" for s in split.test}
    records = []
    ranges = dataset.series_ranges()
    for sid in sorted(side):
        rng_ = ranges.get(sid)
        if rng_ is None:
            continue
        for z, i in enumerate(rng_):
            records.append(SliceRecord(i, sid, split.patient_of[sid], z, side[sid],
                                       slice_label(labels, sid, z, dataset.stack_span(i))))
    if len(records) <= max_slices:
        return records
    rnd = random.Random(seed)
    pos = [r for r in records if r.label == 1]
    rest = [r for r in records if r.label != 1]
    rnd.shuffle(pos)
    rnd.shuffle(rest)
    keep = pos[: max_slices // 2]
    keep += rest[: max_slices - len(keep)]
    return sorted(keep, key=lambda r: r.index)


def plan_patches(data: ProbeData, pos: int, hu_center: np.ndarray, labels: ProbeLabels, grid: int,
                 vessel_pts: np.ndarray | None, rnd: random.Random, span: tuple[int, int] | None = None) -> None:
    """Patch records of one slice: its nodule cells, a few other-lung and vessel cells.
    No cell under a mark on any slice the stack spans (`span`, as `slice_label`; slice z
    alone where None) is a negative: the network sees the neighbour slices too, so a nodule
    there is in its input."""
    rec = data.slices[pos]
    shape = hu_center.shape
    key = (rec.series_id, rec.z)
    mask = lung_mask(hu_center)
    with_nodules = mask.copy()   # a nodule is lung tissue for the "in the lung" test of its cell
    for reg in labels.regions.get(key, []):
        with_nodules[reg["row0"]:reg["row1"] + 1, reg["col0"]:reg["col1"] + 1] = True

    def pooled(m: np.ndarray) -> np.ndarray:
        return F.adaptive_avg_pool2d(torch.from_numpy(m).float()[None, None], grid)[0, 0].numpy()

    lung, lung_or_nodule = pooled(mask), pooled(with_nodules)
    touched = np.zeros((grid, grid), bool)
    first, last = span if span is not None else (rec.z, rec.z)
    near = [box for k in range(first, last + 1) for box in labels.marks.get((rec.series_id, k), [])]
    for box in near:   # a pixel of margin: outlines are drawn outside
        grown = (box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1)
        touched |= cell_overlap(grown, shape, grid) > 0
    chosen: dict[int, PatchRecord] = {}
    for reg in labels.regions.get(key, []):
        box = (reg["row0"], reg["col0"], reg["row1"], reg["col1"])
        cells = np.flatnonzero(nodule_cells(box, shape, grid))
        data.regions.append({"slice_pos": pos, "cells": cells.tolist(), "texture": reg.get("texture"),
                             "malignancy": reg.get("malignancy")})
        for c in cells:
            p = chosen.setdefault(int(c), PatchRecord(pos, int(c)))
            p.nodule = True
            p.in_lung = bool(lung_or_nodule.flat[c] >= MIN_LUNG_FRACTION)
            p.region = p.region if p.region is not None else len(data.regions) - 1
    clean = ((lung >= MIN_LUNG_FRACTION) & ~touched).ravel()
    lung_cells = [c for c in np.flatnonzero(clean) if int(c) not in chosen]
    for c in rnd.sample(lung_cells, min(LUNG_PATCHES_PER_SLICE, len(lung_cells))):
        chosen.setdefault(int(c), PatchRecord(pos, int(c))).lung = True
    if vessel_pts is not None:
        vcells = [c for c in np.flatnonzero(vessel_cells(vessel_pts, rec.z, shape, grid).ravel() & clean)
                  if not chosen.get(int(c), PatchRecord(0, 0)).nodule]
        for c in rnd.sample(vcells, min(VESSEL_PATCHES_PER_SLICE, len(vcells))):
            chosen.setdefault(int(c), PatchRecord(pos, int(c))).vessel = True
    data.patches.extend(chosen[c] for c in sorted(chosen))


def model_input(stacks: torch.Tensor, cfg, size: int) -> torch.Tensor:
    """The training preprocessing, deterministic: resize the HU stack to the training
    size (as the training crops are), then the lung window with the run's normalisation."""
    hu = stacks.float()
    h, w = hu.shape[-2:]
    if (h, w) != (size, size):
        hu = F.interpolate(hu, size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(h, w))
    return fixed_window_input(hu, cfg.views.to_augment(), LUNG_WINDOW)


def _pool_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    return (F.adaptive_avg_pool2d(x, size) if x.shape[-1] > size else x).flatten(1)


def patch_cells(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, grid*grid, C, patch, patch): the pixels of each patch cell, in the
    row-major cell order of the ViT's patch tokens."""
    b, c, h, w = x.shape
    cells = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, (h // patch) * (w // patch), c, patch, patch)


def _blob_kernel(sigma: float) -> torch.Tensor:
    """(1, 1, k, k) negative Laplacian of Gaussian, zero-sum: positive on bright blobs of
    radius ~sigma * sqrt(2)."""
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    d2 = t[:, None] ** 2 + t[None, :] ** 2
    k = -(d2 - 2 * sigma ** 2) / sigma ** 4 * torch.exp(-d2 / (2 * sigma ** 2))
    return (k - k.mean())[None, None]


def hand_features(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, grid*grid, 5) local features of each patch cell of a (B, 3, S, S) 2.5D input,
    named by HAND_FEATURES: the centre slice's mean, max and std, the max of a blob filter
    (negative LoG, BLOB_SIGMA px) and the max of |centre - mean of the neighbour slices| (a
    nodule ends within a few slices, a vessel runs on). The reference of the patch tasks:
    what a linear probe on raw pixels cannot read (a blob of a few pixels lands anywhere in
    its cell) and a local detector can."""
    centre = x[:, 1:2].float()
    kernel = _blob_kernel(BLOB_SIGMA).to(x.device)
    pad = kernel.shape[-1] // 2
    blob = F.conv2d(F.pad(centre, (pad,) * 4, mode="replicate"), kernel)
    z_contrast = (centre - 0.5 * (x[:, 0:1] + x[:, 2:3]).float()).abs()

    def cells(a: torch.Tensor) -> torch.Tensor:   # (B, 1, S, S) -> (B, cells, patch * patch)
        return patch_cells(a, patch).flatten(2)

    c = cells(centre)
    return torch.stack([c.mean(-1), c.amax(-1), c.std(-1), cells(blob).amax(-1), cells(z_contrast).amax(-1)], -1)


@torch.no_grad()
def embed(networks: dict, dataset: CTSliceDataset, data: ProbeData, labels: ProbeLabels, cfg, *, device, size: int,
          batch_size: int = 64, seed: int = 0, progress: bool = False) -> None:
    """One pass over the selected slices at input `size` (see `probe_size`): plans the
    patches of each slice and fills data.features[name] (cls, mean patch token, tokens of
    the planned patches, float32) for every network, and data.pixels (the normalised input
    of the same slices/patches). `progress`: a bar, or timed lines, as in `runner.embed_views`."""
    patch = cfg.model.vit_patch
    grid = size // patch
    rnd = random.Random(seed)
    vessel_pts = {sid: vessel_points(segs) for sid, segs in labels.vessels.items()}
    feats = {name: {"cls": [], "mean": [], "tokens": []} for name in networks}
    pix_slice, pix_patch, hand = [], [], []
    bar = Progress(len(data.slices), "probe: embedding", "slice", progress)
    try:
        for start in range(0, len(data.slices), batch_size):
            chunk = range(start, min(start + batch_size, len(data.slices)))
            first_patch = len(data.patches)
            raw = [dataset[data.slices[p].index] for p in chunk]
            for p, stack in zip(chunk, raw):
                rec = data.slices[p]
                plan_patches(data, p, stack[1].numpy().astype(np.float32), labels, grid, vessel_pts.get(rec.series_id),
                             rnd, dataset.stack_span(rec.index))
            planned = data.patches[first_patch:]
            b_of = torch.tensor([q.slice_pos - start for q in planned], dtype=torch.long, device=device)
            c_of = torch.tensor([q.cell for q in planned], dtype=torch.long, device=device)
            x = torch.cat([model_input(s[None], cfg, size) for s in raw]).to(device)
            pix_slice.append(_pool_pixels(x, SLICE_PIXELS).cpu())
            if planned:
                pix_patch.append(_pool_pixels(patch_cells(x, patch)[b_of, c_of], PATCH_PIXELS).cpu())
                hand.append(hand_features(x, patch)[b_of, c_of].cpu())
            for name, net in networks.items():
                out = net(x)
                tokens = out["patches"].float()
                feats[name]["cls"].append(out["cls"].float().cpu())
                feats[name]["mean"].append(tokens.mean(1).cpu())
                if planned:
                    feats[name]["tokens"].append(tokens[b_of, c_of].cpu())
            bar.update(len(chunk))
    finally:
        bar.close()

    def cat(parts, dim):
        return torch.cat(parts).numpy() if parts else np.zeros((0, dim), np.float32)

    for name, f in feats.items():
        d = f["cls"][0].shape[-1] if f["cls"] else 0
        data.features[name] = {k: cat(v, d) for k, v in f.items()}
    data.pixels = {"slice": cat(pix_slice, 3 * SLICE_PIXELS ** 2),
                   "patch": cat(pix_patch, 3 * min(patch, PATCH_PIXELS) ** 2),
                   "hand": cat(hand, len(HAND_FEATURES))}


# --------------------------------------------------------------------------- probes

def _probe_pipeline(c: float, seed: int, balanced: bool = True):
    """Standardise + L2 logistic regression; `balanced` weighs each class to the same total."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(
        C=c, max_iter=2000, class_weight="balanced" if balanced else None, random_state=seed))


def _best_c(cv_results: dict) -> int:
    """The index of the C whose folds score best on average, folds that could not be scored
    (NaN: a fold without one of the classes) left out; C = 1 where no fold could be.
    GridSearchCV's own mean is NaN for every C as soon as one fold is, and it then takes
    the first C of the grid, the strongest regularisation, as if the sweep had chosen it."""
    folds = sorted(k for k in cv_results if k.startswith("split") and k.endswith("_test_score"))
    scores = np.array([cv_results[k] for k in folds], np.float64)          # (folds, len(CS))
    finite = np.isfinite(scores)
    if not finite.any():
        return CS.index(1.0)
    counts = finite.sum(axis=0)
    mean = np.where(counts > 0, np.where(finite, scores, 0.0).sum(axis=0) / np.maximum(counts, 1), -np.inf)
    return int(np.argmax(mean))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, x_test: np.ndarray,
              groups_test: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, float, list, str | None]:
    """Standardise + L2 logistic regression, C from CS by cross-validation over training
    patients (StratifiedGroupKFold: each fold keeps whole patients and, as far as they
    allow, every class). Returns ((n_test, K) class probabilities, columns in `classes`
    order; C; classes; None where the sweep chose C, else why C is 1). Refuses groups on
    both sides: the patient-level split is checked here too."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from threadpoolctl import threadpool_limits

    if groups_test is not None:
        check_patient_disjoint(set(np.asarray(groups_train).tolist()), set(np.asarray(groups_test).tolist()))
    classes = sorted(set(np.asarray(y_train).tolist()))
    if len(classes) < 2:
        raise ValueError("the training side holds one class only")
    pipe = _probe_pipeline(1.0, seed)
    folds = min(CV_FOLDS, len(set(np.asarray(groups_train).tolist())))
    note = ("no cross-validation fold could be scored (each lacked one of the classes on one side): C = 1, "
            "not chosen" if folds >= 2 else "one training patient, no cross-validation: C = 1, not chosen")
    # one BLAS thread: these fits are small, and threads only contend (3-4x slower measured
    # on a busy 2-core machine); a fold without one of the classes scores NaN, quietly, and
    # `_best_c` leaves it out
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        if folds >= 2:
            # the log loss over every class of the task: a fold whose training part lacks one
            # cannot be scored (NaN), rather than scored on fewer columns
            scoring = "roc_auc" if len(classes) == 2 else (
                lambda est, x, y: -log_loss(y, est.predict_proba(x), labels=classes))
            search = GridSearchCV(pipe, {"logisticregression__C": list(CS)}, cv=StratifiedGroupKFold(n_splits=folds),
                                  scoring=scoring, error_score=np.nan, refit=_best_c)
            try:
                search.fit(x_train, y_train, groups=groups_train)
                if np.isfinite([search.cv_results_[f"split{k}_test_score"] for k in range(folds)]).any():
                    note = None
            except ValueError:   # every fold's training part held one class: no fit at all
                pass
        if note is None:
            model, c = search.best_estimator_, float(search.best_params_["logisticregression__C"])
        else:
            model, c = pipe.set_params(logisticregression__C=1.0).fit(x_train, y_train), 1.0
        proba = model.predict_proba(x_test)
    return proba, c, classes, note


def refit_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float,
                 train_counts: np.ndarray, test_counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """AUROC of a binary probe refitted on each resample of its training side and scored on
    the paired resample of its test side: (R,) for (R, n_train) and (R, n_test) resample
    counts. A count k weighs a sample as k copies of it (StandardScaler and
    LogisticRegression both take sample weights; the classes are balanced over the weighted
    resample, as class_weight "balanced" does over the copies); C stays at the value the
    cross-validation chose on the whole training side. A resample whose training side holds
    one class scores NaN. Unlike the test-side bootstrap, this interval also holds the
    probe's own variance: which patients it was fitted on."""
    from threadpoolctl import threadpool_limits

    out = np.full(len(train_counts), np.nan)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        for r, (w_train, w_test) in enumerate(zip(train_counts, test_counts)):
            keep = w_train > 0
            y, w = y_train[keep], w_train[keep]
            classes = np.unique(y)
            if len(classes) < 2:
                continue
            totals = {k: w[y == k].sum() for k in classes.tolist()}
            balance = np.array([w.sum() / (len(classes) * totals[k]) for k in y.tolist()])
            model = _probe_pipeline(c, seed, balanced=False).fit(
                x_train[keep], y, standardscaler__sample_weight=w, logisticregression__sample_weight=w * balance)
            out[r] = auroc(model.predict_proba(x_test)[:, 1], y_test, w_test[None])[0]
    return out


@dataclass
class Task:
    name: str
    what: str
    feature: str                          # "cls", "cls_mean", "tokens", "region"
    level: str                            # "slice", "patch", "region"
    rows: np.ndarray                      # indices into slices / patches / regions
    y: np.ndarray
    side: np.ndarray                      # "train" / "test"
    groups: np.ndarray                    # patient per sample
    class_names: dict | None = None


def build_tasks(data: ProbeData, vessel_labels: bool = False) -> tuple[list[Task], dict[str, str]]:
    """The probe tasks the labels allow, and why any other was skipped."""
    tasks, skipped = [], {}
    sl = data.slices
    idx = np.array([i for i, r in enumerate(sl) if r.label is not None], dtype=int)
    y = np.array([sl[i].label for i in idx], dtype=int)
    side = np.array([sl[i].side for i in idx])
    groups = np.array([sl[i].patient for i in idx])
    for name, feature, what in (
        ("slice_nodule", "cls", "2.5D slice holds a consensus nodule; class token"),
        ("slice_nodule_cls_meanpatch", "cls_mean",
         "2.5D slice holds a consensus nodule; class token + mean patch token"),
    ):
        tasks.append(Task(name, what, feature, "slice", idx, y, side, groups))
    pt = data.patches

    def patch_task(name, what, pos_of, neg_of):
        rows = np.array([i for i, p in enumerate(pt) if pos_of(p) or neg_of(p)], dtype=int)
        has_pos, has_neg = any(pos_of(pt[i]) for i in rows), any(neg_of(pt[i]) for i in rows)
        if not (has_pos and has_neg):
            missing = "positive" if not has_pos else "negative"
            skipped[name] = (f"no {missing} patch cell at this input size (both classes need cells at least "
                             f"{MIN_LUNG_FRACTION:.0%} lung; a larger --size gives smaller cells)")
            return
        tasks.append(Task(name, what, "tokens", "patch", rows, np.array([int(pos_of(pt[i])) for i in rows]),
                          np.array([sl[pt[i].slice_pos].side for i in rows]),
                          np.array([sl[pt[i].slice_pos].patient for i in rows])))

    # both classes are lung patches, so that lung vs chest wall cannot stand in for nodule vs not
    patch_task("patch_nodule", "patch token inside a consensus nodule box vs other lung patch",
               lambda p: p.nodule and p.in_lung, lambda p: p.lung and not p.nodule)
    if any(p.vessel for p in pt):
        patch_task("patch_nodule_vs_vessel", "nodule patch vs lung patch crossed by a labelled vessel",
                   lambda p: p.nodule and p.in_lung, lambda p: p.vessel and not p.nodule)
    else:
        skipped["patch_nodule_vs_vessel"] = (
            f"no lung patch of the probed slices is crossed by a labelled vessel at least {VESSEL_MIN_RADIUS_MM} mm "
            f"in radius at this input size" if vessel_labels else
            "no vessel labels (dinox synth's labels.json) for these series")
    for name, key, mapping in (("nodule_type", "texture", TEXTURE_CLASSES),
                               ("nodule_malignancy", "malignancy", MALIGNANCY_CLASSES)):
        names = sorted(set(mapping.values()))
        pairs = [(k, names.index(mapping[r[key]])) for k, r in enumerate(data.regions) if r.get(key) in mapping]
        if not pairs:
            skipped[name] = f"no {key} ratings"
            continue
        rows = np.array([k for k, _ in pairs], dtype=int)
        yy = np.array([c for _, c in pairs], dtype=int)
        side_r = np.array([sl[data.regions[k]["slice_pos"]].side for k in rows])
        train_counts = np.bincount(yy[side_r == "train"], minlength=len(names))
        test_counts = np.bincount(yy[side_r == "test"], minlength=len(names))
        keep_classes = [c for c in range(len(names)) if train_counts[c] >= MIN_CLASS_TRAIN and test_counts[c] >= 1]
        if len(keep_classes) < 2:
            skipped[name] = (f"fewer than 2 {key} classes with >= {MIN_CLASS_TRAIN} training and 1 test region "
                             f"(train {dict(zip(names, train_counts.tolist()))}, "
                             f"test {dict(zip(names, test_counts.tolist()))})")
            continue
        mask = np.isin(yy, keep_classes)
        tasks.append(Task(name, f"{key} classes {', '.join(names[c] for c in keep_classes)} of consensus nodules; "
                          f"mean nodule-patch token (macro AUROC)", "region", "region", rows[mask], yy[mask],
                          side_r[mask], np.array([sl[data.regions[k]["slice_pos"]].patient for k in rows[mask]]),
                          {c: names[c] for c in keep_classes}))
    return tasks, skipped


def task_matrix(data: ProbeData, task: Task, source: str) -> np.ndarray:
    """Features of a task's samples from one source: a network's name, "pixels" or "hand"
    (the hand features of patch cells, `hand_features`)."""
    if task.level == "slice":
        if source == "hand":
            raise ValueError("the hand features describe patch cells, not slices")
        if source == "pixels":
            return data.pixels["slice"][task.rows]
        f = data.features[source]
        if task.feature == "cls":
            return f["cls"][task.rows]
        return np.concatenate([f["cls"][task.rows], f["mean"][task.rows]], 1)
    if source in ("pixels", "hand"):
        per_cell = data.pixels["patch" if source == "pixels" else "hand"]
    else:
        per_cell = data.features[source]["tokens"]
    if task.level == "region":
        cells = data.region_patch_rows()
        return np.stack([per_cell[cells[k]].mean(0) for k in task.rows])
    return per_cell[task.rows]


REFERENCE_NAMES = {"hand": "hand_features"}


def run_task(data: ProbeData, task: Task, sources: list[str], *, n_boot: int, seed: int,
             references: tuple[str, ...] = (), n_refit: int = REFIT_BOOTSTRAP) -> dict:
    """Fit the probe of one task on every source and score it with a shared bootstrap.
    sources[0] is the checkpoint, the others its baselines; `references` are scored the
    same way and reported apart (not part of any verdict). With `n_refit` > 0 a binary
    task also gets the refit interval ("refit"): training and test patients resampled
    together, the probe refitted each time (`refit_scores`), paired over the sources."""
    tr, te = task.side == "train", task.side == "test"
    y_tr, y_te = task.y[tr], task.y[te]
    for where, y in (("training", y_tr), ("test", y_te)):
        if len(set(y.tolist())) < 2:
            raise ValueError(f"one class only on the {where} side" if y.size else f"no samples on the {where} side")
    weights, unit = bootstrap_weights(task.groups[te], n_boot, seed)
    entry: dict = {"what": task.what, "n_train": int(tr.sum()), "n_test": int(te.sum()),
                   "n_train_patients": len(set(task.groups[tr].tolist())),
                   "n_test_patients": len(set(task.groups[te].tolist()))}
    if task.class_names is None:
        entry.update(n_train_pos=int(y_tr.sum()), n_test_pos=int(y_te.sum()))
    else:
        entry["classes"] = {name: {"train": int((y_tr == c).sum()), "test": int((y_te == c).sum())}
                            for c, name in task.class_names.items()}
    results, boots, refits = {}, {}, {}
    refit = n_refit > 0 and task.class_names is None
    if refit:
        train_counts, refit_unit = bootstrap_weights(task.groups[tr], n_refit, seed + 1)
        test_counts, _ = bootstrap_weights(task.groups[te], n_refit, seed + 2)
    for source in (*sources, *references):
        x = task_matrix(data, task, source)
        proba, c, classes, c_note = fit_probe(x[tr], y_tr, task.groups[tr], x[te], task.groups[te], seed)
        if refit:
            refits[source] = refit_scores(x[tr], y_tr, x[te], y_te, c, train_counts, test_counts, seed)
        if task.class_names is None:
            fn = lambda w, s=proba[:, 1]: auroc(s, y_te, w)
        else:
            fn = lambda w, s=proba, cl=classes: macro_auroc(s, y_te, cl, w)
        point, ci, boot = score_with_ci(fn, weights)
        # bootstrap_failed: resamples without one of the classes, left out of the interval
        results[source] = {"auroc": round(point, 4), "ci95": ci, "C": c, "dim": int(x.shape[1]),
                           "bootstrap_failed": int(np.isnan(boot).sum())}
        if c_note:
            results[source]["C_note"] = c_note
        boots[source] = boot
    main, *others = sources
    entry.update(results[main])
    def against(source: str) -> dict:
        base = dict(results[source])
        base["delta"] = round(entry["auroc"] - base["auroc"], 4)
        base["delta_ci95"] = percentile_interval(boots[main] - boots[source])
        if refit:
            base["delta_ci95_refit"] = percentile_interval(refits[main] - refits[source])
        return base

    entry["baselines"] = {source: against(source) for source in others}
    if references:
        entry["references"] = {REFERENCE_NAMES[source]: against(source) for source in references}
    entry["bootstrap_unit"] = unit
    if refit:
        entry["refit"] = {"resamples": n_refit, "ci95": percentile_interval(refits[main]),
                          "failed": int(np.isnan(refits[main]).sum()),
                          "training_unit": refit_unit.replace("test", "training")}
    return entry


# --------------------------------------------------------------------------- the whole probe

def untrained_backbone(cfg, device: torch.device):
    """The run's network at step 0: the trainer seeds torch with cfg.runtime.seed and
    then builds the student (the teacher starts as its copy), so the same two calls
    reproduce those weights."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device("cpu"):
        torch.manual_seed(cfg.runtime.seed)
        model = build_dino_model(cfg.model, img_size=cfg.views.img_size)
    backbone = model.backbone.to(device).eval()
    backbone.grad_checkpoint = False
    return backbone


def untrained_note(cfg) -> str | None:
    """What the untrained baseline is not, for a run started with --init-from: its step 0
    was those weights, but untrained_backbone rebuilds the random network they replaced, so
    a baseline beaten says the run beats random init, not that it improved on its start."""
    if not cfg.io.init_from:
        return None
    return (f"the run was warm-started from {cfg.io.init_from} (--init-from); the untrained baseline is a "
            f"random network of its shape, not that starting point")


def probe_size(cfg, size: int | None) -> int:
    """The probe's input size: the training size by default. A ViT takes any multiple of its
    patch (the position embeddings are interpolated), and a larger input gives smaller patch
    cells: nodules of a few millimetres cover a few pixels of a CT slice resized to 64-224 px,
    so a patch-level probe may need the slices nearer their stored resolution."""
    size = cfg.views.img_size if size is None else int(size)
    patch = cfg.model.vit_patch
    if size < patch or size % patch:
        raise UserError(f"--size {size}: give a multiple of the model's patch size {patch} (e.g. "
                        f"{max(patch, round(size / patch) * patch)}; the run trained at {cfg.views.img_size})")
    largest = max(MAX_SLICE_SIZE, cfg.views.img_size)   # 100000 px at patch 8: 1.6e8 tokens an image
    if size > largest:
        raise UserError(f"--size {size}: give at most {largest} px (CT slices are stored at 512 or 1024 px, and a "
                        f"larger input adds no detail; the run trained at {cfg.views.img_size})")
    return size


def _check_slices_in_volumes(labels: ProbeLabels, depth: dict[str, int], root: Path) -> None:
    """Notes the nodule marks whose slice lies outside its prepared volume (they can never be
    probed), and refuses a table in which every mark of an indexed series does: its labels
    belong to other volumes than the root holds."""
    keys = [key for key in labels.marks if key[0] in depth]
    outside = [(sid, z) for sid, z in keys if not 0 <= z < depth[sid]]
    if not outside:
        return
    sid, z = outside[0]
    example = f"e.g. slice {z} of series {sid}, which has {depth[sid]} slices"
    if len(outside) == len(keys):
        raise UserError(f"every nodule mark in {root / NODULES_TABLE} lies on a slice outside its prepared volume "
                        f"({example}); the table does not match this root's volumes: re-run `dinox prep`")
    labels.notes.append(f"{len(outside)} of {len(keys)} marked slices lie outside their prepared volumes "
                        f"({example}); left out")


def probe_inputs(cfg, root: Path, *, split_manifest=None, split: str = "auto", seed: int = 0,
                 max_slices: int = DEFAULT_MAX_SLICES, min_readers: int = MIN_READERS,
                 test_fraction: float = DEFAULT_TEST_FRACTION, labels_json=None):
    """(labels, dataset, split, ProbeData with its slices selected) of a labelled processed
    root: everything the probe reads before it embeds (`embed` then plans the patches)."""
    labels = load_labels(root, min_readers, labels_json)
    dataset = CTSliceDataset(root, "all", None, root / INDEX_FILE, context_mm=cfg.views.context_mm)
    _check_slices_in_volumes(labels, dict(zip(dataset.series_ids, dataset.num_slices)), root)
    index_patient = split_patients(root, dataset.records)
    probe_split = choose_split(labels, index_patient, mode=split, manifest=split_manifest, root=root, seed=seed,
                               test_fraction=test_fraction)
    return labels, dataset, probe_split, ProbeData(slices=select_slices(dataset, labels, probe_split, max_slices, seed))


def probe_backbone(backbone, cfg, root, *, split_manifest=None, split: str = "auto", seed: int = 0,
                   device: torch.device | None = None, batch_size: int = 64, max_slices: int = DEFAULT_MAX_SLICES,
                   n_boot: int = BOOTSTRAP, min_readers: int = MIN_READERS,
                   test_fraction: float = DEFAULT_TEST_FRACTION,
                   labels_json=None, baselines: bool = True, untrained=None, progress: bool = False,
                   size: int | None = None, n_refit: int = REFIT_BOOTSTRAP) -> dict:
    """Probe a frozen backbone on the labelled processed `root`.

    Returns {"tasks": {name: {"auroc", "ci95", "n_train", "n_test", ..., "baselines":
    {"untrained": {...}, "pixels": {...}}, and for the patch tasks "references":
    {"hand_features": {...}}}}, "skipped": {name: why}, "split": {...}, "labels": {...},
    "bootstrap": {...}, "notes": [...]}; with `n_refit` > 0 each binary task also holds the
    refit interval ("refit", and "delta_ci95_refit" beside each lead). `baselines=False` skips the untrained network,
    the pixels and the references (e.g. a periodic check in training, where they do not
    change); `untrained` may pass a ready step-0 backbone. The backbone's training
    mode is restored afterwards. Raises UserError for labels or splits that cannot be
    probed."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1")
    if max_slices < 2:
        raise UserError(f"--max-slices {max_slices}: give at least 2")
    if n_boot < 1:
        raise UserError(f"--bootstrap {n_boot}: give at least 1 resample")
    if n_refit < 0:
        raise UserError(f"--refit-bootstrap {n_refit}: give 0 (off) or a number of resamples (e.g. 200)")
    size = probe_size(cfg, size)
    device = device or next(backbone.parameters()).device
    root = Path(root)
    labels, dataset, probe_split, data = probe_inputs(cfg, root, split_manifest=split_manifest, split=split, seed=seed,
                                                      max_slices=max_slices, min_readers=min_readers,
                                                      test_fraction=test_fraction, labels_json=labels_json)
    networks = {"checkpoint": backbone}
    notes = labels.notes + probe_split.notes
    if baselines:
        networks["untrained"] = untrained if untrained is not None else untrained_backbone(cfg, device)
        if untrained is None and untrained_note(cfg):
            notes.append(untrained_note(cfg))
    was_training = {name: net.training for name, net in networks.items()}
    try:
        for net in networks.values():
            net.eval()
        embed(networks, dataset, data, labels, cfg, device=device, size=size, batch_size=batch_size, seed=seed,
              progress=progress)
    finally:
        for name, net in networks.items():
            net.train(was_training[name])
    tasks, skipped = build_tasks(data, vessel_labels=bool(labels.vessels))
    sources = ["checkpoint", "untrained", "pixels"] if baselines else ["checkpoint"]
    out_tasks = {}
    bar = Progress(len(tasks), "probe: fitting", "task", progress)   # C sweeps and bootstraps: minutes at ViT-L width
    try:
        for task in tasks:
            references = ("hand",) if baselines and task.level == "patch" else ()
            try:
                out_tasks[task.name] = run_task(data, task, sources, n_boot=n_boot, seed=seed, references=references,
                                                n_refit=n_refit)
            except ValueError as exc:
                skipped[task.name] = str(exc)
            bar.update()
    finally:
        bar.close()
    return {
        "tasks": out_tasks,
        "skipped": skipped,
        "split": {"mode": probe_split.mode, "train_patients": len(probe_split.patients("train")),
                  "test_patients": len(probe_split.patients("test")), "train_series": len(probe_split.train),
                  "test_series": len(probe_split.test), "seed": seed,
                  "train_patient_ids": probe_split.patients("train"), "test_patient_ids": probe_split.patients("test")},
        "labels": {"rule": labels.rule, "min_readers": min_readers, "slices": len(data.slices),
                   "positive_slices": sum(r.label == 1 for r in data.slices),
                   "ambiguous_slices": sum(r.label is None for r in data.slices),
                   "nodule_regions": len(data.regions), "vessel_series": len(labels.vessels)},
        "bootstrap": {"resamples": n_boot, "interval": "95 % percentile",
                      "unit": "test patients (cluster bootstrap; test samples below "
                              f"{MIN_BOOTSTRAP_PATIENTS} patients, see each task's bootstrap_unit)",
                      "refit_resamples": n_refit,
                      "refit": "training and test patients resampled together and the probe refitted at its "
                               "chosen C (the binary tasks' 'refit' and 'delta_ci95_refit')" if n_refit else None},
        "probe": {"model": "StandardScaler + LogisticRegression (L2, class_weight balanced)", "C_grid": list(CS),
                  "cv": f"GroupKFold({CV_FOLDS}) by patient on the training side", "input": "lung window "
                  f"{LUNG_WINDOW}, resized to {size} px", "size": size,
                  "grid": size // cfg.model.vit_patch, "training_size": cfg.views.img_size,
                  "min_lung_fraction": MIN_LUNG_FRACTION,
                  "hand_features": f"per patch cell: {', '.join(HAND_FEATURES)} (blob: negative LoG, sigma "
                                   f"{BLOB_SIGMA:g} px; z_contrast: |centre - mean of the neighbour slices|)"},
        "notes": notes,
    }


def verdict(result: dict, min_auroc: float) -> tuple[bool, str]:
    """(passed, one line): the gate tasks' AUROC against min_auroc, with their baselines."""
    parts, passed = [], True
    for name in GATE_TASKS:
        t = result["tasks"].get(name)
        if t is None:
            split = result.get("split", {})
            why = result['skipped'].get(name, 'no samples')
            if name == "patch_nodule":   # its cells, not the split: a slice task would have failed first
                return False, f"{name} could not be probed ({why})"
            return False, (f"{name} could not be probed ({why}; "
                           f"{split.get('train_patients', '?')} training and {split.get('test_patients', '?')} "
                           f"test patients): each side of the patient split needs slices with and without a "
                           f"nodule; label more patients (dinox synth --patients, or more LIDC series), try "
                           f"--split patients with another --seed or --test-fraction, or lower --min-readers")
        passed &= t["auroc"] >= min_auroc
        ci = t["ci95"] or [math.nan, math.nan]
        base = " ".join(f"{k} {v['auroc']:.3f}" for k, v in t["baselines"].items())
        parts.append(f"{name} {t['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" + (f" ({base})" if base else ""))
    return passed, f"{'PASS' if passed else 'FAIL'}: " + "; ".join(parts) + f"; pass line AUROC >= {min_auroc}"
