from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLossless,
                         MRImageStorage, RLELossless, generate_uid)

from dinox.cli import main
from dinox.data import ingest
from dinox.data.layout import INDEX_COLUMNS, split_name
from dinox.data.splits import extend_split, patient_split


def write_slice(path: Path, stored: np.ndarray, *, series_uid: str, patient_id: str = "P1",
                position=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0), slope: float = 1.0,
                intercept: float = -1024.0, instance: int = 1, modality: str = "CT",
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"), spacing=(0.7, 0.8),
                implicit: bool = False, transfer_syntax: str | None = None, bare: bool = False) -> Path:
    """A minimal single-frame DICOM image written with pydicom, independent of dinox."""
    signed = stored.dtype.kind == "i"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = transfer_syntax or (ImplicitVRLittleEndian if implicit
                                                         else ExplicitVRLittleEndian)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = "1"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if transfer_syntax == JPEGLossless:
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3 not really a jpeg \xff\xd9"])
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom")
    if bare:   # no preamble, no file meta: an old-style bare dataset
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return path


def write_series(folder: Path, hu: np.ndarray, series_uid: str, patient_id: str = "P1",
                 dz: float = 2.5, **kw) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_slice(folder / f"{series_uid[-6:]}_{k:03d}.dcm", (hu[k] + 1024).astype(np.uint16),
                        series_uid=series_uid, patient_id=patient_id, position=(-50.0, -60.0, k * dz),
                        instance=k + 1, **kw) for k in range(len(hu))]


def random_hu(rng, shape) -> np.ndarray:
    return rng.integers(-1000, 2000, shape).astype(np.int16)


