"""Prep defects: series ids that collide as file names, a run in which every series fails,
headers that declare more pixels than the file holds or than a CT slice can have, and the
archive inputs that aborted or silently corrupted a prep (a private transfer syntax, a file
name that is not UTF-8, a NIfTI re-run from another folder, a malformed InstanceNumber, one
SeriesInstanceUID for two patients, CT without rescale tags, sagittal and tilted stacks)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dinox.data import dicom_io
from dinox.errors import UserError

from test_ingest import _nifti, index_rows, prep, random_hu, volume, write_series, write_slice

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _volumes_by_source(out: Path) -> dict[str, np.ndarray]:
    """Each index row's volume keyed by the folder the series came from."""
    return {Path(r["source"]).name: np.load(out / r["path"]) for r in index_rows(out).values()}


@pytest.mark.parametrize("uid_a, uid_b", [
    ("1.2.826.0.1.7", "1.2.826.0.1.7."),      # sanitising strips the trailing dot
    ("CT/series 7", "CT series 7"),           # both sanitise to CT_series_7
    ("1.2.abc.7", "1.2.ABC.7"),               # one file on a case-insensitive file system
])
def test_series_ids_that_sanitise_alike_get_their_own_volumes(tmp_path, uid_a, uid_b):
    rng = np.random.default_rng(0)
    a, b = random_hu(rng, (3, 6, 6)), random_hu(rng, (4, 6, 6))
    write_series(tmp_path / "in" / "a", a, uid_a, patient_id="A")
    write_series(tmp_path / "in" / "b", b, uid_b, patient_id="B")
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert len(report["series_written"]) == 2
    ids = report["series_written"]
    assert len({sid.lower() for sid in ids}) == 2
    assert set(index_rows(out)) == set(ids)
    assert len(list((out / "volumes").glob("*.npy"))) == 2
    vols = _volumes_by_source(out)
    np.testing.assert_array_equal(vols["a"], a)
    np.testing.assert_array_equal(vols["b"], b)
    again = prep([tmp_path / "in"], out)
    assert again["series_written"] == [] and sorted(again["series_kept"]) == sorted(ids)
    assert set(index_rows(out)) == set(ids)


def test_series_id_depends_on_its_uid_alone(tmp_path):
    """A re-run with the colliding series added keeps the first series' id (and volume)."""
    rng = np.random.default_rng(1)
    a, b = random_hu(rng, (3, 4, 4)), random_hu(rng, (3, 4, 4))
    write_series(tmp_path / "a", a, "img scan 9", patient_id="A")
    write_series(tmp_path / "b", b, "img/scan 9", patient_id="B")
    out = tmp_path / "out"
    (first,) = prep([tmp_path / "a"], out)["series_written"]
    second = prep([tmp_path / "a", tmp_path / "b"], out)
    assert second["series_kept"] == [first] and len(second["series_written"]) == 1
    assert len(index_rows(out)) == 2
    vols = _volumes_by_source(out)
    np.testing.assert_array_equal(vols["a"], a)
    np.testing.assert_array_equal(vols["b"], b)


def test_nifti_named_like_a_dicom_series_gets_its_own_volume(tmp_path):
    rng = np.random.default_rng(2)
    dcm, nii = random_hu(rng, (3, 4, 4)), random_hu(rng, (3, 4, 4))
    write_series(tmp_path / "in" / "dicom", dcm, "1.2.3.9", patient_id="A")
    (tmp_path / "in" / "nifti").mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(nii.transpose(2, 1, 0)), np.diag([-1.0, -1.0, 1.0, 1.0])),
             str(tmp_path / "in" / "nifti" / "1.2.3.9.nii.gz"))
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert len(report["series_written"]) == 2 and "1.2.3.9" in report["series_written"]
    assert len(index_rows(out)) == 2
    np.testing.assert_array_equal(np.load(out / "volumes" / "1.2.3.9.npy"), dcm)
    (other,) = set(report["series_written"]) - {"1.2.3.9"}
    assert np.load(out / "volumes" / f"{other}.npy").shape == nii.shape


def _unreadable_series(folder: Path, uid: str, patient: str) -> None:
    """A series whose headers are fine but whose pixel data is cut short in every file."""
    for f in write_series(folder, random_hu(np.random.default_rng(3), (3, 8, 8)), uid, patient_id=patient):
        f.write_bytes(f.read_bytes()[:-60])


def test_every_series_failing_is_an_error_not_an_empty_index(tmp_path):
    _unreadable_series(tmp_path / "in" / "a", "1.2.70.1", "A")
    _unreadable_series(tmp_path / "in" / "b", "1.2.70.2", "B")
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        prep([tmp_path / "in"], out)
    message = str(err.value)
    assert "\n" not in message
    assert "no volume written" in message and "2 series" in message
    assert "run prep again" in message and "prep_report.json" in message
    assert "readable pixel data" in message
    report = json.loads((out / "prep_report.json").read_text())
    assert report["counts"]["series_written"] == 0 and report["counts"]["series_skipped"] == 2
    assert not (out / "_index").exists() and not (out / "_splits").exists()


def test_failing_series_next_to_volumes_of_earlier_runs_is_also_an_error(tmp_path):
    write_series(tmp_path / "good", random_hu(np.random.default_rng(4), (3, 4, 4)), "1.2.71.1")
    out = tmp_path / "out"
    prep([tmp_path / "good"], out)
    _unreadable_series(tmp_path / "bad", "1.2.71.2", "B")
    with pytest.raises(UserError, match="no volume written"):
        prep([tmp_path / "bad"], out)
    assert set(index_rows(out)) == {"1.2.71.1"}          # the earlier index is left as it was


