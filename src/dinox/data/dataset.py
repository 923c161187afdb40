"""2.5D samples from the processed root: (3, H, W) int16 stacks of slices z-g, z, z+g,
where the gap g is 1 (the adjacent slices) or the whole number of slices nearest a distance
in millimetres (`slice_gap`); in a series with gaps or uneven steps, whose slice positions
`dinox prep` records, the slices whose positions lie nearest that distance (`stack_neighbours`).

Volumes are memory-mapped lazily, per process: a DataLoader worker (forked or spawned)
opens its own maps on first use and never inherits or pickles another process's. Only
I/O happens here; windowing and augmentation run batched on the training device.

Construction checks everything a run would otherwise trip over hours in: index paths
confined to the root, whole-number slice counts, every volume's header (readable, not
truncated, as many slices as the index says) and a split without train/val overlap.
"""
from __future__ import annotations

import logging
import math
import os
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dinox.data.layout import INDEX_FILE, confined_path, default_manifest, read_index
from dinox.data.splits import read_split_manifest, split_patients
from dinox.errors import UserError

log = logging.getLogger(__name__)

AIR_HU = -1024
MAX_OPEN_VOLUMES = 256   # memory maps kept open per process (each holds a file descriptor)


def slice_gap(context_mm: float, spacing_z: float | None) -> int:
    """How many slices apart the stack's neighbours are: the whole number of slices nearest
    `context_mm` (halves round up), at least 1; 1 when `context_mm` is 0 or the spacing is
    unknown. At 10 mm (the recipe's): 2 for 5 mm slices (z-2, z, z+2), 4 for 2.5 mm, 8 for
    1.25 mm; at 5 mm: 1, 2 and 4."""
    if not context_mm or not spacing_z or not math.isfinite(spacing_z) or spacing_z <= 0:
        return 1
    return max(1, math.floor(context_mm / spacing_z + 0.5))


# Positions this close (mm) count as equally near, and the farther slice wins, as halves
# round up in slice_gap: the rounding of the positions in DICOM headers must not break ties.
POSITION_TIE_MM = 1e-3


