"""`dinox synth`: procedural chest-CT phantoms written as real DICOM CT series.

Layout: <out>/<patient_id>/<series_uid>/slice_XXXX.dcm (CT Image Storage, explicit VR little
endian, 16-bit stored values with RescaleSlope/Intercept), plus <out>/labels.json with the
nodules of every series. Half of the patients (chosen by the seed) are stored like some
scanners do, as signed values with intercept 0 and -3024 outside the reconstruction circle,
the other half as unsigned values with intercept -1024.

Everything is derived from --seed (numpy Generator per patient, UIDs hashed from the seed):
the same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from tqdm import tqdm

from dinox.data.phantom import NODULE_TYPES, Phantom, make_phantom
from dinox.errors import UserError

PADDING_HU = -3024
LABEL_CONVENTIONS = {
    "center_zyx_vox": "fractional (slice, row, column) index; slice 0 is the most inferior, "
                      "i.e. the order of a prepared volume",
    "center_mm": "(x, y, z) in DICOM patient coordinates (LPS), millimetres",
    "radius_mm": "nominal radius; the drawn nodule is slightly elliptical and lobulated",
    "type": " | ".join(NODULE_TYPES),
}


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


def _series_template(seed: int, index: int, patient_id: str, study_uid: str, series_uid: str,
                     ph: Phantom, signed: bool, intercept: float) -> Dataset:
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
    ds.StudyDescription = "CHEST (synthetic)"
    ds.SeriesDescription = f"phantom seed {seed} patient {index}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{dz:.4g}"
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
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
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_series(out: Path, seed: int, index: int, ph: Phantom, signed: bool) -> dict:
    """Write one phantom as a DICOM series; returns its labels.json entry."""
    patient_id = f"SYNTH{seed}-{index:04d}"
    study_uid = _uid(seed, patient_id, "study")
    series_uid = _uid(seed, patient_id, "series")
    series_dir = out / patient_id / series_uid
    series_dir.mkdir(parents=True, exist_ok=True)
    stored, intercept = _stored_values(ph, signed)
    ds = _series_template(seed, index, patient_id, study_uid, series_uid, ph, signed, intercept)
    x0, y0, z0 = ph.origin_xyz_mm
    dz = ph.spacing_zyx_mm[0]
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
    return {
        "patient_id": patient_id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "series_dir": series_dir.relative_to(out).as_posix(),
        "num_slices": int(stored.shape[0]),
        "rows": int(stored.shape[1]),
        "cols": int(stored.shape[2]),
        "spacing_zyx_mm": [float(s) for s in ph.spacing_zyx_mm],
        "nodules": [
            {
                "center_zyx_vox": [round(c, 3) for c in n.center_zyx_vox],
                "center_mm": [round(c, 3) for c in n.center_xyz_mm],
                "radius_mm": round(n.radius_mm, 3),
                "type": n.kind,
            }
            for n in ph.nodules
        ],
    }


def generate_dataset(out, patients: int, slices: int, size: int, seed: int = 0,
                     progress: bool = False) -> dict:
    """Write `patients` synthetic chest-CT series under `out` and return the labels
    (also written to <out>/labels.json)."""
    out = Path(out)
    if patients < 1:
        raise UserError("--patients must be at least 1")
    if slices < 3:
        raise UserError("--slices must be at least 3 (a sample stacks slices z-1, z, z+1)")
    if not 32 <= size <= 2048:
        raise UserError("--size must be between 32 and 2048 pixels")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    series = []
    for i in tqdm(range(patients), desc="synth", unit="patient", file=sys.stderr,
                  disable=None if progress else True, leave=False):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        signed = bool(rng.random() < 0.5)
        ph = make_phantom(rng, slices, size)
        series.append(write_series(out, seed, i, ph, signed))
    labels = {"generator": "dinox synth", "seed": seed, "conventions": LABEL_CONVENTIONS,
              "series": series}
    tmp = out / ".labels.json.tmp"
    tmp.write_text(json.dumps(labels, indent=1))
    tmp.replace(out / "labels.json")
    return labels