def _declared_size_series(folder: Path, uid: str, rows: int, cols: int) -> None:
    """Three slices whose header declares rows x cols but that hold 8 x 8 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        path = write_slice(folder / f"{k}.dcm", np.zeros((8, 8), np.uint16), series_uid=uid,
                           position=(0, 0, float(k)), instance=k + 1)
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = rows, cols
        ds.save_as(path, enforce_file_format=True)


def test_huge_declared_slice_size_is_skipped_before_allocating(tmp_path, monkeypatch):
    write_series(tmp_path / "in" / "good", random_hu(np.random.default_rng(5), (3, 4, 4)), "1.2.72.1")
    _declared_size_series(tmp_path / "in" / "huge", "1.2.72.2", 65535, 65535)
    read = []
    real_read = dicom_io.read_volume
    monkeypatch.setattr(dicom_io, "read_volume", lambda plan: read.append(plan.series_uid) or real_read(plan))
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.72.1"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.72.2"
    assert "65535x65535" in skip["reason"] and str(dicom_io.MAX_SLICE_SIZE) in skip["reason"]
    assert read == ["1.2.72.1"]           # the volume of the huge one was never allocated
    on_disk = json.loads((tmp_path / "out" / "prep_report.json").read_text())
    assert on_disk["series_skipped"][0]["reason"] == skip["reason"]


def test_pixel_data_shorter_than_declared_is_skipped(tmp_path):
    write_series(tmp_path / "in" / "good", random_hu(np.random.default_rng(6), (3, 4, 4)), "1.2.73.1")
    _declared_size_series(tmp_path / "in" / "short", "1.2.73.2", 2048, 2048)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.73.1"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.73.2" and skip["reason"].startswith("pixel data truncated")
    assert "2048x2048" in skip["reason"]


def test_cli_every_series_failing_exits_non_zero_with_one_line(tmp_path, capsys):
    from dinox.cli import main

    _unreadable_series(tmp_path / "in", "1.2.74.1", "A")
    rc = main(["prep", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1"])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.err.startswith("error: no volume written") and len(captured.err.strip().splitlines()) == 1
    assert "one patient only" not in captured.out + captured.err


def test_oblique_nifti_is_written_with_a_note(tmp_path):
    """A volume whose axes are rotated 15 degrees about z is laid out along the nearest axes
    (no resampling) and the report says so; an axis-aligned one gets no note."""
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, (32, 32, 6)).astype(np.int16)
    angle = np.radians(15.0)
    rotated = np.diag([0.7, 0.7, 2.5, 1.0])
    rotated[:2, :2] = 0.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(data, rotated), tmp_path / "in" / "oblique.nii.gz")
    nib.save(nib.Nifti1Image(data + 1, np.diag([0.7, 0.7, 2.5, 1.0])),   # another scan, not a copy
             tmp_path / "in" / "straight.nii.gz")
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert sorted(report["series_written"]) == ["oblique", "straight"]
    note = report["series_notes"].get("oblique", "")
    notes = note if isinstance(note, str) else "; ".join(note)
    assert "oblique volume" in notes and "15.0 degrees" in notes
    assert "straight" not in report["series_notes"]


def test_prep_onto_a_read_only_output_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import errno

    from dinox.cli import main

    write_series(tmp_path / "in" / "s1", random_hu(np.random.default_rng(1), (4, 32, 32)), "1.2.3.4.1")
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write_test"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    rc = main(["prep", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("error: cannot write the processed root") and "Read-only file system" in err


def test_old_index_rows_outside_the_root_are_dropped_and_rewritten(tmp_path):
    import csv

    write_series(tmp_path / "in" / "s1", random_hu(np.random.default_rng(2), (4, 32, 32)), "1.2.3.4.2")
    out = tmp_path / "out"
    prep([tmp_path / "in"], out)
    outside = tmp_path / "secret.npy"
    np.save(outside, np.zeros((4, 32, 32), np.int16))
    index = out / "_index" / "index.csv"
    rows = list(csv.DictReader(index.open()))
    original = rows[0]["path"]
    rows[0]["path"] = os.path.relpath(outside, out)  # ../secret.npy: outside the root
    with index.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = prep([tmp_path / "in"], out)
    assert report["series_kept"] == [] and len(report["series_written"]) == 1
    assert list(csv.DictReader(index.open()))[0]["path"] == original


def test_output_equal_to_input_is_refused_before_anything_is_written(tmp_path, capsys):
    """The walk skips the output root, so the same folder on both sides found no CT and wrote
    prep_report.json into the DICOM folder."""
    from dinox.cli import main

    write_series(tmp_path / "in" / "s1", random_hu(np.random.default_rng(1), (4, 32, 32)), "1.2.3.4.1")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(["prep", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "in") + "/", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "is also the --output folder" in err and f"--output {tmp_path / 'processed'}" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _rewrite(files, **elements) -> None:
    """Set (or, given None, delete) elements in written files, as another writer would have."""
    for f in files:
        ds = pydicom.dcmread(f)
        for name, value in elements.items():
            if value is None:
                delattr(ds, name)
            else:
                setattr(ds, name, value)
        ds.save_as(f, enforce_file_format=True)


def test_private_transfer_syntax_skips_that_series_only(tmp_path):
    hu = random_hu(np.random.default_rng(20), (3, 4, 4))
    write_series(tmp_path / "in" / "good", hu, "1.2.80.1")
    for f in write_series(tmp_path / "in" / "ge", hu, "1.2.80.2"):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"    # GE private implicit VR big endian
        pydicom.dcmwrite(f, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.80.1"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.80.2" and skip["n_files"] == 3
    assert skip["reason"].startswith("unknown or private transfer syntax 1.2.840.113619.5.2: convert")


def test_an_unexpected_error_planning_one_series_skips_it_alone(tmp_path, monkeypatch):
    rng = np.random.default_rng(21)
    write_series(tmp_path / "in" / "a", random_hu(rng, (3, 4, 4)), "1.2.81.1")
    write_series(tmp_path / "in" / "b", random_hu(rng, (3, 4, 4)), "1.2.81.2", patient_id="B")
    real = dicom_io.plan_series

    def plan(headers):
        if headers[0].series_uid == "1.2.81.2":
            raise ZeroDivisionError("float division by zero")
        return real(headers)

    monkeypatch.setattr(dicom_io, "plan_series", plan)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.81.1"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.81.2" and skip["patient_id"] == "B"
    assert skip["reason"] == "cannot plan series (ZeroDivisionError: float division by zero)"


def _folder(parent: Path, name: bytes) -> Path:
    """A folder named by raw bytes (not UTF-8 where they say so), or a skip where the file
    system refuses such names."""
    path = os.path.join(os.fsencode(parent), name)
    try:
        os.makedirs(path)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return Path(os.fsdecode(path))


def test_names_that_are_not_utf8_are_indexed_printably_and_kept_on_rerun(tmp_path):
    rng = np.random.default_rng(22)
    hu = random_hu(rng, (3, 4, 4))
    cafe = _folder(tmp_path / "in", b"caf\xe9")
    write_series(cafe, hu, "1.2.82.1")
    (cafe / os.fsdecode(b"lis\xe9z-moi.txt")).write_text("not a scan")
    bad = _folder(tmp_path / "in", b"s\xe9rie")
    _nifti(bad / os.fsdecode(b"r\xe9sum\xe9.nii.gz"), random_hu(rng, (4, 5, 3)), np.eye(4))
    good = tmp_path / "in" / "Müller 日本"
    good.mkdir()
    _nifti(good / "ct é.nii.gz", random_hu(rng, (4, 5, 3)), np.eye(4))
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert len(report["series_written"]) == 3 and report["series_skipped"] == []
    rows = index_rows(out)                     # the index is UTF-8 text
    np.testing.assert_array_equal(volume(out, "1.2.82.1"), hu)
    assert rows["1.2.82.1"]["source"] == str(tmp_path / "in" / "caf\ufffd")
    by_patient = {r["patient_id"]: r for r in rows.values()}
    assert by_patient["r\ufffdsum\ufffd"]["source"] == str(tmp_path / "in" / "s\ufffdrie" / "r\ufffdsum\ufffd.nii.gz")
    assert by_patient["ct é"]["source"] == str(good / "ct é.nii.gz")      # valid Unicode unchanged
    on_disk = json.loads((out / "prep_report.json").read_text(encoding="utf-8"))
    assert [f["path"] for f in on_disk["files_skipped"]] == [str(tmp_path / "in" / "caf\ufffd" / "lis\ufffdz-moi.txt")]
    again = prep([tmp_path / "in"], out)
    assert again["series_written"] == [] and sorted(again["series_kept"]) == sorted(rows)
    assert index_rows(out) == rows


def _nifti_project(tmp_path: Path) -> dict[str, np.ndarray]:
    """data/nifti/{a,b}.nii.gz and data/{p1,p2}/ct.nii.gz (one name, one size) and an empty
    sub/ under tmp_path; returns each file's voxels (x, y, z) by its name under data/."""
    rng = np.random.default_rng(23)
    scans = {"nifti/a": random_hu(rng, (3, 4, 5)), "nifti/b": random_hu(rng, (4, 4, 5)),
             "p1/ct": random_hu(rng, (3, 4, 4)), "p2/ct": random_hu(rng, (3, 4, 4))}
    for name, data in scans.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        _nifti(tmp_path / "data" / f"{name}.nii.gz", data, np.eye(4))
    (tmp_path / "sub").mkdir()
    return scans