def stack_neighbours(context_mm: float, spacing_z: float | None, num_slices: int,
                     positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The lower and upper neighbour of every slice z of a series: (Z,) int arrays.

    Without positions (evenly spaced slices): z -/+ slice_gap, clamped at the ends. With
    them (mm along the normal, ascending): below z, the slice whose position is nearest
    positions[z] - context_mm, and above z likewise, at least one slice away where there is
    one, and the border slice where there is none (as the clamp). On even spacing the two
    rules agree; across a gap the positions keep the neighbours `context_mm` away where a
    whole number of median steps would reach far past the gap."""
    z = np.arange(num_slices)
    if positions is None or not context_mm:
        g = slice_gap(context_mm, spacing_z)
        return np.maximum(z - g, 0), np.minimum(z + g, num_slices - 1)
    p = np.asarray(positions, np.float64)

    def nearest(target: np.ndarray, first: np.ndarray, last: np.ndarray, farther_is_lower: bool) -> np.ndarray:
        right = np.clip(np.searchsorted(p, target), first, last)
        left = np.clip(right - 1, first, last)
        d_left, d_right = np.abs(p[left] - target), np.abs(p[right] - target)
        tie = np.abs(d_left - d_right) <= POSITION_TIE_MM
        return np.where(tie, left if farther_is_lower else right, np.where(d_left < d_right, left, right))

    lower = nearest(p - context_mm, np.zeros_like(z), np.maximum(z - 1, 0), True)
    upper = nearest(p + context_mm, np.minimum(z + 1, num_slices - 1), np.full_like(z, num_slices - 1), False)
    return lower, upper


def _positions(row: dict, num_slices: int) -> np.ndarray | str | None:
    """The slice positions an index row records (None: evenly spaced, or none recorded), or
    why they cannot be used."""
    text = (row.get("z_positions") or "").strip()
    if not text:
        return None
    try:
        p = np.array([float(v) for v in text.split()], np.float64)
    except ValueError:
        return "its z_positions are not numbers"
    if len(p) != num_slices:
        return f"its z_positions list {len(p)} slices, not its {num_slices}"
    if not np.isfinite(p).all():
        return "its z_positions hold a value that is not a finite number"
    if (np.diff(p) <= 0).any():
        return "its z_positions do not ascend"
    return p


class DataChanged(UserError):
    """A volume that was checked at the start became unreadable or different during the run."""


class CTSliceDataset(Dataset):
    """Every slice of every series in a split, as a (3, H, W) int16 tensor of raw HU: the
    slices z-g, z, z+g of its series (clamped at the ends), g = slice_gap(context_mm, the
    series' spacing_z in the index), or where the index records the series' slice positions
    (gaps, uneven steps) the slices nearest context_mm by position (`stack_neighbours`).

    `root` may be None when `index_csv` is given: the root is then the folder above
    index_csv's folder (root/_index/index.csv)."""

    def __init__(self, root, split: str = "train", split_manifest=None, index_csv=None,
                 min_slices: int = 1, context_mm: float = 0.0):
        if root is None and index_csv is None:
            raise UserError("give the processed root or --index-csv")
        self.root = Path(root) if root is not None else Path(index_csv).resolve().parent.parent
        index_csv = Path(index_csv) if index_csv is not None else self.root / INDEX_FILE
        if split not in ("train", "val", "all"):
            raise UserError(f"split must be train, val or all, not {split!r}")
        self.split = split
        rows, self._lines = self._load_index(index_csv)
        self._index_csv = index_csv
        if split == "all":
            wanted = sorted(rows)
        else:
            manifest = Path(split_manifest) if split_manifest is not None else default_manifest(self.root)
            sides = read_split_manifest(manifest, split_patients(self.root, rows.values()), index_csv, need=split)
            wanted = sides[split]
        if not wanted:
            raise UserError(f"{manifest} lists no {split} series; re-run `dinox prep` with a --val-fraction that "
                            f"leaves at least one patient on each side"
                            + (" (an evaluation can also read another side: --split train or all)"
                               if split == "val" else ""))
        counts = {s: self._whole_number(rows[s], "num_slices") for s in wanted}
        self.series_ids: list[str] = [s for s in wanted if counts[s] >= min_slices]
        if not self.series_ids:
            raise UserError(f"split {split!r} has no series with at least {min_slices} slices "
                            f"(index {index_csv}); prepare more CT series")
        self.records = [rows[s] for s in self.series_ids]
        self.paths = [self._volume_path(r) for r in self.records]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise UserError(f"{len(missing)} volumes listed in {index_csv} are missing (e.g. {missing[0]}); "
                            f"re-run `dinox prep`")
        self.num_slices = [counts[s] for s in self.series_ids]
        for k in range(len(self.paths)):
            self._check_volume(k)
        self.context_mm = float(context_mm)
        self.spacings = [_spacing(r) for r in self.records]   # mm, None where the index has none
        self.gaps = [slice_gap(self.context_mm, mm) for mm in self.spacings]
        unknown = [sid for sid, mm in zip(self.series_ids, self.spacings) if mm is None]
        if self.context_mm and unknown:
            log.warning("%d series have no slice spacing in %s (e.g. %s): their 2.5D stacks use the adjacent "
                        "slices, not ~%g mm; re-run `dinox prep` to record it", len(unknown), index_csv, unknown[0],
                        self.context_mm)
        positions = [_positions(r, n) for r, n in zip(self.records, self.num_slices)]
        self._check_positions(positions, index_csv)
        self.by_position = [isinstance(p, np.ndarray) and bool(self.context_mm) for p in positions]
        self.neighbours = [tuple(a.astype(np.int32) for a in stack_neighbours(  # (lower, upper) per series
            self.context_mm, mm, n, p if isinstance(p, np.ndarray) else None))
            for mm, n, p in zip(self.spacings, self.num_slices, positions)]
        self._starts = np.concatenate([[0], np.cumsum(self.num_slices)]).tolist()
        self._maps: OrderedDict[int, tuple[np.ndarray, tuple]] = OrderedDict()
        self._pid = os.getpid()

    def _check_positions(self, positions: list, index_csv: Path) -> None:
        """Warn where a series' stacks fall back to whole steps of its median spacing though
        its slices are not evenly spaced: positions damaged, or never recorded (a root
        prepared before dinox recorded them; prep's notes name its gaps)."""
        if not self.context_mm:
            return
        bad = [(sid, p) for sid, p in zip(self.series_ids, positions) if isinstance(p, str)]
        if bad:
            log.warning("%d series of %s have slice positions that cannot be used (e.g. %s: %s): their 2.5D stacks "
                        "use whole steps of the median spacing; re-run `dinox prep --force` to rewrite them",
                        len(bad), index_csv, *bad[0])
        uneven = [sid for sid, r, p in zip(self.series_ids, self.records, positions) if p is None
                  and any(k in (r.get("notes") or "") for k in ("in slice positions", "irregular slice spacing"))]
        if uneven:
            log.warning("%d series of %s have gaps or uneven slice steps but no recorded slice positions (e.g. %s; "
                        "prepared by an older dinox): their 2.5D stacks take whole steps of the median spacing, "
                        "which across a gap reach further than %g mm; re-run `dinox prep --force` to record them",
                        len(uneven), index_csv, uneven[0], self.context_mm)

    @staticmethod
    def _load_index(index_csv: Path) -> tuple[dict[str, dict], dict[str, int]]:
        """The index rows by series id, and each row's line number in the file (for messages)."""
        if not index_csv.is_file():
            raise UserError(f"index not found: {index_csv}; run `dinox prep` first")
        try:
            rows = read_index(index_csv)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"unreadable index {index_csv}: {exc}; re-run `dinox prep`") from None
        if not rows:
            raise UserError(f"index {index_csv} lists no series; run `dinox prep` on CT data")
        # Line 1 is the header; a series listed twice keeps its last row, as the dict does.
        return {r["series_id"]: r for r in rows}, {r["series_id"]: i + 2 for i, r in enumerate(rows)}

    def _row_name(self, row: dict) -> str:
        sid = row.get("series_id")
        return f"{self._index_csv} line {self._lines.get(sid, '?')} (series {sid})"

    def _whole_number(self, row: dict, column: str) -> int:
        value = row.get(column)
        try:
            number = int(str(value).strip())
        except (TypeError, ValueError):
            number = -1
        if number < 0:
            raise UserError(f"{self._row_name(row)}: {column} {value!r} is not a whole number; the index is "
                            f"damaged: re-run `dinox prep --force` on this root")
        return number

    def _volume_path(self, row: dict) -> Path:
        try:
            return confined_path(self.root, row["path"])
        except ValueError as exc:
            raise UserError(f"{self._row_name(row)}: {exc}; index paths must lie inside the processed root "
                            f"{self.root}: re-run `dinox prep` to rewrite the index") from None

    def _check_volume(self, k: int) -> None:
        """The volume's .npy header and values against its index row, before any training: a
        damaged file found mid-run would stop the run at the same sample on every resume."""
        vol = self._open_volume(k)
        problem = _hu_problem(vol)
        del vol
        if problem:
            raise UserError(f"volume {self.paths[k]} {problem}; {self._prep_fix(k)}")

    def _prep_fix(self, k: int) -> str:
        return (f"re-run `dinox prep --force` to rewrite it (or drop series {self.records[k]['series_id']} "
                f"from the index)")

    def _open_volume(self, k: int, error: type[UserError] = UserError) -> np.ndarray:
        """Memory-map volume k, checking its header against the index row.

        Mapping reads only the header, and fails when the file is shorter than the header
        says (truncated)."""
        path, row, fix = self.paths[k], self.records[k], self._prep_fix(k)
        try:
            vol = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, FileNotFoundError):
                detail = "the file is gone"
            elif "greater than file size" in detail or isinstance(exc, EOFError):
                detail = "truncated: the file is shorter than its header says"
            elif "pickled" in detail:
                detail = "no .npy header"
            raise error(f"volume {path} is damaged or not a .npy array ({detail}); {fix}") from None
        shape = tuple(getattr(vol, "shape", ()))
        if len(shape) != 3:
            raise error(f"volume {path} has shape {shape}, not (slices, rows, cols); {fix}")
        if shape[0] != self.num_slices[k]:
            raise error(f"volume {path} holds {shape[0]} slices but {self._row_name(row)} says "
                        f"num_slices {self.num_slices[k]}; {fix}")
        for axis, name in ((1, "rows"), (2, "cols")):
            try:
                listed = int(float(row.get(name) or ""))
            except ValueError:
                continue                           # an index without the column: nothing to compare
            if shape[axis] != listed:
                raise error(f"volume {path} is {shape[1]}x{shape[2]} but {self._row_name(row)} says "
                            f"{name} {listed}; {fix}")
        return vol

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()   # never pickle mapped volumes into workers
        return state

    def _volume(self, k: int) -> np.ndarray:
        """Volume k's memory map, re-checked against the file on every read: reading a
        mapped page that a truncation removed kills the process with SIGBUS (no message,
        no emergency checkpoint), so a file that changed under the run is found first."""
        if self._pid != os.getpid():     # forked into a DataLoader worker: own maps
            self._maps = OrderedDict()
            self._pid = os.getpid()
        path = self.paths[k]
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataChanged(f"volume {path} became unreadable during the run "
                              f"({exc.strerror or type(exc).__name__}); restore it, or {self._prep_fix(k)}") from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._maps.get(k)
        if cached is not None and cached[1] == key:
            self._maps.move_to_end(k)
            return cached[0]
        if cached is not None:           # replaced, rewritten or cut since it was mapped
            self._maps.pop(k)
        vol = self._open_volume(k, DataChanged)   # refuses a file shorter than its header says
        self._maps[k] = (vol, key)
        if len(self._maps) > MAX_OPEN_VOLUMES:
            self._maps.popitem(last=False)
        return vol

    def __len__(self) -> int:
        return self._starts[-1]

    def _resolve(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        k = bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i) -> torch.Tensor:
        k, z = self._resolve(int(i))
        vol = self._volume(k)
        lower, upper = self.neighbours[k]
        stack = np.stack([vol[j] for j in (int(lower[z]), z, int(upper[z]))])
        if stack.dtype != np.int16:
            stack = stack.astype(np.int16)
        return torch.from_numpy(stack)

    def thinnest_slices_mm(self) -> float | None:
        """The smallest slice spacing of the split's series (None when the index has none)."""
        known = [mm for mm in self.spacings if mm is not None]
        return min(known) if known else None

    def stack_span(self, i) -> tuple[int, int]:
        """The first and last slice index of sample i's stack (its lower and upper neighbour)."""
        k, z = self._resolve(int(i))
        return int(self.neighbours[k][0][z]), int(self.neighbours[k][1][z])

    def stack_summary(self) -> str:
        """One line: which slices the 2.5D stacks hold, by how many series."""
        spacing = {}
        for g, mm, by_position in zip(self.gaps, self.spacings, self.by_position):
            if not by_position:
                spacing.setdefault(g, []).append(mm)
        parts = []
        for g in sorted(spacing):
            known = [s for s in spacing[g] if s is not None]
            mm = (f", {min(known):g}-{max(known):g} mm slices" if len(set(known)) > 1 else
                  f", {known[0]:g} mm slices") if known else ""
            parts.append(f"z-{g}, z, z+{g} in {len(spacing[g])} series{mm}")
        if any(self.by_position):
            parts.append(f"nearest by slice position in {sum(self.by_position)} series with gaps or uneven steps")
        rule = f"the slices nearest {self.context_mm:g} mm from z" if self.context_mm else "adjacent slices"
        return f"2.5D stacks ({rule}): " + "; ".join(parts)

    def locate(self, i) -> tuple[str, int]:
        """(series_id, z) of sample i."""
        k, z = self._resolve(int(i))
        return self.series_ids[k], z

    def series_ranges(self) -> dict[str, range]:
        """Sample indices belonging to each series."""
        return {sid: range(self._starts[k], self._starts[k + 1]) for k, sid in enumerate(self.series_ids)}


