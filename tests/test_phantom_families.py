"""The head and limb phantom families of `dinox synth --family` (issue 12: recipe decisions
are checked on CT the recipe was not tuned on).

Tissue classes used below, in HU: air < -500, fat -200..-30, soft tissue -30..+150 (brain,
CSF, blood, muscle, skin), bone >= +300 (diploe, cortex, metal)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dinox.cli import main
from dinox.commands.demo import default_root
from dinox.data.dataset import CTSliceDataset
from dinox.data.ingest import prepare
from dinox.data.phantom_head import HAEMORRHAGE_TYPES, make_head_phantom, projection_artefacts
from dinox.data.phantom_limb import LIMB_FINDING_TYPES, LIMB_SITES, make_limb_phantom
from dinox.data.synth import FAMILIES, generate_dataset
from dinox.errors import UserError

MAKE = {"head": make_head_phantom, "limb": make_limb_phantom}
# HU a finding's centre voxel must have (noise-free phantom, before the 12-bit clip): the
# drawn value (FINDING_HU below) moved by partial volume, the in-plane blur and, in the
# limb, metal streaks
CENTRE_HU = {"intraparenchymal": (45.0, 95.0), "subdural": (45.0, 95.0), "lytic_bone": (-10.0, 90.0),
             "soft_tissue_mass": (-10.0, 75.0), "lipoma": (-150.0, -50.0)}
# what each finding is drawn with (Parizel 2001 for acute blood; fat and soft tissue from
# standard HU tables): labels.json's "hu" must lie here
FINDING_HU = {"intraparenchymal": (60.0, 80.0), "subdural": (60.0, 80.0), "lytic_bone": (20.0, 50.0),
              "soft_tissue_mass": (5.0, 45.0), "lipoma": (-120.0, -80.0)}


def _patients(family: str, n: int, slices: int, size: int, seed: int = 21, noise: bool = True) -> list:
    return [MAKE[family](np.random.default_rng(np.random.SeedSequence([seed, i])), slices, size, noise=noise)
            for i in range(n)]


@pytest.fixture(scope="module")
def heads() -> list:
    return _patients("head", 8, 16, 64)


@pytest.fixture(scope="module")
def limbs() -> list:
    return _patients("limb", 8, 16, 64)


@pytest.fixture(scope="module")
def clean() -> dict:
    """Noise-free phantoms at a resolution where findings span a few pixels."""
    return {f: _patients(f, 16, 16, 96, seed=4, noise=False) for f in MAKE}


def _classes(ph) -> dict[str, float]:
    """Voxel fractions of the tissue classes inside the reconstruction circle."""
    size = ph.hu.shape[-1]
    r = np.arange(size) - (size - 1) / 2.0
    v = ph.hu[:, (r[:, None] ** 2 + r[None, :] ** 2) <= (size / 2.0) ** 2]
    return {"air": float((v < -500).mean()), "fat": float(((v >= -200) & (v < -30)).mean()),
            "soft": float(((v >= -30) & (v < 150)).mean()), "bone": float((v >= 300).mean()),
            "soft_median": float(np.median(v[(v >= -30) & (v < 150)])),
            "soft_p75": float(np.percentile(v[(v >= -30) & (v < 150)], 75))}


def test_head_hu_statistics(heads):
    """A head fills about half of its field of view (FOV = 1.05-1.2 x the head's length plus
    a margin, so its widest section covers 40-65 % of the circle, less near the vertex and
    the skull base); a skull ring about 6 mm thick around a 500 mm perimeter is about 5 %
    of the circle, more on skull-base slices; fat is only a thin scalp layer and the
    orbits; the soft tissue is mostly brain (grey matter +36..+44, white matter +20..+30,
    some CSF), so its median is that of brain."""
    for ph in heads:
        c = _classes(ph)
        assert 0.2 < c["air"] < 0.8, c
        assert c["fat"] < 0.08, c
        assert 0.15 < c["soft"] < 0.6, c
        assert 0.02 < c["bone"] < 0.2, c
        assert 20.0 < c["soft_median"] < 45.0, c
        assert ph.hu.dtype == np.float32 and ph.hu.max() < 2600.0 and ph.hu.min() > -1100.0


def test_limb_hu_statistics(limbs):
    """One or two limbs fill 30-70 % of their field of view (FOV 1.1-1.35 x the limb's
    extent); subcutaneous fat 2-35 mm thick on a limb of 30-95 mm radius, fat planes and
    fatty marrow give 1-40 % fat; muscle (+40..+60, less with fatty infiltration) is the
    upper part of the soft-tissue class, whose lower part holds the partial-volume voxels
    of fat planes and fat-edged structures (many at coarse pixels), so the class's upper
    quartile is muscle; the cortical rings of one or two long bones are 0.5-10 % of the
    circle; metal clips at 3071 HU."""
    for ph in limbs:
        c = _classes(ph)
        assert 0.3 < c["air"] < 0.9, c
        assert 0.01 < c["fat"] < 0.4, c
        assert 0.02 < c["soft"] < 0.55, c
        assert 0.005 < c["bone"] < 0.1, c
        assert 35.0 < c["soft_p75"] < 70.0, c
        assert -1024.0 <= ph.hu.min() and ph.hu.max() <= 3071.0


@pytest.mark.parametrize("family", ["head", "limb"])
def test_same_seed_same_pixels_other_seed_differs(family):
    def make(seed):
        return MAKE[family](np.random.default_rng(np.random.SeedSequence([seed, 0])), 6, 48)

    a, b, c = make(3), make(3), make(4)
    assert np.array_equal(a.hu, b.hu) and a.nodules == b.nodules and a.anatomy == b.anatomy
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_generate_dataset_is_byte_identical(tmp_path):
    first = generate_dataset(tmp_path / "a", patients=2, slices=4, size=32, seed=9, family="head")
    again = generate_dataset(tmp_path / "b", patients=2, slices=4, size=32, seed=9, family="head")
    assert first["series"] == again["series"]
    for f in sorted((tmp_path / "a").glob("*/*/slice_*.dcm")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    assert (tmp_path / "a" / "labels.json").read_bytes() == (tmp_path / "b" / "labels.json").read_bytes()


@pytest.mark.parametrize("family", ["head", "limb"])
def test_findings_lie_inside_the_body_with_their_hu(clean, family):
    kinds, checked = set(), 0
    for ph in clean[family]:
        dz, dx, _ = ph.spacing_zyx_mm
        body = ndimage.binary_fill_holes(ph.hu > -500, structure=np.ones((1, 3, 3), bool))
        for f in ph.nodules:
            kinds.add(f.kind)
            lo, hi = FINDING_HU[f.kind]
            assert lo <= f.hu <= hi, f
            z, y, x = (int(round(c)) for c in f.center_zyx_vox)
            assert 0 <= z < ph.hu.shape[0] and 0 <= y < ph.hu.shape[1] and 0 <= x < ph.hu.shape[2], f
            assert body[z, y, x], f
            row = ph.hu[z, y]
            if family == "head":      # a haemorrhage lies within the skull: bone on either side
                assert (row[:x] > 300).any() and (row[x + 1:] > 300).any(), f
            elif f.kind == "lytic_bone":   # within its bone: cortex within a few mm
                reach = int(np.ceil((f.radius_mm + 4.0) / dx))
                near = ph.hu[z, max(y - reach, 0):y + reach + 1, max(x - reach, 0):x + reach + 1]
                assert (near > 600).any(), f
            if f.radius_mm < 2.5 * dx:
                continue              # a pixel or two across: partial volume decides
            centre = float(ph.hu[z, y, x])
            lo, hi = CENTRE_HU[f.kind]
            assert lo < centre < hi and abs(centre - f.hu) < 40.0, (f, centre)
            checked += 1
    assert checked >= 5 and len(kinds) >= 2


@pytest.mark.parametrize("family", ["head", "limb"])
def test_structures_continue_along_z(family):
    """Neighbouring slices are alike, distant ones less so (3-D anatomy, not slice noise)."""
    for ph in _patients(family, 3, 24, 64, seed=8, noise=False):
        hu = np.clip(ph.hu, -200.0, 400.0)
        near = np.mean([np.abs(hu[k + 1] - hu[k]).mean() for k in range(len(hu) - 8)])
        far = np.mean([np.abs(hu[k + 8] - hu[k]).mean() for k in range(len(hu) - 8)])
        assert near < 0.7 * far, (near, far)


def test_patients_differ_strongly(clean):
    heads = clean["head"]
    areas = [float((ph.hu > -500).mean()) for ph in heads]
    assert max(areas) - min(areas) > 0.1
    assert len({round(ph.spacing_zyx_mm[1], 3) for ph in heads}) == len(heads)      # head sizes, FOVs
    assert np.ptp([ph.anatomy["ventricle_scale"] for ph in heads]) > 0.3
    assert np.ptp([ph.anatomy["tilt_deg"][1] for ph in heads]) > 8.0
    limbs = clean["limb"]
    assert {ph.anatomy["site"] for ph in limbs} == set(LIMB_SITES)
    assert any(ph.anatomy["implant"] for ph in limbs) and not all(ph.anatomy["implant"] for ph in limbs)
    assert any(ph.anatomy["bilateral"] for ph in limbs)
    assert any(ph.hu.max() >= 3071.0 for ph in limbs if ph.anatomy["implant"])   # metal clips


def test_beam_hardening_darkens_between_dense_bones():
    """Two dense bones (1.5 relative attenuation above water, 16 mm across): the rays through
    both lose most (beam hardening grows with the square of the path), so the tissue on the
    line between them darkens (the Hounsfield bar of the posterior fossa), the tissue off
    that line hardly; the error scales with beta."""
    size, dx = 96, 2.5
    x = (np.arange(size) - (size - 1) / 2.0) * dx
    bones = ((x[None, :] - 40) ** 2 + x[:, None] ** 2 < 8 ** 2) | ((x[None, :] + 40) ** 2 + x[:, None] ** 2 < 8 ** 2)
    excess = bones.astype(np.float32)[None] * 1.5
    err = projection_artefacts(excess, dx, np.random.default_rng(0), beta=1e-3)[0]
    between, off_line = err[size // 2, size // 2], err[size // 2 + 30, size // 2]
    assert between < -2.0 and abs(off_line) < 1.0
    assert err[bones].mean() < 5.0 * between                     # the bones themselves darken most
    thrice = projection_artefacts(excess, dx, np.random.default_rng(0), beta=3e-3)[0]
    assert np.allclose(thrice, 3.0 * err, atol=1e-3)


@pytest.mark.parametrize("family", ["head", "limb"])
def test_round_trip_through_prep_and_dataset(tmp_path, family):
    labels = generate_dataset(tmp_path / "dicom", patients=2, slices=6, size=48, seed=5, family=family)
    assert labels["family"] == family and labels["conventions"]["type"] == " | ".join(FAMILIES[family].finding_types)
    assert not list((tmp_path / "dicom").rglob("*.xml"))         # reader XML is chest only
    for series in labels["series"]:
        assert series["family"] == family and f"-{family.upper()}-" in series["patient_id"]
        for n in series["nodules"]:
            assert n["type"] in FAMILIES[family].finding_types and "hu" in n
    ds0 = pydicom.dcmread(sorted((tmp_path / "dicom").glob("*/*/slice_0000.dcm"))[0])
    assert ds0.BodyPartExamined in ({"HEAD"} if family == "head" else {"THIGH", "LEG", "FOREARM"})

    report = prepare([tmp_path / "dicom"], tmp_path / "processed", progress=False)
    assert len(report["series_written"]) == 2 and not report["series_skipped"]
    assert report["annotations"]["problems"] == []
    data = CTSliceDataset(tmp_path / "processed", split="all")
    assert len(data) == 2 * 6
    sample = data[3]
    assert tuple(sample.shape) == (3, 48, 48) and str(sample.dtype) == "torch.int16"

    # the prepared volumes are the phantoms' HU (rounded, clipped) inside the circle
    r = np.arange(48) - 23.5
    circle = (r[:, None] ** 2 + r[None, :] ** 2) <= 24.0 ** 2
    by_patient = {row["patient_id"]: row for row in csv.DictReader(open(tmp_path / "processed" / "_index" / "index.csv"))}
    for i, series in enumerate(labels["series"]):
        rng = np.random.default_rng(np.random.SeedSequence([5, i, *FAMILIES[family].stream]))
        rng.random()                                                  # the signed / unsigned draw
        ph = MAKE[family](rng, 6, 48)
        vol = np.load(tmp_path / "processed" / by_patient[series["patient_id"]]["path"])
        assert np.array_equal(vol[:, circle], np.clip(np.rint(ph.hu), -1024, 3071)[:, circle].astype(np.int16))

    table = tmp_path / "processed" / "_labels" / "nodules.csv"
    n_findings = sum(len(s["nodules"]) for s in labels["series"])
    if n_findings:
        rows = list(csv.DictReader(open(table)))
        assert rows and {r["source"] for r in rows} == {"synth"}
        assert {r["patient_id"] for r in rows} <= set(by_patient)


def test_cli_synth_family(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "s"), "--family", "limb", "--patients", "1", "--slices", "4",
               "--size", "32", "--seed", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "synth: 1 series" in out and "(limb)" in out
    labels = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert labels["family"] == "limb" and len(list((tmp_path / "s").glob("*/*/slice_*.dcm"))) == 4
    # argparse refuses an unknown family (exit 1, bad input)
    assert main(["synth", "--out", str(tmp_path / "t"), "--family", "pelvis", "--patients", "1"]) == 1
    with pytest.raises(UserError, match="--family"):
        generate_dataset(tmp_path / "u", patients=1, slices=4, size=32, family="pelvis")


def test_every_finding_type_occurs():
    for family, types in (("head", HAEMORRHAGE_TYPES), ("limb", LIMB_FINDING_TYPES)):
        kinds = {f.kind for ph in _patients(family, 30, 6, 48, seed=11, noise=False) for f in ph.nodules}
        assert kinds == set(types), family


def test_demo_family_roots_and_mismatch(tmp_path, capsys):
    assert default_root("chest") == "data/demo"
    assert default_root("head") == "data/demo_head" and default_root("limb") == "data/demo_limb"
    # each seed its own folder: `dinox demo --seed 1` after `dinox demo` is not refused
    assert default_root("chest", 1) == "data/demo_seed1" and default_root("head", 2) == "data/demo_head_seed2"
    assert default_root("chest", 0) == "data/demo"
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "labels.json").write_text(json.dumps({"generator": "dinox synth", "series": []}))
    rc = main(["demo", "--family", "head", "--root", str(tmp_path)])   # data of the chest demo
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error:") and "chest" in err and Path(tmp_path).name in err


@pytest.mark.parametrize("native,flag,steps,expected,expected_steps", [
    (True, None, None, "--amp", 1000), (False, None, None, "--no-amp", 600),
    (False, True, None, "--amp", 1000), (True, False, None, "--no-amp", 600), (False, None, 3, "--no-amp", 3)])
def test_demo_trains_in_bf16_exactly_where_the_cpu_has_it(tmp_path, monkeypatch, capsys, native, flag, steps,
                                                          expected, expected_steps):
    """bf16 autocast where the CPU has it natively (or as asked), and the steps that fit the
    demo's 8 minutes in that precision unless --steps is given."""
    import argparse

    import dinox.cli
    import dinox.run.device
    from dinox.commands import demo

    calls = []

    def fake_main(argv):
        calls.append(argv)
        return 1 if argv[0] == "train" else 0      # stop the demo at its training step

    monkeypatch.setattr(dinox.cli, "main", fake_main)
    monkeypatch.setattr(dinox.run.device, "cpu_native_bf16", lambda: native)
    args = argparse.Namespace(family="chest", root=str(tmp_path), patients=2, slices=4, size=32, steps=steps,
                              batch_size=2, eval_n=8, seed=0, num_workers=0, probe=False, amp=flag)
    with pytest.raises(SystemExit):
        demo.run(args)
    assert "--no-next-step" in next(a for a in calls if a[0] == "prep")   # the demo's next step is its own
    train = [a for a in calls if a[0] == "train"]
    assert len(train) == 1 and expected in train[0] and ({"--amp", "--no-amp"} - {expected}).isdisjoint(train[0])
    assert train[0][train[0].index("--max-steps") + 1] == str(expected_steps)
    announced = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo] 3/4")]
    assert len(announced) == 1 and f"for {expected_steps} steps" in announced[0]
    assert ("--steps to choose" in announced[0]) == (steps is None and expected == "--no-amp")