def test_nifti_rerun_from_another_folder_indexes_no_scan_twice(tmp_path, monkeypatch):
    _nifti_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    first = prep(["data"], "out")
    rows = index_rows(tmp_path / "out")
    assert len(rows) == 4 and all(Path(r["source"]).is_absolute() for r in rows.values())
    monkeypatch.chdir(tmp_path / "sub")
    again = prep(["../data"], "../out")
    assert again["series_written"] == [] and sorted(again["series_kept"]) == sorted(first["series_written"])
    assert index_rows(tmp_path / "out") == rows


def test_nifti_rows_with_a_relative_source_are_matched_from_another_folder(tmp_path, monkeypatch):
    """An older prep recorded the source as walked (relative to its working directory)."""
    import csv

    scans = _nifti_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    prep(["data"], "out")
    index = tmp_path / "out" / "_index" / "index.csv"
    rows = list(csv.DictReader(index.open()))
    for row in rows:
        row["source"] = os.path.relpath(row["source"], tmp_path)
    with index.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ids = {row["source"]: (row["series_id"], row["patient_id"]) for row in rows}
    monkeypatch.chdir(tmp_path / "sub")
    again = prep(["../data"], "../out")
    assert again["series_written"] == [] and len(again["series_kept"]) == 4
    now = index_rows(tmp_path / "out")
    assert {os.path.relpath(r["source"], tmp_path): (r["series_id"], r["patient_id"]) for r in now.values()} == ids
    assert all(Path(r["source"]).is_absolute() for r in now.values())
    for source, (sid, _) in ids.items():          # each id still holds its own file (an RAS volume, so x y z)
        xyz = scans[source.removeprefix("data/").removesuffix(".nii.gz")]
        np.testing.assert_array_equal(volume(tmp_path / "out", sid), xyz.transpose(2, 1, 0)[:, ::-1, ::-1])


def test_a_new_nifti_named_like_a_lost_one_but_of_another_size_is_a_new_scan(tmp_path, monkeypatch):
    rng = np.random.default_rng(24)
    (tmp_path / "old").mkdir()
    _nifti(tmp_path / "old" / "a.nii.gz", random_hu(rng, (3, 4, 5)), np.eye(4))
    prep([tmp_path / "old"], tmp_path / "out")
    (tmp_path / "old" / "a.nii.gz").unlink()
    (tmp_path / "new").mkdir()
    _nifti(tmp_path / "new" / "a.nii.gz", random_hu(rng, (3, 4, 6)), np.eye(4))
    report = prep([tmp_path / "new"], tmp_path / "out")
    assert report["series_kept"] == [] and len(report["series_written"]) == 1
    assert len(index_rows(tmp_path / "out")) == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_a_malformed_instance_number_keeps_the_slice(tmp_path):
    hu = random_hu(np.random.default_rng(25), (3, 4, 4))
    files = write_series(tmp_path / "in", hu, "1.2.85.1")
    raw = files[1].read_bytes()
    tag = b"\x20\x00\x13\x00IS\x02\x00"
    assert raw.count(tag + b"2 ") == 1
    files[1].write_bytes(raw.replace(tag + b"2 ", tag + b"ab"))
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.85.1"] and report["files_skipped"] == []
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.85.1"), hu)


@pytest.mark.parametrize("what, other", [("patients", dict(PatientID="Q2")),
                                         ("studies", dict(StudyInstanceUID="1.2.3.5"))])
def test_one_series_uid_shared_by_two_scans_is_skipped(tmp_path, what, other):
    rng = np.random.default_rng(26)
    write_series(tmp_path / "in" / "q1", random_hu(rng, (3, 4, 4)), "1.2.86.1", patient_id="Q1", dz=2.0)
    q2 = tmp_path / "in" / "q2"
    q2.mkdir()
    files = [write_slice(q2 / f"{k}.dcm", (random_hu(rng, (4, 4)) + 1024).astype(np.uint16), series_uid="1.2.86.1",
                         patient_id="Q1", position=(-50.0, -60.0, 2.0 * k + 1.0), instance=k + 1) for k in range(3)]
    _rewrite(files, **other)                  # interleaved positions: merged, they look like one volume
    write_series(tmp_path / "in" / "ok", random_hu(rng, (3, 4, 4)), "1.2.86.2")
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.86.2"]
    (skip,) = report["series_skipped"]
    values = "Q1, Q2" if what == "patients" else "1.2.3.4, 1.2.3.5"
    assert skip["series_id"] == "1.2.86.1"
    assert skip["reason"].startswith(f"one SeriesInstanceUID shared by 2 {what}: {values} (")


