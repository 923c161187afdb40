"""Reading NIfTI CT volumes into the (Z, H, W) layout of DICOM axial series."""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from dinox.data.dicom_io import HU_AIR_MAX, HU_MAX, HU_MIN
from dinox.run.device import available_memory_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def volume_dims(path) -> tuple[int, ...] | None:
    """The sorted sizes of the three spatial axes, from the header alone (None if it cannot
    be read): in any orientation the same as those of the (Z, H, W) volume prep makes."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:  # any reader failure: the file is then matched by its path only
        return None
    return tuple(sorted(int(n) for n in shape[:3]))


# Beyond this angle between a volume's axes and the patient axes, prep notes the obliquity.
OBLIQUE_NOTE_DEGREES = 1.0


def obliquity_degrees(affine: np.ndarray) -> float:
    """The largest angle between a voxel axis of `affine` and its nearest patient axis."""
    axes = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    cosines = np.abs(axes / np.where(norms > 0, norms, 1.0)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def orientation_notes(path) -> list[str]:
    """Notes for prep_report.json about how the volume at `path` was laid out: an oblique
    volume, and which of the header's two orientations was used where that is in doubt."""
    img = nib.load(str(path))
    notes = []
    header = img.header
    if hasattr(header, "get_qform"):   # NIfTI; an Analyze header has neither
        qform, q_code = header.get_qform(coded=True)
        sform, s_code = header.get_sform(coded=True)
        if not q_code and not s_code:
            notes.append(f"no qform or sform orientation in the header: laid out as the fallback orientation "
                         f"{''.join(nib.aff2axcodes(img.affine))} (rows or columns may be flipped); check it in "
                         f"a viewer")
        elif q_code and s_code and nib.aff2axcodes(qform) != nib.aff2axcodes(sform):
            notes.append(f"the header's qform ({''.join(nib.aff2axcodes(qform))}) and sform "
                         f"({''.join(nib.aff2axcodes(sform))}) disagree: laid out by the sform, as the NIfTI "
                         f"standard prefers; check it in a viewer")
    angle = obliquity_degrees(img.affine)
    if angle > OBLIQUE_NOTE_DEGREES:
        notes.append(f"oblique volume: its axes are up to {angle:.1f} degrees off the patient axes; laid out along "
                     f"the nearest axes without resampling (slices are the acquired planes, not true axial planes)")
    return notes


# NIfTI spatial units to mm (code 0, "unknown", is mm by the field's habit)
_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def _gunzip(path) -> bytes | None:
    """The whole decompressed content of a gzip file, or None for a file that is no gzip.
    Raises ValueError where it does not decompress whole (a changed byte fails its CRC-32, a
    cut one ends early): nibabel reads only the bytes the header declares and never reaches
    the checksum at the end. The volume is then read from these bytes: checking the file
    and reading it apart decompressed it twice."""
    if not _is_gzip(path):
        return None
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"damaged gzip ({exc or type(exc).__name__}): download or export the file again") from None


def _single_volume(img):
    """A 4D image that holds one volume (x, y, z, 1) as the 3D image it is."""
    return nib.funcs.squeeze_image(img) if img.ndim == 4 and img.shape[3] == 1 else img


def _written_voxel_size(path, img) -> list[float]:
    """The voxel size as the file holds it: nibabel's loaded header has replaced a size of 0
    by 1 mm already (with a warning on stderr alone)."""
    try:
        with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
            raw = type(img.header).from_fileobj(f, check=False)
        return [float(z) for z in raw["pixdim"][1:4]]
    except Exception:   # noqa: BLE001 - a header nibabel loaded but this cannot: take nibabel's
        return [float(z) for z in img.header.get_zooms()[:3]]