def test_demo_does_not_reuse_data_made_with_other_settings(tmp_path, capsys):
    """An existing root synthesised with other --patients/--slices/--size/--seed is refused
    (the demo would silently train on the old data), and one patient cannot be split."""
    series = [{"num_slices": 3, "rows": 32, "cols": 32}] * 2
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "labels.json").write_text(json.dumps({"generator": "dinox synth", "seed": 0,
                                                                "family": "chest", "series": series}))
    rc = main(["demo", "--root", str(tmp_path), "--patients", "3", "--slices", "3", "--size", "48"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "--patients 2 (asked 3)" in err and "--size 32 (asked 48)" in err and "--slices" not in err
    assert main(["demo", "--patients", "1", "--root", str(tmp_path / "one")]) != 0
    assert ">= 2" in capsys.readouterr().err and not (tmp_path / "one").exists()


@pytest.mark.parametrize("family", ["chest", "head", "limb"])
def test_a_slice_thickness_sets_the_spacing(tmp_path, family):
    labels = generate_dataset(tmp_path / "thin", patients=2, slices=10, size=32, seed=4, family=family,
                              slice_thickness=1.25)
    assert labels["slice_thickness"] == 1.25
    assert all(s["spacing_zyx_mm"][0] == 1.25 and s["num_slices"] == 10 for s in labels["series"])
    files = sorted((tmp_path / "thin").glob("*/*/slice_*.dcm"))[:10]
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert np.allclose(np.abs(np.diff(sorted(z))), 1.25)
    assert float(pydicom.dcmread(files[0]).SliceThickness) == 1.25
    # the same folder again with another thickness would mix two datasets
    with pytest.raises(UserError, match="already holds"):
        generate_dataset(tmp_path / "thin", patients=2, slices=10, size=32, seed=4, family=family,
                         slice_thickness=2.5)
    with pytest.raises(UserError, match="--slice-thickness"):
        generate_dataset(tmp_path / "x", patients=1, slices=4, size=32, family=family, slice_thickness=0.0)


def test_a_thin_limb_is_a_window_of_a_limb_of_its_own_length():
    """With a slice thickness the limb keeps its site's length: 48 slices of 1 mm show a
    48 mm window of it, so neighbouring slices differ as little as in real thin-slice CT."""
    def mean_step(ph):
        return float(np.abs(np.diff(ph.hu, axis=0)).mean())
    spread = make_limb_phantom(np.random.default_rng(3), 12, 48, noise=False)           # 12 slices over the limb
    thin = make_limb_phantom(np.random.default_rng(3), 12, 48, noise=False, slice_thickness=1.0)
    assert spread.spacing_zyx_mm[0] > 1.0 and thin.spacing_zyx_mm[0] == 1.0
    assert mean_step(thin) < mean_step(spread)