@pytest.mark.parametrize("tag, value", [("StudyInstanceUID", "1.2.3.4.9"), ("PatientID", "Q9")])
def test_one_slice_naming_another_study_or_patient_is_left_out_not_the_series(tmp_path, tag, value):
    """One flipped byte in one file's StudyInstanceUID (or PatientID) made its whole series
    "shared by 2 studies" and skipped it. A value that at most 2 slices give, against 20 times
    as many, is that slice's damaged or stray header: the slice is left out and named."""
    rng = np.random.default_rng(28)
    hu = random_hu(rng, (41, 4, 4))
    files = write_series(tmp_path / "in", hu, "1.2.88.1", patient_id="Q1", dz=2.0)
    _rewrite([files[7]], **{tag: value})
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.88.1"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.88.1"), np.delete(hu, 7, axis=0))
    (skipped,) = report["files_skipped"]
    assert skipped["path"] == str(files[7]) and skipped["reason"].startswith(f"{tag} {value!r} differs from the 40 "
                                                                           f"other slices'")
    assert any("1 slice naming another patient or study left out" in n for n in report["series_notes"]["1.2.88.1"])
    assert index_rows(tmp_path / "out")["1.2.88.1"]["patient_id"] == "Q1"


def test_ct_without_rescale_tags_is_noted_and_checked_for_hu(tmp_path):
    rng = np.random.default_rng(27)
    hu = random_hu(rng, (3, 4, 4))
    _rewrite(write_series(tmp_path / "in" / "unsigned", hu, "1.2.87.1"), RescaleSlope=None, RescaleIntercept=None)
    signed = tmp_path / "in" / "signed"              # stored values that already are HU (air -1000)
    signed.mkdir()
    files = [write_slice(signed / f"{k}.dcm", hu[k], series_uid="1.2.87.2", position=(0.0, 0.0, 2.0 * k),
                         instance=k + 1) for k in range(3)]
    _rewrite(files, RescaleSlope=None, RescaleIntercept=None)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.87.2"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.87.2"), hu)
    assert "3 of 3 slices have no RescaleSlope/RescaleIntercept" in "; ".join(report["series_notes"]["1.2.87.2"])
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.87.1"
    assert skip["reason"].startswith("no RescaleSlope/RescaleIntercept and the values do not look like CT in HU")
    assert "restore the rescale tags" in skip["reason"]
    assert not (tmp_path / "out" / "volumes" / "1.2.87.1.npy").exists()


def test_sagittal_and_tilted_series_are_noted_not_reoriented(tmp_path):
    rng = np.random.default_rng(28)
    hu = random_hu(rng, (4, 4, 4))
    tilt = np.tan(np.radians(20.0))
    layouts = {"1.2.88.1": ((0, 1, 0, 0, 0, -1), lambda k: (-2.0 * k, 0.0, 0.0)),       # sagittal
               "1.2.88.2": ((1, 0, 0, 0, 1, 0), lambda k: (0.0, 2.0 * k * tilt, 2.0 * k)),  # 20 degree tilt
               "1.2.88.3": ((1, 0, 0, 0, 1, 0), lambda k: (0.0, 0.0, 2.0 * k))}       # plain axial
    for uid, (orientation, position) in layouts.items():
        (tmp_path / "in" / uid).mkdir(parents=True)
        for k in range(4):
            write_slice(tmp_path / "in" / uid / f"{k}.dcm", (hu[k] + 1024).astype(np.uint16), series_uid=uid,
                        orientation=orientation, position=position(k), instance=k + 1)
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert sorted(report["series_written"]) == sorted(layouts)
    for uid in layouts:
        np.testing.assert_array_equal(volume(out, uid), hu)
    notes = report["series_notes"]
    assert notes["1.2.88.1"] == ["sagittal slices (normal -1.00, 0.00, 0.00): kept in the acquired plane, "
                                 "not resliced to axial"]
    (tilted,) = notes["1.2.88.2"]
    assert tilted.startswith("slices offset 20.0 degrees from their normal (gantry tilt?)")
    assert "1.2.88.3" not in notes


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    """A subfolder without read permission (simulated: the tests may run as root) is named in
    files_skipped; the readable series are prepared."""
    hu = random_hu(np.random.default_rng(21), (3, 4, 4))
    write_series(tmp_path / "in" / "ok", hu, "1.2.81.1")
    write_series(tmp_path / "in" / "locked", hu, "1.2.81.2")
    locked, listing = str(tmp_path / "in" / "locked"), os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = prep([tmp_path / "in"], tmp_path / "out")
    monkeypatch.undo()
    assert report["series_written"] == ["1.2.81.1"]
    assert {"path": locked, "reason": "folder not readable (Permission denied)"} in report["files_skipped"]


