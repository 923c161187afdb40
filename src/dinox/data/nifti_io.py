"""Reading NIfTI CT volumes into the (Z, H, W) layout of DICOM axial series."""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from dinox.data.dicom_io import HU_MAX, HU_MIN

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def read_nifti(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(Z, H, W) int16 HU volume and (spacing_z, spacing_y, spacing_x) in mm.

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
    vol = data.transpose(2, 1, 0)[:, ::-1, ::-1]
    lowest = float(vol.min())
    if lowest > -500:
        raise ValueError(f"values do not look like CT in HU (minimum {lowest:g}; a mask or MR?)")
    zx, zy, zz = (float(z) for z in canon.header.get_zooms()[:3])
    vol = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16)
    return np.ascontiguousarray(vol), (zz, zy, zx)