def _spacing(row: dict) -> float | None:
    """The slice spacing an index row records (mm), or None when absent or not a positive number."""
    try:
        value = float(row.get("spacing_z") or "nan")
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _hu_problem(vol: np.ndarray) -> str | None:
    """Why a volume's values cannot be read as int16 HU (what `dinox prep` writes), or None.
    Only a volume of another dtype is read whole: casting would turn NaN into 0 HU (water)
    and wrap values beyond int16 without a word."""
    if vol.dtype == np.int16:
        return None
    if vol.dtype.kind not in "iuf":
        return f"holds {vol.dtype} values, not HU numbers"
    if vol.dtype.kind == "f" and not np.isfinite(vol).all():
        return f"holds NaN or infinite values ({vol.dtype}; dinox prep writes int16 HU)"
    if vol.size and (vol.min() < np.iinfo(np.int16).min or vol.max() > np.iinfo(np.int16).max):
        return f"holds values outside the int16 HU range ({vol.dtype}; dinox prep writes int16 HU)"
    return None


def pad_collate(batch: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H, W) samples into (B, 3, Hmax, Wmax), centring smaller ones on air (-1024)."""
    if not batch:
        raise ValueError("pad_collate got an empty batch")
    h = max(t.shape[-2] for t in batch)
    w = max(t.shape[-1] for t in batch)
    if all(t.shape[-2:] == (h, w) for t in batch):
        return torch.stack(batch)
    out = torch.full((len(batch), batch[0].shape[0], h, w), AIR_HU, dtype=batch[0].dtype)
    for b, t in enumerate(batch):
        top, left = (h - t.shape[-2]) // 2, (w - t.shape[-1]) // 2
        out[b, :, top:top + t.shape[-2], left:left + t.shape[-1]] = t
    return out