def prep(inputs, out: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return ingest.prepare([str(p) for p in inputs], str(out), **kw)


def index_rows(out: Path) -> dict[str, dict]:
    with open(out / "_index" / "index.csv", newline="") as f:
        return {r["series_id"]: r for r in csv.DictReader(f)}


def volume(out: Path, series_id: str) -> np.ndarray:
    return np.load(out / "volumes" / f"{series_id}.npy")


def test_shuffled_names_instances_and_per_slice_rescale_give_exact_hu(tmp_path):
    rng = np.random.default_rng(0)
    n, shape = 7, (10, 12)
    hu = (rng.integers(-500, 1500, (n,) + shape) * 2).astype(np.int16)   # even: exact for slope 2
    a = np.deg2rad(25.0)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(a), -np.sin(a)])
    normal = np.cross(row_dir, col_dir)
    names = rng.permutation(n)
    instances = rng.permutation(n) + 1
    rescales = [(1, -1024), (2, -2048), (0.5, -1000), (1, 0), (2, -1024), (1, -3000), (0.5, -1024)]
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(n):
        slope, intercept = rescales[k]
        stored = ((hu[k].astype(np.float64) - intercept) / slope).astype(np.int32)
        dtype = np.int16 if stored.min() < 0 or k % 2 else np.uint16
        # in-plane offsets move the position's z around, so only the normal orders slices
        position = (np.array([10.0, 20.0, 30.0]) + 1.25 * k * normal
                    + rng.uniform(-40, 40) * col_dir + rng.uniform(-40, 40) * row_dir)
        write_slice(folder / f"IM{names[k]:02d}", stored.astype(dtype), series_uid="1.2.3.1",
                    position=tuple(position), orientation=tuple(row_dir) + tuple(col_dir),
                    slope=slope, intercept=intercept, instance=int(instances[k]))
    report = prep([folder], tmp_path / "out")
    assert report["series_written"] == ["1.2.3.1"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.3.1"), hu)
    row = index_rows(tmp_path / "out")["1.2.3.1"]
    assert float(row["spacing_z"]) == pytest.approx(1.25)
    assert (float(row["spacing_y"]), float(row["spacing_x"])) == (0.7, 0.8)
    assert (int(row["num_slices"]), int(row["rows"]), int(row["cols"])) == (n, 10, 12)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("implicit", [False, True])
def test_signed_unsigned_implicit_explicit(tmp_path, signed, implicit):
    rng = np.random.default_rng(1)
    hu = random_hu(rng, (3, 8, 8))
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        stored = hu[k] if signed else (hu[k] + 1024).astype(np.uint16)
        write_slice(folder / f"s{k}.dcm", stored, series_uid="1.9", position=(0, 0, float(k)),
                    intercept=0 if signed else -1024, implicit=implicit, instance=k + 1)
    meta = pydicom.dcmread(folder / "s0.dcm", stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    prep([folder], tmp_path / "out")
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.9"), hu)


def test_bare_dataset_without_preamble(tmp_path):
    hu = random_hu(np.random.default_rng(14), (3, 5, 5))
    files = write_series(tmp_path / "in", hu, "1.15", bare=True)
    assert files[0].read_bytes()[128:132] != b"DICM"
    prep([tmp_path / "in"], tmp_path / "out")
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.15"), hu)


def test_values_clipped_to_ct_range(tmp_path):
    hu = np.full((3, 4, 4), 100, np.int16)
    hu[:, 0, 0] = -3024
    hu[:, 1, 1] = 4000
    hu[:, 2, 2] = -1100
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        write_slice(folder / f"{k}.dcm", hu[k], series_uid="1.5", position=(0, 0, k), intercept=0)
    prep([folder], tmp_path / "out")
    vol = volume(tmp_path / "out", "1.5")
    assert vol.dtype == np.int16
    assert (vol[:, 0, 0] == -1024).all() and (vol[:, 1, 1] == 3071).all() and (vol[:, 2, 2] == -1024).all()
    assert (vol[:, 3, 3] == 100).all()


def test_skips_localizers_non_ct_single_slices_junk_and_truncated(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "in"
    ct = write_series(folder, random_hu(rng, (4, 8, 8)), "1.1.1")
    write_series(folder, random_hu(rng, (2, 8, 8)), "1.1.2", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(folder, random_hu(rng, (3, 8, 8)), "1.1.3", modality="MR")
    write_series(folder, random_hu(rng, (1, 8, 8)), "1.1.4")
    (folder / "notes.txt").write_text("not an image")
    (folder / "random.bin").write_bytes(rng.bytes(3000))
    good = ct[0].read_bytes()
    (folder / "truncated_header.dcm").write_bytes(good[:200])
    # a fifth slice of the CT series whose pixel data is cut short
    extra = write_slice(folder / "cut.dcm", np.zeros((8, 8), np.uint16), series_uid="1.1.1",
                        position=(-50.0, -60.0, 10.0), instance=5)
    extra.write_bytes(extra.read_bytes()[:-60])

    report = prep([folder], tmp_path / "out")
    assert report["series_written"] == ["1.1.1"]
    assert volume(tmp_path / "out", "1.1.1").shape == (4, 8, 8)
    skipped = {s["series_id"]: s["reason"] for s in report["series_skipped"]}
    assert "localizer" in skipped["1.1.2"]
    assert "MR" in skipped["1.1.3"] and "not CT" in skipped["1.1.3"]
    assert "single slice" in skipped["1.1.4"]
    files = {Path(f["path"]).name: f["reason"] for f in report["files_skipped"]}
    assert files["notes.txt"] == "not a DICOM file"
    assert files["random.bin"] == "not a DICOM file"
    assert "truncated_header.dcm" in files
    assert files["cut.dcm"].startswith("unreadable pixel data")
    on_disk = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert on_disk["counts"] == report["counts"]
    assert on_disk["counts"]["series_skipped"] == 3
    assert on_disk["files_skipped_by_reason"]["not a DICOM file"] == 2


def test_series_in_one_folder_are_separated(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "mixed"
    a, b = random_hu(rng, (3, 8, 8)), random_hu(rng, (5, 8, 8))
    write_series(folder, a, "1.2.10", patient_id="A")
    write_series(folder, b, "1.2.20", patient_id="B", dz=1.0)
    # a file of series A in another folder still belongs to A
    (tmp_path / "elsewhere").mkdir()
    write_slice(tmp_path / "elsewhere" / "x.dcm", (a[0] + 1024).astype(np.uint16), series_uid="1.2.10",
                patient_id="A",
                position=(-50.0, -60.0, 7.5), instance=4)
    report = prep([folder, tmp_path / "elsewhere"], tmp_path / "out")
    assert sorted(report["series_written"]) == ["1.2.10", "1.2.20"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.10"), np.concatenate([a, a[:1]]))
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.20"), b)
    rows = index_rows(tmp_path / "out")
    assert rows["1.2.10"]["patient_id"] == "A" and rows["1.2.20"]["patient_id"] == "B"


def test_overlapping_inputs_and_output_inside_input(tmp_path):
    hu = random_hu(np.random.default_rng(15), (3, 4, 4))
    write_series(tmp_path / "in" / "p1" / "s1", hu, "1.16")
    out = tmp_path / "in" / "processed"
    prep([tmp_path / "in", tmp_path / "in" / "p1"], out)
    report = prep([tmp_path / "in", tmp_path / "in" / "p1"], out, force=True)
    assert report["series_written"] == ["1.16"] and report["files_skipped"] == []
    np.testing.assert_array_equal(volume(out, "1.16"), hu)


def test_inconsistent_geometry_keeps_majority(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "in"
    hu = random_hu(rng, (4, 8, 8))
    write_series(folder, hu, "1.3")
    write_slice(folder / "odd.dcm", np.zeros((6, 6), np.uint16), series_uid="1.3", position=(-50, -60, 10.0))
    report = prep([folder], tmp_path / "out")
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.3"), hu)
    files = {Path(f["path"]).name: f["reason"] for f in report["files_skipped"]}
    assert "inconsistent geometry" in files["odd.dcm"]


def test_duplicates_dropped_gaps_and_irregular_spacing_reported(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    folder.mkdir()
    zs = [0.0, 1.0, 2.0, 2.0, 4.0, 5.0, 6.0]          # one duplicate, one gap
    hu = random_hu(rng, (len(zs), 6, 6))
    for k, z in enumerate(zs):
        write_slice(folder / f"{k}.dcm", (hu[k] + 1024).astype(np.uint16), series_uid="1.4.1",
                    position=(0, 0, z), instance=k + 1)
    zs2 = [0.0, 1.0, 2.4, 3.4, 4.4]                    # irregular step, not a missing slice
    hu2 = random_hu(rng, (len(zs2), 6, 6))
    for k, z in enumerate(zs2):
        write_slice(folder / f"b{k}.dcm", (hu2[k] + 1024).astype(np.uint16), series_uid="1.4.2",
                    position=(0, 0, z), instance=k + 1, patient_id="P2")
    report = prep([folder], tmp_path / "out")
    vol = volume(tmp_path / "out", "1.4.1")
    assert vol.shape[0] == 6
    np.testing.assert_array_equal(vol[[0, 1, 3, 4, 5]], hu[[0, 1, 4, 5, 6]])
    assert any(f["reason"] == "duplicate slice position" for f in report["files_skipped"])
    rows = index_rows(tmp_path / "out")
    assert float(rows["1.4.1"]["spacing_z"]) == 1.0
    assert "gap" in " ".join(report["series_notes"]["1.4.1"])
    assert "gap" in rows["1.4.1"]["notes"]
    assert float(rows["1.4.2"]["spacing_z"]) == pytest.approx(1.0)
    assert "irregular" in " ".join(report["series_notes"]["1.4.2"])
    # their slice positions are recorded, so that the 2.5D stacks can pick neighbours by position
    assert rows["1.4.1"]["z_positions"] == "0 1 2 4 5 6"
    assert rows["1.4.2"]["z_positions"] == "0 1 2.4 3.4 4.4"


def test_evenly_spaced_series_record_no_positions(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    folder.mkdir()
    hu = random_hu(rng, (4, 6, 6))
    for k in range(4):
        write_slice(folder / f"{k}.dcm", (hu[k] + 1024).astype(np.uint16), series_uid="1.4.3",
                    position=(0, 0, -100.0 + 2.5 * k), instance=k + 1)
    prep([folder], tmp_path / "out")
    assert index_rows(tmp_path / "out")["1.4.3"]["z_positions"] == ""


def test_compressed_without_decoder_is_skipped_with_install_hint(tmp_path):
    if get_decoder(JPEGLossless).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    rng = np.random.default_rng(6)
    folder = tmp_path / "in"
    write_series(folder, random_hu(rng, (3, 8, 8)), "1.6.1")
    write_series(folder, random_hu(rng, (3, 8, 8)), "1.6.2", transfer_syntax=JPEGLossless)
    report = prep([folder], tmp_path / "out")
    assert report["series_written"] == ["1.6.1"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.6.2"
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in skip["reason"]
    assert "gdcm" in skip["reason"]


def test_compressed_with_decoder_is_decoded(tmp_path):
    hu = random_hu(np.random.default_rng(16), (3, 8, 8))
    files = write_series(tmp_path / "in", hu, "1.17", transfer_syntax=RLELossless)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == RLELossless
    prep([tmp_path / "in"], tmp_path / "out")
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.17"), hu)


def test_rerun_keeps_done_series_unless_forced(tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "in"
    write_series(folder, random_hu(rng, (3, 8, 8)), "1.7.1", patient_id="A")
    write_series(folder, random_hu(rng, (3, 8, 8)), "1.7.2", patient_id="B")
    out = tmp_path / "out"
    first = prep([folder], out)
    assert sorted(first["series_written"]) == ["1.7.1", "1.7.2"]
    stamp = (out / "volumes" / "1.7.1.npy").stat().st_mtime_ns
    second = prep([folder], out)
    assert second["series_written"] == [] and sorted(second["series_kept"]) == ["1.7.1", "1.7.2"]
    assert (out / "volumes" / "1.7.1.npy").stat().st_mtime_ns == stamp
    (out / "volumes" / "1.7.2.npy").unlink()
    third = prep([folder], out)
    assert third["series_written"] == ["1.7.2"] and third["series_kept"] == ["1.7.1"]
    forced = prep([folder], out, force=True)
    assert sorted(forced["series_written"]) == ["1.7.1", "1.7.2"]
    assert set(index_rows(out)) == {"1.7.1", "1.7.2"}


def test_a_rerun_keeps_the_notes_of_the_series_it_keeps(tmp_path):
    """prep_report.json lists the notes of each series (gaps, spacing, orientation); a re-run,
    or the run that finishes an interrupted one, listed only those of the series it read
    itself, and the summary lost its 'notes on N series' line. The kept series' notes come
    from the index, as their run wrote them."""
    rng = np.random.default_rng(9)
    folder = tmp_path / "in"
    write_series(folder, random_hu(rng, (4, 6, 6)), "1.9.1", patient_id="A")
    hu = random_hu(rng, (4, 6, 6))
    for k, z in enumerate([0.0, 1.0, 3.0, 4.0]):   # one slice missing
        write_slice(folder / f"gap{k}.dcm", (hu[k] + 1024).astype(np.uint16), series_uid="1.9.2",
                    position=(0, 0, z), instance=k + 1, patient_id="B")
    out = tmp_path / "out"
    first = prep([folder], out)
    again = prep([folder], out)
    assert again["series_kept"] == ["1.9.1", "1.9.2"] and again["series_written"] == []
    assert again["series_notes"] == {"1.9.2": ["; ".join(first["series_notes"]["1.9.2"])]}
    assert "gap in slice positions" in again["series_notes"]["1.9.2"][0]
    assert "notes on 1 series (all in the report), e.g. 1.9.2: 1 gap in slice positions" in \
        ingest.format_summary(again)


def test_index_and_split_cover_series_from_earlier_runs(tmp_path):
    rng = np.random.default_rng(8)
    write_series(tmp_path / "a", random_hu(rng, (3, 8, 8)), "1.8.1", patient_id="A")
    write_series(tmp_path / "b", random_hu(rng, (3, 8, 8)), "1.8.2", patient_id="B")
    out = tmp_path / "out"
    prep([tmp_path / "a"], out)
    prep([tmp_path / "b"], out)
    assert set(index_rows(out)) == {"1.8.1", "1.8.2"}
    split = json.loads((out / "_splits" / "val10_seed0.json").read_text())
    assert sorted(split["train"] + split["val"]) == ["1.8.1", "1.8.2"]


def test_a_rerun_with_another_split_extends_the_earlier_splits_over_the_new_series(tmp_path):
    """The default val10_seed0.json of a first prep, left as it was by a second prep with
    --val-fraction 0.3 that added a patient, would train on part of the data without a word;
    extended, it keeps every earlier patient on its side."""
    rng = np.random.default_rng(8)
    for p in "ABC":
        write_series(tmp_path / p, random_hu(rng, (3, 8, 8)), f"1.8.{ord(p)}", patient_id=p)
    out = tmp_path / "out"
    prep([tmp_path / "A", tmp_path / "B"], out)
    (out / "_splits" / "mine.json").write_text('{"train": ["1.8.65"], "val": []}')   # a user's own: kept
    first = json.loads((out / "_splits" / "val10_seed0.json").read_text())
    report = prep([tmp_path / "A", tmp_path / "B", tmp_path / "C"], out, val_fraction=0.3)
    assert report["split"]["refreshed"] == ["val10_seed0.json"]
    patients = {sid: r["patient_id"] for sid, r in index_rows(out).items()}
    assert json.loads((out / "_splits" / "val30_seed0.json").read_text()) == patient_split(patients, 0.3, 0)
    extended = json.loads((out / "_splits" / "val10_seed0.json").read_text())
    assert sorted(extended["train"] + extended["val"]) == sorted(patients)
    for side in ("train", "val"):
        assert set(first[side]) <= set(extended[side])
    assert json.loads((out / "_splits" / "mine.json").read_text()) == {"train": ["1.8.65"], "val": []}


def test_extending_a_split_moves_no_earlier_patient():
    """Where a fresh patient_split of a grown index moves an earlier training patient to
    the val side (it does for some sizes), extend_split keeps it, and still fills the val
    side from the new patients up to the fraction."""
    moved_fresh = 0
    for n in range(2, 40):
        for added in (1, 3, 9):
            for fraction in (0.1, 0.25, 0.3):
                old = {f"s{i}": f"p{i}" for i in range(n)}
                grown = {**old, **{f"s{i}": f"p{i}" for i in range(n, n + added)}}
                before = patient_split(old, fraction, 0)
                fresh = patient_split(grown, fraction, 0)
                moved_fresh += bool(set(before["train"]) & set(fresh["val"]))
                after = extend_split(before, grown, fraction, 0)
                assert set(before["train"]) <= set(after["train"]) and set(before["val"]) <= set(after["val"])
                assert sorted(after["train"] + after["val"]) == sorted(grown)
                want = min(max(round(fraction * (n + added)), 1), n + added - 1)
                assert len(after["val"]) == max(want, len(before["val"])), (n, added, fraction)
                assert after["train"]
    assert moved_fresh > 0                       # the case the extension exists for
    assert extend_split(None, {"a": "p", "b": "q"}, 0.5, 0) == patient_split({"a": "p", "b": "q"}, 0.5, 0)
    assert extend_split({"train": [], "val": ["a"]}, {"a": "p", "b": "q"}, 0.5, 0) == {"train": ["b"], "val": ["a"]}

def test_index_columns_and_split_file(tmp_path):
    rng = np.random.default_rng(9)
    for p in range(8):
        write_series(tmp_path / "in" / f"p{p}", random_hu(rng, (2, 4, 4)), f"1.9.{p}", patient_id=f"P{p % 4}")
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out, val_fraction=0.25, split_seed=3)
    header = (out / "_index" / "index.csv").read_text().splitlines()[0].split(",")
    assert header[:len(INDEX_COLUMNS)] == INDEX_COLUMNS
    for row in index_rows(out).values():
        assert (out / row["path"]).is_file() and not Path(row["path"]).is_absolute()
    split = json.loads((out / "_splits" / "val25_seed3.json").read_text())
    assert report["split"]["file"] == "_splits/val25_seed3.json"
    patients = {r["series_id"]: r["patient_id"] for r in index_rows(out).values()}
    train_p = {patients[s] for s in split["train"]}
    val_p = {patients[s] for s in split["val"]}
    assert not train_p & val_p and len(val_p) == 1 and len(train_p) == 3


def test_patient_split_properties():
    series = {f"s{i}": f"p{i // 3}" for i in range(60)}          # 20 patients, 3 series each
    split = patient_split(series, 0.1, 0)
    assert split == patient_split(dict(reversed(list(series.items()))), 0.1, 0)
    val_p = {series[s] for s in split["val"]}
    assert len(val_p) == 2 and not val_p & {series[s] for s in split["train"]}
    assert sorted(split["train"] + split["val"]) == sorted(series)
    assert patient_split(series, 0.1, 1) != split
    assert patient_split({"a": "p"}, 0.1, 0) == {"train": ["a"], "val": []}
    assert patient_split({"a": "p", "b": "q"}, 0.1, 0)["val"] != []
    assert split_name(0.1, 0) == "val10_seed0.json" and split_name(0.25, 3) == "val25_seed3.json"
    assert split_name(0.07, 0) == "val7_seed0.json" and split_name(0.0, 0) == "val0_seed0.json"
    # fractions that used to round to one name get their own
    assert [split_name(f, 0) for f in (0.001, 0.124, 0.125)] == ["val0.1_seed0.json", "val12.4_seed0.json",
                                                                 "val12.5_seed0.json"]


def test_workers_give_the_same_result(tmp_path):
    rng = np.random.default_rng(10)
    for p in range(3):
        write_series(tmp_path / "in" / f"p{p}", random_hu(rng, (3, 8, 8)), f"1.10.{p}", patient_id=f"P{p}")
    one = prep([tmp_path / "in"], tmp_path / "o1", workers=1)
    two = prep([tmp_path / "in"], tmp_path / "o2", workers=2)
    assert sorted(one["series_written"]) == sorted(two["series_written"])
    assert (tmp_path / "o1/_index/index.csv").read_text() == (tmp_path / "o2/_index/index.csv").read_text()
    for sid in one["series_written"]:
        np.testing.assert_array_equal(volume(tmp_path / "o1", sid), volume(tmp_path / "o2", sid))


def test_interrupted_write_leaves_no_partial_volume(tmp_path, monkeypatch):
    target = tmp_path / "v.npy"

    def dying_save(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ingest.save_volume(target, np.zeros((2, 2, 2), np.int16))
    assert list(tmp_path.iterdir()) == []


# A driver of `dinox prep` whose workers write the first series and then hang on the others,
# so that a stop signal lands mid-run at a known point; the parent touches the file MARK once
# it has recorded the first series. The patch reaches the workers only if they are forked,
# which is not the default from Python 3.14 on (forkserver): fork is asked for.
_STALLED_PREP = """
import multiprocessing, os, signal, sys, time
multiprocessing.set_start_method("fork")
# as launched from a terminal: the suite may run under nohup (SIGHUP ignored) or as a shell's
# background job (SIGINT ignored), and prep keeps an ignored signal ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from dinox.data import ingest, parallel
real, update = ingest.process_task, parallel.Progress.update
def stalled(task, root):
    if task.series_id != "1.21.0":
        time.sleep(120)
    return real(task, root)
def recorded(self):
    update(self)
    if self.desc == "prep":
        open(os.environ["MARK"], "w").close()
ingest.process_task, parallel.Progress.update = stalled, recorded
from dinox.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for_first_series(proc: subprocess.Popen, mark: Path) -> None:
    deadline = time.monotonic() + 60
    while not mark.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
        time.sleep(0.05)


def _assert_group_ends(pgid: int) -> None:
    """The process group of a stopped prep (its workers) is gone within 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "worker processes left running"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stopped_prep_indexes_what_it_wrote_stops_its_workers_and_a_rerun_goes_on(tmp_path, sig, code):
    """Ctrl-C (SIGINT to the process group) or SIGTERM (`kill`, a scheduler, `timeout`, which
    signals both the process and its group) mid-run: exit 130 or 143 with one line saying
    what is done and what to do, the volumes written indexed, no worker left behind, no
    temporary file; the same command again reads only the series that were not written.
    SIGTERM used to end prep at once, unindexed and silent, its workers left waiting on their
    queue for ever; Ctrl-C printed a traceback per worker and could hang. A closed terminal's
    SIGHUP (no nohup, no tmux) did the same as SIGTERM: it now stops as they do, exit 129."""
    rng = np.random.default_rng(21)
    for k in range(4):
        write_series(tmp_path / "in" / f"s{k}", random_hu(rng, (3, 4, 4)), f"1.21.{k}", patient_id=f"P{k}")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_PREP, "prep", "--input", str(tmp_path / "in"),
                             "--output", str(out), "--workers", "2"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "MARK": str(tmp_path / "recorded")})
    try:
        _wait_for_first_series(proc, tmp_path / "recorded")
        os.kill(proc.pid, sig)
        os.killpg(proc.pid, sig)
        err = proc.communicate(timeout=15)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code
    name = signal.Signals(sig).name
    assert err == (f"prep stopped by {name} after 1 of the 4 series to prepare: the volumes written are in "
                   f"{out / '_index' / 'index.csv'} and are not read again; run the same command again to prepare "
                   f"the other 3 and write the split, the nodule table and the report\n")
    _assert_group_ends(proc.pid)   # the workers were stopped with their parent
    assert list(index_rows(out)) == ["1.21.0"]
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["1.21.0.npy"]
    again = prep([tmp_path / "in"], out)
    assert again["series_kept"] == ["1.21.0"] and sorted(again["series_written"]) == ["1.21.1", "1.21.2", "1.21.3"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_prep_killed_outright_leaves_no_worker_behind(tmp_path):
    """SIGKILL (kill -9, the system out of memory) gives prep no chance to stop its pool's
    workers: they waited on their task queue for ever. The kernel now ends them with it."""
    rng = np.random.default_rng(22)
    for k in range(3):
        write_series(tmp_path / "in" / f"s{k}", random_hu(rng, (3, 4, 4)), f"1.21.{k}", patient_id=f"P{k}")
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_PREP, "prep", "--input", str(tmp_path / "in"),
                             "--output", str(tmp_path / "out"), "--workers", "2"], stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "MARK": str(tmp_path / "recorded")})
    try:
        _wait_for_first_series(proc, tmp_path / "recorded")   # the workers hold the other series now
        proc.kill()
        proc.wait(timeout=10)
        _assert_group_ends(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_prep_that_is_not_stopped_never_stops_its_workers(tmp_path, monkeypatch):
    """The header scan's pool was left to a garbage-collection finalizer (its map not run to
    its end): every prep with workers terminated them there, and a Ctrl-C landing then was
    swallowed ("Exception ignored in ...") while every later signal was ignored."""
    from dinox.data import parallel

    stopped = []
    monkeypatch.setattr(parallel, "_stop_workers", lambda pool: stopped.append(pool))
    rng = np.random.default_rng(23)
    for k in range(3):
        write_series(tmp_path / "in" / f"p{k}", random_hu(rng, (3, 4, 4)), f"1.23.{k}", patient_id=f"P{k}")
    report = ingest.prepare([tmp_path / "in"], tmp_path / "out", workers=2)
    assert len(report["series_written"]) == 3 and stopped == []


def test_a_prep_stopped_before_its_volumes_says_to_run_it_again(tmp_path, monkeypatch, capsys):
    """SIGTERM while the headers are read (nothing written yet) ended prep without a word;
    now it is one line, exit 143, and the handlers are put back."""
    write_series(tmp_path / "in", random_hu(np.random.default_rng(22), (3, 4, 4)), "1.22")

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop prep")

    monkeypatch.setattr(ingest, "_dicom_tasks", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["prep", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1"]) == 143
    assert capsys.readouterr().err == ("prep stopped by SIGTERM before it finished; run the same command again "
                                       "(series already in the index are not read again)\n")
    assert signal.getsignal(signal.SIGTERM) == before


def test_progress_in_a_log_file_is_a_plain_line_now_and_then(monkeypatch, capsys):
    """Where stderr is no terminal (nohup, a scheduler's log) tqdm writes nothing: a prep of
    a whole archive showed no sign of life until its summary. There it is a plain line at
    most every PLAIN_PROGRESS_S, with the time left; the last item needs none."""
    from dinox.data import parallel

    monkeypatch.setattr(parallel, "PLAIN_PROGRESS_S", 0.0)
    assert list(parallel.process_map(abs, [-1, -2, -3], 1, "prep", True)) == [1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[0] for line in lines] == ["prep: 1 of 3 series (33 %)", "prep: 2 of 3 series (66 %)"]
    assert all(line.endswith(" s left") and " so far, about " in line for line in lines)
    assert list(parallel.process_map(abs, [-1, -2], 1, "headers", False, unit="file")) == [1, 2]
    assert capsys.readouterr().err == ""


def test_stale_temp_files_are_removed(tmp_path):
    rng = np.random.default_rng(11)
    write_series(tmp_path / "in", random_hu(rng, (3, 4, 4)), "1.11")
    out = tmp_path / "out"
    (out / "volumes").mkdir(parents=True)
    stale = out / "volumes" / ".1.11.npy.tmp12345"
    stale.write_bytes(b"half")
    prep([tmp_path / "in"], out)
    assert not stale.exists()
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["1.11.npy"]


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_reoriented_to_zhw(tmp_path, suffix):
    rng = np.random.default_rng(12)
    vol = random_hu(rng, (5, 6, 7))                      # (Z, H, W) as a DICOM axial series
    sz, sy, sx = 2.5, 0.8, 0.7
    for sid in ("case_a", "case_b"):   # one root each: two copies of one scan are indexed once
        (tmp_path / sid).mkdir()
    # LPS-like storage: i -> patient left, j -> posterior, k -> superior
    lps = np.diag([-sx, -sy, sz, 1.0])
    _nifti(tmp_path / "case_a" / f"case_a{suffix}", np.ascontiguousarray(vol.transpose(2, 1, 0)), lps)
    # permuted and flipped storage: i -> posterior rows, j -> slices top-down, k -> patient left
    perm = np.array([[0, 0, -sx, 0], [-sy, 0, 0, 0], [0, -sz, 0, 0], [0, 0, 0, 1.0]])
    _nifti(tmp_path / "case_b" / f"case_b{suffix}", np.ascontiguousarray(vol[::-1].transpose(1, 0, 2)), perm)
    for sid in ("case_a", "case_b"):
        out = tmp_path / f"out_{sid}"
        assert prep([tmp_path / sid], out)["series_written"] == [sid]
        rows = index_rows(out)
        np.testing.assert_array_equal(volume(out, sid), vol)
        assert rows[sid]["patient_id"] == sid
        assert (float(rows[sid]["spacing_z"]), float(rows[sid]["spacing_y"]),
                float(rows[sid]["spacing_x"])) == pytest.approx((sz, sy, sx))


def test_nifti_mask_and_same_names_in_patient_folders(tmp_path):
    rng = np.random.default_rng(13)
    for p in ("p1", "p2"):
        (tmp_path / "in" / p).mkdir(parents=True)
        _nifti(tmp_path / "in" / p / "ct.nii.gz", random_hu(rng, (3, 4, 4)), np.eye(4))
    _nifti(tmp_path / "in" / "p1" / "seg.nii.gz", np.ones((3, 4, 4), np.uint8), np.eye(4))
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert sorted(report["series_written"]) == ["p1_ct", "p2_ct"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "seg" and "not look like CT" in skip["reason"]
    rows = index_rows(tmp_path / "out")
    assert rows["p1_ct"]["patient_id"] != rows["p2_ct"]["patient_id"]


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(["prep", *map(str, args), "--workers", "1"])
    return rc, capsys.readouterr().err


def _assert_user_error(rc: int, err: str, *words: str) -> None:
    assert rc != 0
    assert err.startswith("error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


def test_cli_missing_input(tmp_path, capsys):
    rc, err = _cli(capsys, "--input", tmp_path / "nope", "--output", tmp_path / "out")
    _assert_user_error(rc, err, "not found")


def test_cli_empty_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = _cli(capsys, "--input", tmp_path / "empty", "--output", tmp_path / "out")
    _assert_user_error(rc, err, "empty")


def test_cli_no_ct_series(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")
    write_series(tmp_path / "in", random_hu(np.random.default_rng(0), (3, 4, 4)), "1.12", modality="MR")
    rc, err = _cli(capsys, "--input", tmp_path / "in", "--output", tmp_path / "out")
    _assert_user_error(rc, err, "no usable CT series")
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert report["counts"]["series_skipped"] == 1 and report["counts"]["files_skipped"] == 1


def test_cli_output_is_a_file(tmp_path, capsys):
    write_series(tmp_path / "in", random_hu(np.random.default_rng(0), (3, 4, 4)), "1.13")
    (tmp_path / "out").write_text("x")
    rc, err = _cli(capsys, "--input", tmp_path / "in", "--output", tmp_path / "out")
    _assert_user_error(rc, err, "existing file")


def test_cli_prints_summary(tmp_path, capsys):
    write_series(tmp_path / "in", random_hu(np.random.default_rng(0), (3, 4, 4)), "1.14")
    (tmp_path / "in" / "junk.txt").write_text("x")
    rc = main(["prep", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 series written" in out and "1 not a DICOM file" in out and "val10_seed0.json" in out


def test_the_summary_ends_with_the_train_command_for_the_root_and_its_split(tmp_path, capsys):
    """The summary said what was written, not what to run with it: its last line is the
    `dinox train` dry run of the root, naming the split where it is not train's default."""
    import shlex

    from dinox.cli import build_parser

    rng = np.random.default_rng(1)
    for k in range(4):
        write_series(tmp_path / "in" / f"p{k}", random_hu(rng, (3, 4, 4)), f"1.15.{k}", patient_id=f"P{k}")
    out = tmp_path / "my root"
    for extra, manifest in (([], ""), (["--val-fraction", "0.5", "--split-seed", "1"],
                                       f" --split-manifest '{out / '_splits' / 'val50_seed1.json'}'")):
        assert main(["prep", "--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1", *extra]) == 0
        last = capsys.readouterr().out.splitlines()[-1]
        command = f"dinox train --data-root '{out}'{manifest} --config vit-large --dry-run"
        assert last == f"  next: {command}  (plans the run on this machine's memory; the same without --dry-run " \
                       f"trains; docs/phase5_big_run.md)"
        args, unknown = build_parser().parse_known_args(shlex.split(command)[1:])
        assert not unknown and args.dry_run and Path(args.data_root) == out
    # the demo's prep: its own next step follows, not this advice
    assert main(["prep", "--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1",
                 "--no-next-step"]) == 0
    assert "next:" not in capsys.readouterr().out
    assert main(["prep", "--help"]) == 0 and "next-step" not in capsys.readouterr().out   # plumbing, not a user's flag
