from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dinox.cli import main
from dinox.data.annotations import parse_lidc_xml
from dinox.data.phantom import _Lung, _vessel_tree, make_phantom
from dinox.data.synth import generate_dataset, vessel_labels


def _hu(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/slice_*.dcm"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate_dataset(out, patients=2, slices=6, size=48, seed=7)


@pytest.fixture(scope="module")
def chest() -> list:
    """Noise-free phantoms of several patients at a resolution where anatomy is visible."""
    return [make_phantom(np.random.default_rng(np.random.SeedSequence([3, i])), 40, 128, noise=False)
            for i in range(6)]


def test_layout_and_headers(tiny):
    out, labels = tiny
    files = _files(out)
    assert len(files) == 2 * 6
    assert (out / "labels.json").is_file()
    sop_uids = set()
    for series in labels["series"]:
        series_files = sorted((out / series["series_dir"]).glob("slice_*.dcm"))
        assert len(series_files) == 6
        assert series["series_dir"] == f"{series['patient_id']}/{series['series_uid']}"
        z_prev = None
        for f in series_files:
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage
            assert ds.Modality == "CT"
            assert ds.PatientID == series["patient_id"]
            assert ds.SeriesInstanceUID == series["series_uid"]
            assert ds.StudyInstanceUID == series["study_uid"]
            assert (ds.Rows, ds.Columns) == (48, 48)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.PixelRepresentation in (0, 1)
            assert float(ds.SliceThickness) == pytest.approx(series["spacing_zyx_mm"][0], rel=1e-3)
            z = float(ds.ImagePositionPatient[2])
            if z_prev is not None:
                assert z - z_prev == pytest.approx(series["spacing_zyx_mm"][0], abs=1e-3)
            z_prev = z
            sop_uids.add(ds.SOPInstanceUID)
            hu = _hu(ds)
            assert hu.min() >= -3024 and hu.max() <= 3071
    assert len(sop_uids) == 12


def test_labels_schema(tiny):
    out, labels = tiny
    on_disk = json.loads((out / "labels.json").read_text())
    assert on_disk == labels
    for series in labels["series"]:
        assert {"patient_id", "series_uid", "nodules"} <= set(series)
        for n in series["nodules"]:
            assert set(n) == {"center_zyx_vox", "center_mm", "radius_mm", "type"}
            assert n["type"] in ("solid", "part_solid", "ground_glass")
            assert 1.5 <= n["radius_mm"] <= 12.5
            z, y, x = n["center_zyx_vox"]
            assert -0.5 <= z <= series["num_slices"] - 0.5
            assert 0 <= y < series["rows"] and 0 <= x < series["cols"]


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    """Also across worker counts: `tiny` was written inline, this copy by two processes."""
    out, labels = tiny
    again = generate_dataset(tmp_path / "a", patients=2, slices=6, size=48, seed=7, workers=2)
    assert again["series"] == labels["series"]
    for f in _files(out):
        g = tmp_path / "a" / f.relative_to(out)
        assert pydicom.dcmread(f).PixelData == pydicom.dcmread(g).PixelData
        assert f.read_bytes() == g.read_bytes()
    for name in ["labels.json"] + [s["annotation_xml"] for s in labels["series"]]:
        assert (out / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    other = generate_dataset(tmp_path / "b", patients=2, slices=6, size=48, seed=8)
    assert {s["series_uid"] for s in other["series"]}.isdisjoint({s["series_uid"] for s in labels["series"]})
    a = pydicom.dcmread(_files(out)[3]).pixel_array
    b = pydicom.dcmread(_files(tmp_path / "b")[3]).pixel_array
    assert not np.array_equal(a, b)


def test_pixels_pinned(tiny):
    """Pins the phantom's pixel output: annotations, vessel records and the simulated readers
    must not add, drop or reorder random draws of the phantom. The hash was computed on the
    code before any of them existed; a deliberate change of the phantom updates it."""
    out, _ = tiny
    h = hashlib.sha256()
    for f in _files(out):
        h.update(pydicom.dcmread(f).pixel_array.astype("<i4").tobytes())
    assert h.hexdigest() == "d8af244fa5f850d94a577ac70dc2ca71247262c07c68910634cc4ff203dba402"


def test_labels_vessels_and_reader_xml(tiny):
    out, labels = tiny
    for series in labels["series"]:
        vessels = series["vessels"]
        assert len(vessels) > 50 and all(len(v) == 8 and v[6] >= v[7] > 0 for v in vessels)
        read = parse_lidc_xml((out / series["annotation_xml"]).read_bytes())
        assert (out / series["annotation_xml"]).parent == out / series["series_dir"]
        assert read.series_uid == series["series_uid"] and read.problems == []
        assert [s.reader for s in read.sessions] == ["reader1", "reader2", "reader3", "reader4"]
        ids = {m.mark_id for s in read.sessions for m in s.marks if m.kind != "non_nodule"}
        assert ids <= {f"Nodule {j + 1:03d}" for j in range(len(series["nodules"]))}


def test_vessel_labels_lie_on_vessels(chest):
    ph = chest[2]
    v = np.array(vessel_labels(ph))
    mid = np.rint((v[:, :3] + v[:, 3:6]) / 2.0).astype(int)
    inside = np.all((mid >= 0) & (mid < np.array(ph.hu.shape)), axis=1) & (v[:, 6] >= 2.0)
    assert inside.sum() > 30
    on_vessel = ph.hu[tuple(mid[inside].T)] > -600
    lung = ph.lung > 0.99
    assert on_vessel.mean() > 0.9 and (ph.hu[lung] > -600).mean() < 0.2


def test_tissue_values(chest):
    ph = chest[0]
    hu = ph.hu
    lung = ph.lung > 0.99
    assert lung.mean() > 0.03
    assert -900 < np.median(hu[lung]) < -780
    assert (hu > 600).sum() > 100                      # cortical bone of spine and ribs
    assert hu.min() >= -1001 and hu.max() <= 1300
    # the scanner table (shell blurred at this resolution) lies below the body's fat
    column = hu[len(hu) // 2, :, hu.shape[2] // 2]
    table_row = np.flatnonzero(column > -600).max()
    fat_rows = np.flatnonzero((column > -150) & (column < -50))
    assert fat_rows.size and table_row > fat_rows.max()


def test_lungs_change_along_z(chest):
    for ph in chest:
        area = (ph.lung > 0.5).sum(axis=(1, 2))
        assert area.max() > 2.0 * max(area.min(), 1)


def test_patients_differ(chest):
    lung_fraction = [float((ph.lung > 0.5).mean()) for ph in chest]
    assert max(lung_fraction) - min(lung_fraction) > 0.01
    assert len({len(ph.nodules) for ph in chest}) >= 2
    radii = [n.radius_mm for ph in chest for n in ph.nodules]
    assert max(radii) > 2 * min(radii)


def test_nodules_are_visible(chest):
    checked = 0
    for ph in chest:
        dz, dy, _ = ph.spacing_zyx_mm
        for n in ph.nodules:
            if n.radius_mm < max(2 * dy, dz):
                continue
            z, y, x = (int(round(c)) for c in n.center_zyx_vox)
            centre = ph.hu[z, y, x]
            floor = -350 if n.kind == "solid" else -720
            assert centre > floor, (n, centre)
            checked += 1
    assert checked >= 2


def test_nodule_types_all_occur():
    kinds = set()
    for i in range(12):
        ph = make_phantom(np.random.default_rng(np.random.SeedSequence([11, i])), 8, 48, noise=False)
        kinds |= {n.kind for n in ph.nodules}
    assert kinds == {"solid", "part_solid", "ground_glass"}


def test_vessels_are_continuous_in_3d(chest):
    ph = chest[1]
    lung = ph.lung > 0.99
    vessel = (ph.hu > -600) & lung
    per_slice = vessel.sum(axis=(1, 2))
    assert (per_slice > 0).sum() > 10
    assert 0.003 < vessel.sum() / lung.sum() < 0.2

    def overlap(a, b):
        return (a & b).sum() / max((a | b).sum(), 1)

    zs = [z for z in range(len(vessel) - 6) if per_slice[z] > 20 and per_slice[z + 6] > 20]
    near = np.mean([overlap(vessel[z], vessel[z + 1]) for z in zs])
    far = np.mean([overlap(vessel[z], vessel[z + 6]) for z in zs])
    assert near > 1.5 * far


def test_vessel_tree_is_connected_and_tapers():
    lung = _Lung(side=1, cx=60.0, cy=0.0, ax=55.0, ay=80.0, height=240.0, dome=0.1, shoulder=0.45,
                 eps=np.zeros(3), phase=np.zeros(3), twist=np.zeros(3), drift=0.0)
    hilum = np.array([30.0, -5.0, 120.0])
    segs = _vessel_tree(np.random.default_rng(0), lung, hilum, 4.0, budget=400)
    assert 100 < len(segs) <= 400
    ends = [hilum] + [b for _, b, _, _ in segs]
    for a, b, r0, r1 in segs:
        assert min(np.linalg.norm(a - e) for e in ends) < 1e-9
        assert r1 < r0
        assert lung.contains(b[None])[0]
    zs = np.array([b[2] for _, b, _, _ in segs])
    assert zs.max() - zs.min() > 100


def test_cli_synth(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "s"), "--patients", "1", "--slices", "4",
               "--size", "32", "--seed", "1"])
    assert rc == 0
    assert "synth: 1 series" in capsys.readouterr().out
    assert len(_files(tmp_path / "s")) == 4


def test_cli_synth_bad_out(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    rc = main(["synth", "--out", str(target), "--patients", "1", "--slices", "4", "--size", "32"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("error:") and "Traceback" not in err


def test_cli_synth_bad_workers(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "s"), "--patients", "1", "--slices", "4", "--size", "32",
               "--workers", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "--workers" in err and "Traceback" not in err


def test_cli_synth_stopped_by_sigterm_is_one_line_and_143(tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's stop, `kill`) ended synth at once, without a word; now it
    unwinds like Ctrl-C (its workers stopped), says what to do and exits 143. A second
    signal while it unwinds is ignored; the handlers are put back afterwards."""
    import os
    import signal
    import time

    import dinox.commands.synth as synth_command

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop synth")

    monkeypatch.setattr(synth_command, "generate_dataset", stopped)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["synth", "--out", str(tmp_path / "s"), "--patients", "1", "--slices", "4", "--size", "32"])
    assert rc == 143
    assert capsys.readouterr().err == (f"synth stopped by SIGTERM before it finished writing {tmp_path / 's'}; "
                                       f"run the same command again to complete it\n")
    assert signal.getsignal(signal.SIGTERM) == before
