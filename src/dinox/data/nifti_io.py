"""Reading NIfTI CT volumes into the (Z, H, W) layout of DICOM axial series."""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from dinox.data.dicom_io import HU_AIR_MAX, HU_MAX, HU_MIN

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
    """Notes for prep_report.json about how the volume at `path` was laid out."""
    angle = obliquity_degrees(nib.load(str(path)).affine)
    if angle <= OBLIQUE_NOTE_DEGREES:
        return []
    return [f"oblique volume: its axes are up to {angle:.1f} degrees off the patient axes; laid out along the "
            f"nearest axes without resampling (slices are the acquired planes, not true axial planes)"]


def fill_non_finite(vol: np.ndarray) -> tuple[np.ndarray, int, float]:
    """The volume with NaN or infinite voxels (resampling tools write NaN outside the field of
    view) set to air, HU_MIN; their count; and the lowest finite value. Left in, a NaN makes
    every min/max test false (so the HU check would pass anything) and becomes an arbitrary
    integer in the int16 volume. Raises ValueError when no voxel is finite."""
    if not np.issubdtype(vol.dtype, np.floating):
        return vol, 0, float(vol.min())
    finite = np.isfinite(vol)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad == finite.size:
        raise ValueError("no finite voxel (every value is NaN or infinite)")
    lowest = float(np.min(vol, initial=np.inf, where=finite))
    return (np.where(finite, vol, HU_MIN) if bad else vol), bad, lowest


def read_nifti(path) -> tuple[np.ndarray, tuple[float, float, float], list[str]]:
    """(Z, H, W) int16 HU volume, (spacing_z, spacing_y, spacing_x) in mm, and notes for
    prep_report.json (NaN voxels filled).

    The image is brought to the closest canonical (RAS+) orientation, then laid out like a
    DICOM axial series: z ascending (inferior to superior), rows anterior to posterior,
    columns from the patient's right to left. Raises ValueError for data that is not a 3D
    CT volume in HU."""
    img = nib.load(str(path))
    if img.ndim == 4 and img.shape[3] == 1:
        img = nib.funcs.squeeze_image(img)
    if img.ndim != 3:
        raise ValueError(f"not a 3D volume (shape {img.shape})")
    canon = nib.as_closest_canonical(img)
    data = np.asarray(canon.dataobj)
    if np.iscomplexobj(data):
        raise ValueError(f"complex voxels ({data.dtype}): not CT in HU (a k-space or phase image?)")
    vol = data.transpose(2, 1, 0)[:, ::-1, ::-1]
    vol, bad, lowest = fill_non_finite(vol)
    notes = [f"{bad} NaN or infinite voxels ({100 * bad / vol.size:.2g} % of the volume) set to {HU_MIN} HU "
             f"(air), as outside the field of view"] if bad else []
    if lowest > HU_AIR_MAX:
        raise ValueError(f"values do not look like CT in HU (minimum {lowest:g}; a mask or MR?)")
    zx, zy, zz = (float(z) for z in canon.header.get_zooms()[:3])
    vol = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16)
    return np.ascontiguousarray(vol), (zz, zy, zx), notes