def test_an_empty_or_unreadable_file_says_so(tmp_path, monkeypatch):
    """A file of 0 bytes (a copy cut short) was 'not a DICOM file' and one without read
    permission had an 'unreadable header (PermissionError)': each now names what to fix, and
    the summary counts them under that name."""
    from dinox.data.ingest import format_summary

    hu = random_hu(np.random.default_rng(23), (3, 4, 4))
    files = write_series(tmp_path / "in", hu, "1.2.82.1")
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    locked, real_open = str(files[1]), open

    def no_permission(file, *args, **kwargs):   # as for a file of mode 000 (root reads those)
        if os.fspath(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(dicom_io, "open", no_permission, raising=False)
    report = prep([tmp_path / "in"], tmp_path / "out")
    reasons = {Path(f["path"]).name: f["reason"] for f in report["files_skipped"]}
    assert reasons == {"empty.dcm": "empty file (0 bytes): a copy or download cut short? copy it again",
                       files[1].name: "not readable (Permission denied): give the user running prep read access"}
    assert report["series_written"] == ["1.2.82.1"]
    (line,) = [line for line in format_summary(report).splitlines() if "skipped files:" in line]
    assert sorted(line.split(": ", 1)[1].split(", ")) == ["1 empty file", "1 not readable"]


def test_values_off_the_standard_read_without_a_warning_per_file(tmp_path):
    """pydicom warns about each value off the standard it reads (a UID with a letter, a
    decimal string over 16 characters): a line or two per file, tens of thousands on an
    archive from one non-conformant scanner, burying prep's own lines. prep reads such
    files as before, quietly; what it cannot use goes to prep_report.json."""
    import warnings

    hu = random_hu(np.random.default_rng(24), (3, 4, 4))
    files = write_series(tmp_path / "in", hu, "1.2.83.1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID = "1.2.3.x"                 # a letter in a UID
            ds.RescaleIntercept = "-1024.0000000000000"       # 19 characters for a DS of 16 at most
            ds.save_as(f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.83.1"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.83.1"), hu)
    assert [str(w.message) for w in caught if "pydicom" in w.filename] == []


def test_nifti_patient_from_the_folder_keeps_a_patients_scans_on_one_side(tmp_path):
    """`<patient>/T0.nii.gz`, `<patient>/T1.nii.gz`: by file name every scan is a patient of
    its own (the default, for one scan per patient); `--nifti-patient folder` makes the folder
    the patient, so the split cannot put one patient's two scans on both sides."""
    from test_ingest import _nifti

    rng = np.random.default_rng(22)
    for i in range(6):
        folder = tmp_path / "in" / f"pid{i:03d}"
        folder.mkdir(parents=True)
        for visit in ("T0", "T1"):
            _nifti(folder / f"{visit}.nii.gz", random_hu(rng, (4, 5, 5)).T.astype(np.int16), np.eye(4))
    prep([tmp_path / "in"], tmp_path / "out_name")
    by_name = index_rows(tmp_path / "out_name")
    assert {r["patient_id"] for r in by_name.values()} == {f"pid{i:03d}_{v}" for i in range(6) for v in ("T0", "T1")}
    report = prep([tmp_path / "in"], tmp_path / "out", nifti_patient="folder", val_fraction=0.5)
    assert report["nifti_patient"] == "folder"
    rows = index_rows(tmp_path / "out")
    assert sorted(rows) == sorted(f"pid{i:03d}_{v}" for i in range(6) for v in ("T0", "T1"))
    assert {r["series_id"]: r["patient_id"] for r in rows.values()}["pid004_T1"] == "pid004"
    split = json.loads(next((tmp_path / "out" / "_splits").glob("*.json")).read_text())
    patient = {sid: row["patient_id"] for sid, row in rows.items()}
    train, val = {patient[s] for s in split["train"]}, {patient[s] for s in split["val"]}
    assert val and train and not train & val and train | val == {f"pid{i:03d}" for i in range(6)}
    with pytest.raises(UserError, match="--nifti-patient"):
        prep([tmp_path / "in"], tmp_path / "out2", nifti_patient="series")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")   # the NaN is the point
def test_a_pixel_spacing_or_rescale_that_is_no_number_skips_its_series(tmp_path):
    """A PixelSpacing of 0 (or below) would put 0 mm diameters in the label table, and a NaN
    RescaleSlope would cast every voxel to 0 HU: each series is skipped with its reason, the
    good one is written."""
    rng = np.random.default_rng(30)
    hu = random_hu(rng, (3, 4, 4))
    write_series(tmp_path / "in" / "good", hu, "1.2.82.1")
    _rewrite(write_series(tmp_path / "in" / "flat", hu, "1.2.82.2", patient_id="B"), PixelSpacing=[0, 0])
    _rewrite(write_series(tmp_path / "in" / "nan", hu, "1.2.82.3", patient_id="C"), RescaleSlope="nan")
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.82.1"]
    reasons = {s["series_id"]: s["reason"] for s in report["series_skipped"]}
    assert reasons["1.2.82.2"].startswith("PixelSpacing 0/0 is not a positive size in mm")
    assert "1.2.82.3" in reasons
    dropped = json.dumps(report)
    assert "RescaleSlope/RescaleIntercept give values that are not finite numbers" in dropped



def _stack(folder: Path, hu: np.ndarray, uid: str, z, **elements) -> list[Path]:
    """One slice per z under `uid`, then `elements` written into every file."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_slice(folder / f"{k:03d}.dcm", (hu[k] + 1024).astype(np.uint16), series_uid=uid,
                         position=(-50.0, -60.0, float(z[k])), instance=k + 1) for k in range(len(hu))]
    _rewrite(files, **elements)
    return files


def test_two_acquisitions_under_one_series_uid_are_not_interleaved(tmp_path):
    """A contrast phase half a slice off the first (AcquisitionNumber 1 and 2), and a thin and
    a thick reconstruction (ConvolutionKernel, SliceThickness) under one SeriesInstanceUID:
    ordered by position alone they would interleave into one volume of mixed phases at half
    the spacing. The larger (or, at equal size, the first) is kept; the other is reported."""
    rng = np.random.default_rng(31)
    first, second = random_hu(rng, (6, 4, 4)), random_hu(rng, (6, 4, 4))
    phases = tmp_path / "in" / "phases"
    _stack(phases, first, "1.2.89.1", np.arange(6) * 5.0, AcquisitionNumber=1)
    _stack(phases / "b", second, "1.2.89.1", np.arange(6) * 5.0 + 2.5, AcquisitionNumber=2)
    thin, thick = random_hu(rng, (12, 4, 4)), random_hu(rng, (3, 4, 4))
    recon = tmp_path / "in" / "recon"
    _stack(recon, thin, "1.2.89.2", np.arange(12) * 1.25, ConvolutionKernel="B70f", SliceThickness="1.25")
    _stack(recon / "thick", thick, "1.2.89.2", np.arange(3) * 5.0 + 2.5, ConvolutionKernel="B30f", SliceThickness="5")
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert sorted(report["series_written"]) == ["1.2.89.1", "1.2.89.2"]
    np.testing.assert_array_equal(volume(out, "1.2.89.1"), first)
    np.testing.assert_array_equal(volume(out, "1.2.89.2"), thin)
    rows = index_rows(out)
    assert float(rows["1.2.89.1"]["spacing_z"]) == 5.0 and float(rows["1.2.89.2"]["spacing_z"]) == 1.25
    notes = report["series_notes"]
    assert notes["1.2.89.1"] == ["6 slices of acquisition 2 dropped: they cover the stretch of acquisition 1 again "
                                 "(one SeriesInstanceUID for two acquisitions or reconstructions; the larger is kept)"]
    assert notes["1.2.89.2"][0].startswith("3 slices of kernel B30f, thickness 5 mm dropped: they cover the stretch "
                                           "of kernel B70f, thickness 1.25 mm again")
    dropped = [f for f in report["files_skipped"] if f.get("series_id") == "1.2.89.1"]
    assert len(dropped) == 6 and all(Path(f["path"]).parent.name == "b" for f in dropped)


def test_a_sequential_scan_numbering_its_table_positions_is_one_volume(tmp_path):
    """Step-and-shoot CT numbers each table position as an acquisition; the positions do not
    overlap, so every slice belongs to the one volume."""
    hu = random_hu(np.random.default_rng(32), (8, 4, 4))
    folder = tmp_path / "in" / "axial"
    for block in range(4):
        ks = range(2 * block, 2 * block + 2)
        _stack(folder / str(block), hu[list(ks)], "1.2.89.3", [2.5 * k for k in ks], AcquisitionNumber=block + 1)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.89.3"] and not report["files_skipped"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.89.3"), hu)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")   # the NaN is the point
def test_a_slice_position_that_is_no_number_drops_that_slice_alone(tmp_path):
    """A NaN in the sort key would scramble the order and drop good slices as duplicates; an
    infinite one would fail the whole series."""
    hu = random_hu(np.random.default_rng(33), (6, 4, 4))
    for uid, bad in (("1.2.90.1", "NaN"), ("1.2.90.2", "inf")):
        files = write_series(tmp_path / "in" / uid, hu, uid, patient_id=uid)
        _rewrite(files[3:4], ImagePositionPatient=["-50", "-60", bad])
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert sorted(report["series_written"]) == ["1.2.90.1", "1.2.90.2"]
    for uid in ("1.2.90.1", "1.2.90.2"):
        np.testing.assert_array_equal(volume(tmp_path / "out", uid), np.delete(hu, 3, axis=0))
    reasons = {f["reason"] for f in report["files_skipped"]}
    assert reasons == {"ImagePositionPatient/ImageOrientationPatient holds a value that is not a finite number"}


def test_a_slice_without_patient_id_stays_with_its_series(tmp_path):
    """One file of a scan without PatientID is an incomplete header, not a second patient."""
    hu = random_hu(np.random.default_rng(34), (4, 4, 4))
    files = write_series(tmp_path / "in" / "s", hu, "1.2.91.1", patient_id="Q7")
    _rewrite(files[:1], PatientID=None)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.91.1"]
    assert index_rows(tmp_path / "out")["1.2.91.1"]["patient_id"] == "Q7"
    assert report["series_notes"]["1.2.91.1"] == ["1 of 4 slices have no PatientID: taken as the series' patient Q7"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.91.1"), hu)


def test_padding_read_as_bone_is_noted(tmp_path):
    """-2000 padding written as unsigned 63536 without PixelPaddingValue comes out as 3071 HU
    around the body: the series is written (it may be metal) with a note saying what to check."""
    hu = random_hu(np.random.default_rng(35), (3, 6, 6))
    padded = hu.copy()
    padded[:, :2, :] = 3071
    write_series(tmp_path / "in" / "s", padded, "1.2.92.1")
    write_series(tmp_path / "in" / "ok", hu, "1.2.92.2", patient_id="B")
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert sorted(report["series_written"]) == ["1.2.92.1", "1.2.92.2"]
    (note,) = report["series_notes"]["1.2.92.1"]
    assert note.startswith("33 % of the voxels are at the top of the HU range (3071 HU): padding")
    assert "1.2.92.2" not in report["series_notes"]


def test_acquisition_fields_some_slices_lack_or_write_otherwise_split_nothing(tmp_path):
    """An anonymiser that removed AcquisitionNumber from some files, or a writer that gives
    SliceThickness as 1.250 on some and 1.25 on others, still leaves one acquisition."""
    hu = random_hu(np.random.default_rng(36), (6, 4, 4))
    files = _stack(tmp_path / "in" / "s", hu, "1.2.93.1", np.arange(6) * 1.25, AcquisitionNumber=3,
                   SliceThickness="1.25")
    _rewrite(files[::2], AcquisitionNumber=None, SliceThickness="1.250")
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.93.1"] and not report["files_skipped"]
    assert "1.2.93.1" not in report["series_notes"]
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.93.1"), hu)


def test_a_dicomdir_is_named_as_such(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    write_series(tmp_path / "in" / "s", random_hu(np.random.default_rng(37), (3, 4, 4)), "1.2.94.1")
    dd = Dataset()
    dd.file_meta = FileMetaDataset()
    dd.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dd.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"      # Media Storage Directory
    dd.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dd.FileSetID = "EXPORT"
    dd.DirectoryRecordSequence = Sequence([])
    dd.save_as(tmp_path / "in" / "DICOMDIR", enforce_file_format=True)
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.94.1"]
    assert report["files_skipped"] == [{"path": str(tmp_path / "in" / "DICOMDIR"),
                                        "reason": "a DICOMDIR (the index of a DICOM disc or export), not an image"}]


def _ras(hu: np.ndarray, spacing=(0.7, 0.7, 5.0)) -> nib.Nifti1Image:
    """A (Z, H, W) volume as a RAS NIfTI image: i -> left, j -> anterior... as prep reads it back."""
    data = np.ascontiguousarray(hu[:, ::-1, ::-1].transpose(2, 1, 0))
    return nib.Nifti1Image(data, np.diag([*spacing, 1.0]))


def test_a_nifti_gz_is_decompressed_once(tmp_path, monkeypatch):
    """The CRC-32 check of a .nii.gz decompressed the whole file, then nibabel decompressed
    it again to read the voxels: on CT that compresses 1.5:1, half of prep's time on the
    file (2.98 s against 1.45 s for 288 x 512 x 512). The volume is read from the bytes the
    check decompressed, and is the same."""
    import zlib

    from dinox.data import nifti_io

    hu = random_hu(np.random.default_rng(41), (40, 64, 64))    # random: no shorter gzipped
    nib.save(_ras(hu), str(tmp_path / "scan.nii.gz"))
    real, out_bytes = zlib.decompressobj, []

    class Counting:
        def __init__(self, *args, **kwargs):
            self._d = real(*args, **kwargs)

        def decompress(self, data, *args):
            out = self._d.decompress(data, *args)
            out_bytes.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self._d, name)

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    vol, spacing, _ = nifti_io.read_nifti(tmp_path / "scan.nii.gz")
    np.testing.assert_array_equal(vol, hu)
    assert sum(out_bytes) < 1.5 * hu.nbytes


def test_nifti_headers_that_would_give_wrong_numbers_are_caught(tmp_path, monkeypatch):
    """A changed byte inside a .nii.gz (nibabel reads what the header declares and never
    reaches the CRC-32), a voxel size of 0 (nibabel takes 1 mm) and more voxels than memory
    holds are skipped with their reason; a size in meters is converted, not taken as mm; a
    slice one voxel wide is no CT volume."""
    from dinox.data import nifti_io

    rng = np.random.default_rng(40)
    hu = random_hu(rng, (6, 24, 20))
    src = tmp_path / "in"
    src.mkdir()
    nib.save(_ras(hu), str(src / "good.nii.gz"))
    raw = bytearray((src / "good.nii.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (src / "flipped.nii.gz").write_bytes(bytes(raw))
    nib.save(_ras(hu), str(src / "zero.nii"))
    with open(src / "zero.nii", "r+b") as f:   # nibabel writes pixdim from the affine: patch the bytes
        f.seek(80)
        f.write(struct.pack("<3f", 0.0, 0.0, 0.0))            # pixdim[1:4]
        f.seek(252)
        f.write(struct.pack("<2h", 0, 0))                     # qform_code, sform_code
    meters = _ras(hu, (0.0007, 0.0007, 0.005))
    meters.header.set_xyzt_units("meter")
    nib.save(meters, str(src / "meters.nii.gz"))
    nib.save(_ras(hu[:, :1, :]), str(src / "line.nii.gz"))
    out = tmp_path / "out"
    report = prep([src], out)
    assert sorted(report["series_written"]) == ["good", "meters"]
    reasons = {s["series_id"]: s["reason"] for s in report["series_skipped"]}
    assert reasons["flipped"].startswith("damaged gzip (") and reasons["flipped"].endswith(
        "download or export the file again")
    assert reasons["zero"] == "voxel size 0/0/0 is not a positive size: restore the header's pixdim from the scan"
    assert reasons["line"] == "slices of 1x20 voxels: a line, not a CT volume"
    rows = index_rows(out)
    assert [float(rows["meters"][k]) for k in ("spacing_z", "spacing_y", "spacing_x")] == pytest.approx([5, 0.7, 0.7])
    assert report["series_notes"]["meters"] == ["voxel size given in meters: converted to mm"]
    np.testing.assert_array_equal(volume(out, "meters"), hu)
    monkeypatch.setattr(nifti_io, "available_memory_bytes", lambda: 1000)
    with pytest.raises(UserError, match="mostly with 'the header declares 20x24x6 voxels'"):
        prep([src / "good.nii.gz"], tmp_path / "out2")
    (skip,) = json.loads((tmp_path / "out2" / "prep_report.json").read_text())["series_skipped"]
    assert skip["reason"].startswith("the header declares 20x24x6 voxels (0.0 GiB), more than the 0.0 GiB")


def test_a_nifti_orientation_in_doubt_is_noted(tmp_path):
    """No qform or sform (nibabel falls back to Analyze's orientation), or the two disagree
    (the sform wins): the layout may be flipped, and the report says which was used."""
    hu = random_hu(np.random.default_rng(41), (4, 10, 12))
    src = tmp_path / "in"
    src.mkdir()
    data = _ras(hu).dataobj
    header = nib.Nifti1Header()               # an image without an affine keeps the header's forms
    header.set_data_dtype(np.int16)
    header.set_data_shape(data.shape)
    header.set_zooms((0.7, 0.7, 5.0))
    nib.save(nib.Nifti1Image(data, None, header=header.copy()), str(src / "none.nii.gz"))
    header.set_sform(np.diag([0.7, 0.7, 5.0, 1.0]), code=1)
    header.set_qform(np.diag([-0.7, -0.7, 5.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(data, None, header=header), str(src / "both.nii.gz"))
    nib.save(_ras(hu), str(src / "plain.nii.gz"))
    notes = prep([src], tmp_path / "out")["series_notes"]
    (fallback,) = notes["none"]
    assert fallback.startswith("no qform or sform orientation in the header: laid out as the fallback orientation")
    assert notes["both"] == ["the header's qform (LPS) and sform (RAS) disagree: laid out by the sform, as the "
                             "NIfTI standard prefers; check it in a viewer"]
    assert "plain" not in notes
    np.testing.assert_array_equal(volume(tmp_path / "out", "both"), hu)


def test_copies_of_one_scan_split_as_one_patient_even_without_the_first_copy():
    """An index of the user's own may lack the group's first copy: the others still merge."""
    from dinox.data.splits import same_scan_patients

    patients = {"a": "P1", "b": "P2", "c": "P3", "d": "P4"}
    assert same_scan_patients(patients, [["a", "b", "c"]]) == {"a": "P1", "b": "P1", "c": "P1", "d": "P4"}
    assert same_scan_patients({k: v for k, v in patients.items() if k != "a"}, [["a", "b", "c"]]) == \
        {"b": "P2", "c": "P2", "d": "P4"}
    assert same_scan_patients(patients, [["x", "y"], "not a group"]) == patients


def test_a_rerun_reads_no_volume_again_to_find_copies_of_a_scan(tmp_path, monkeypatch):
    """Copies of a scan are found by a digest of the voxels of each volume that shares its
    shape and spacing with another. Every re-run read all of those again, in full (on LIDC-IDRI
    GBs from disk); the digests are now kept in the root by path, size and time, and only a
    volume written anew is read again."""
    from dinox.data import ingest

    rng = np.random.default_rng(32)
    scans = [random_hu(rng, (4, 6, 5)) for _ in range(3)]
    for k, scan in enumerate(scans):
        write_series(tmp_path / "in" / f"P{k}", scan, f"1.2.3.{k}", patient_id=f"P{k}")
    write_series(tmp_path / "in" / "P9", scans[0], "1.2.3.9", patient_id="P9")   # a copy under new UIDs
    out = tmp_path / "out"
    assert prep([tmp_path / "in"], out)["same_scans"] == [["1.2.3.0", "1.2.3.9"]]
    real, read = ingest._voxels_digest, []
    monkeypatch.setattr(ingest, "_voxels_digest", lambda path: read.append(path.name) or real(path))
    assert prep([tmp_path / "in"], out)["same_scans"] == [["1.2.3.0", "1.2.3.9"]]
    assert read == []
    np.save(out / "volumes" / "1.2.3.9.npy", scans[1])   # rewritten since (same shape): read again, alone
    assert prep([tmp_path / "in"], out)["same_scans"] == [["1.2.3.1", "1.2.3.9"]]
    assert read == ["1.2.3.9.npy"]
    (out / "_index" / "voxel_digests.json").write_text("{damaged")   # only a cache: read all again
    assert prep([tmp_path / "in"], out)["same_scans"] == [["1.2.3.1", "1.2.3.9"]]
    assert sorted(read[1:]) == [f"1.2.3.{k}.npy" for k in (0, 1, 2, 9)]


def test_a_second_prep_into_a_root_in_use_is_refused_in_one_line(tmp_path, capsys):
    """Two preps in one root (a job launched twice, or two halves of an archive at once): the
    second deleted the first's unfinished volume files as stale, and the index, split and
    nodule table written last lacked the other's series. It is now refused, naming the other."""
    from dinox.cli import main
    from dinox.run.folder_lock import take_lock

    write_series(tmp_path / "in", random_hu(np.random.default_rng(33), (3, 4, 4)), "1.2.33.1")
    out = tmp_path / "out"
    out.mkdir()
    with take_lock(out / "prep.lock", lambda holder: "held"):
        assert main(["prep", "--input", str(tmp_path / "in"), "--output", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"the processed root {out} is in use by pid {os.getpid()} on host " in err
        assert "another dinox prep writes there" in err and f"delete {out / 'prep.lock'}" in err
        assert sorted(p.name for p in out.iterdir()) == ["prep.lock"]   # nothing written
    assert prep([tmp_path / "in"], out)["series_written"] == ["1.2.33.1"]
    assert not (out / "prep.lock").exists()   # released at the end


def test_a_stamped_cache_serves_a_file_only_as_it_was_and_only_to_the_same_code(tmp_path):
    """prep's caches (headers, LIDC reads, digests) answer for a file only while its size and
    modification time, and the code that computed the answer, are as they were; a damaged or
    foreign cache file costs a recomputation; saving keeps what this run looked up."""
    from dinox.data.layout import StampedCache, code_version

    a, b, store = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "_index" / "cache.json"
    a.write_text("one")
    b.write_text("two")
    computed = []

    def value(path):
        computed.append(path.name)
        return path.read_text().upper()

    def run(version="v1", files=(a, b), **kw):
        computed.clear()
        cache = StampedCache(store, version, path_of=lambda key: tmp_path / key, **kw)
        got = [cache.get(p.name, lambda p=p: value(p)) for p in files if p.exists()]
        cache.save()
        return got

    assert run() == ["ONE", "TWO"] and computed == ["a.txt", "b.txt"]
    assert run() == ["ONE", "TWO"] and computed == []
    b.write_text("TWO!")                                   # another size
    assert run() == ["ONE", "TWO!"] and computed == ["b.txt"]
    stat = a.stat()
    a.write_text("uno")                                    # the same size, written later
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert run() == ["UNO", "TWO!"] and computed == ["a.txt"]
    assert run(version="v2") == ["UNO", "TWO!"] and computed == ["a.txt", "b.txt"]   # other code
    assert run(version="v2", files=(a,)) == ["UNO"] and computed == []   # b not asked for this time: kept
    assert run(version="v2") == ["UNO", "TWO!"] and computed == []
    assert run(version="v2", fresh=True) == ["UNO", "TWO!"] and computed == ["a.txt", "b.txt"]
    b.unlink()
    run(version="v2")
    head, body = store.read_bytes().split(b"\n", 1)
    assert json.loads(body)["keys"] == ["a.txt"]   # the file gone drops out
    flipped = head + b"\n" + body.replace(b'"a.txt"', b'"a.txu"')   # valid JSON, but not what was written
    for damaged in (b"{cut", head + b"\n" + body[:-5], flipped, b"[]\n{}", b""):
        store.write_bytes(damaged)
        assert run(version="v2") == ["UNO"] and computed == ["a.txt"], damaged
    assert run(version="") == ["UNO"] and computed == ["a.txt"]   # no version: no cache
    assert code_version(a) != code_version(a, extra="lib 2") and code_version(tmp_path / "gone") == ""
    packed = StampedCache(store, "v3", path_of=lambda key: tmp_path / key, pack=lambda values: {"many": values},
                          unpack=lambda data: data["many"])
    packed.get("a.txt", lambda: "x")
    packed.save()
    assert json.loads(store.read_bytes().split(b"\n", 1)[1])["values"] == {"many": ["x"]}
    assert StampedCache(store, "v3", path_of=lambda key: tmp_path / key,
                        unpack=lambda data: data["many"]).lookup("a.txt") == (True, "x")


def test_a_scan_as_dicom_and_as_its_nifti_conversion_stays_on_one_side_of_the_split(tmp_path):
    """dcm2niix writes its NIfTI into the series' folder: named for another patient, the copy
    could sit on the other side of the split from its DICOM series, and validation would
    score training data. prep names the copies and splits them as one patient's."""
    from dinox.data.ingest import format_summary

    rng = np.random.default_rng(31)
    scans = [random_hu(rng, (4, 6, 5)) for _ in range(8)]
    for k, scan in enumerate(scans):   # PixelSpacing 0.7 x 0.8 (row, column)
        write_series(tmp_path / "in" / f"P{k}" / "series", scan, f"1.2.3.{k}", patient_id=f"P{k}", dz=2.5)
        _nifti(tmp_path / "in" / f"P{k}" / "series" / f"converted{k}.nii.gz",
               np.ascontiguousarray(scan.transpose(2, 1, 0)), np.diag([-0.8, -0.7, 2.5, 1.0]))
    out = tmp_path / "out"
    for run in range(2):   # a re-run reaches the same split
        report = prep([tmp_path / "in"], out, val_fraction=0.5)
        assert report["same_scans"] == [[f"1.2.3.{k}", f"converted{k}"] for k in range(8)], run
        split = json.loads((out / "_splits" / "val50_seed0.json").read_text())
        for k in range(8):
            side = "train" if f"1.2.3.{k}" in split["train"] else "val"
            assert f"converted{k}" in split[side], (k, split)
        assert {len(split["train"]), len(split["val"])} == {8}
        assert "8 series hold the voxels of another (one scan in two copies, e.g. 1.2.3.0 = converted0" in \
            format_summary(report)
    assert len(index_rows(out)) == 16   # both copies stay: the user's data
    from dinox.data.dataset import CTSliceDataset
    from dinox.errors import UserError

    own = tmp_path / "own_split.json"   # a split of the user's own that parts one scan's copies
    own.write_text(json.dumps({"train": ["1.2.3.0", *(f"converted{k}" for k in range(1, 8))],
                               "val": ["converted0", *(f"1.2.3.{k}" for k in range(1, 8))]}))
    with pytest.raises(UserError, match=r"puts 8 patient\(s\) on both train and val \(e\.g\. series "
                                           r"1\.2\.3\.0 in train and converted0 in val .*copies of one scan"):
        CTSliceDataset(out, "train", own)