def _is_gzip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _header_problem(path, img) -> str | None:
    """Why the header cannot describe a CT volume to read here: a voxel size that is not a
    positive number (nibabel would take 1 mm), or more voxels than this machine's memory."""
    zooms = _written_voxel_size(path, img)
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        return (f"voxel size {'/'.join(f'{z:g}' for z in zooms)} is not a positive size: restore the header's "
                f"pixdim from the scan")
    need = float(np.prod(img.shape, dtype=np.float64)) * np.dtype(img.get_data_dtype()).itemsize
    free = available_memory_bytes()
    if free is not None and need > free:
        return (f"the header declares {'x'.join(map(str, img.shape))} voxels ({need / 2**30:.1f} GiB), more "
                f"than the {free / 2**30:.1f} GiB of memory available: a damaged header, or prepare it on a "
                f"machine with more memory")
    return None


def fill_non_finite(vol: np.ndarray) -> tuple[np.ndarray, list[str], float]:
    """The volume with NaN voxels (resampling tools write NaN outside the field of view) and
    -inf set to air, HU_MIN, and +inf (a value past the top of the scale, as a float
    conversion saturates behind metal) set to HU_MAX; notes that count them; and the lowest
    finite value. Left in, a NaN makes every min/max test false (so the HU check would pass
    anything) and becomes an arbitrary integer in the int16 volume. Raises ValueError when no
    voxel is finite."""
    if not np.issubdtype(vol.dtype, np.floating):
        return vol, [], float(vol.min())
    finite = np.isfinite(vol)
    if not finite.any():
        raise ValueError("no finite voxel (every value is NaN or infinite)")
    lowest = float(np.min(vol, initial=np.inf, where=finite))
    if finite.all():
        return vol, [], lowest
    high = np.isposinf(vol)
    n_high = int(np.count_nonzero(high))
    n_low = vol.size - int(np.count_nonzero(finite)) - n_high
    notes = [f"{n} {what} voxels ({100 * n / vol.size:.2g} % of the volume) set to {value} HU {why}"
             for n, what, value, why in ((n_low, "NaN or -inf", HU_MIN, "(air), as outside the field of view"),
                                         (n_high, "+inf", HU_MAX, "(the top of the scale), as past it"))
             if n]
    return np.where(finite, vol, np.where(high, HU_MAX, HU_MIN)), notes, lowest


def read_nifti(path) -> tuple[np.ndarray, tuple[float, float, float], list[str]]:
    """(Z, H, W) int16 HU volume, (spacing_z, spacing_y, spacing_x) in mm, and notes for
    prep_report.json (NaN voxels filled).

    The image is brought to the closest canonical (RAS+) orientation, then laid out like a
    DICOM axial series: z ascending (inferior to superior), rows anterior to posterior,
    columns from the patient's right to left. Raises ValueError for data that is not a 3D
    CT volume in HU."""
    try:
        img = nib.load(str(path))    # the header: checked before the voxels are read
    except Exception:
        _gunzip(path)                # a damaged gzip says so, rather than as the reader's error
        raise
    img = _single_volume(img)
    if img.ndim != 3:
        raise ValueError(f"not a 3D volume (shape {img.shape})")
    problem = _header_problem(path, img)
    if problem:
        raise ValueError(problem)
    raw = _gunzip(path)
    if raw is not None:              # read once, from the bytes checked whole
        img = _single_volume(type(img).from_bytes(raw))
    canon = nib.as_closest_canonical(img)
    data = np.asarray(canon.dataobj)
    if np.iscomplexobj(data):
        raise ValueError(f"complex voxels ({data.dtype}): not CT in HU (a k-space or phase image?)")
    vol = data.transpose(2, 1, 0)[:, ::-1, ::-1]
    vol, notes, lowest = fill_non_finite(vol)
    if lowest > HU_AIR_MAX:
        raise ValueError(f"values do not look like CT in HU (minimum {lowest:g}; a mask or MR?)")
    units = canon.header.get_xyzt_units()[0] if hasattr(canon.header, "get_xyzt_units") else "unknown"
    to_mm = _TO_MM.get(units, 1.0)
    if to_mm != 1.0:
        notes.append(f"voxel size given in {units}s: converted to mm")
    zx, zy, zz = (float(z) * to_mm for z in canon.header.get_zooms()[:3])
    vol = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16)
    return np.ascontiguousarray(vol), (zz, zy, zx), notes
