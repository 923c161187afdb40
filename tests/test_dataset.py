from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch.utils.data import DataLoader

from dinox.data.dataset import CTSliceDataset, pad_collate, slice_gap, stack_neighbours
from dinox.data.ingest import prepare
from dinox.data.synth import generate_dataset
from dinox.errors import UserError

COLUMNS = ["series_id", "patient_id", "path", "num_slices", "rows", "cols", "spacing_z", "spacing_y", "spacing_x"]


def make_root(root: Path, shapes: dict[str, tuple[int, int, int]], val: list[str]) -> dict[str, np.ndarray]:
    """A processed root written by hand (independent of `dinox prep`)."""
    (root / "volumes").mkdir(parents=True)
    (root / "_index").mkdir()
    (root / "_splits").mkdir()
    rng = np.random.default_rng(0)
    vols = {}
    with open(root / "_index" / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for sid, shape in shapes.items():
            vols[sid] = rng.integers(-1024, 3071, shape).astype(np.int16)
            np.save(root / "volumes" / f"{sid}.npy", vols[sid])
            w.writerow([sid, f"pat-{sid}", f"volumes/{sid}.npy", *shape, 2.5, 0.7, 0.7])
    split = {"train": [s for s in shapes if s not in val], "val": val}
    (root / "_splits" / "val10_seed0.json").write_text(json.dumps(split))
    return vols


@pytest.fixture()
def root(tmp_path):
    vols = make_root(tmp_path, {"a": (4, 6, 5), "b": (1, 6, 5), "c": (3, 8, 8)}, val=["c"])
    return tmp_path, vols


def expected_stack(vol: np.ndarray, z: int) -> np.ndarray:
    last = len(vol) - 1
    return vol[[max(z - 1, 0), z, min(z + 1, last)]]


def test_len_items_and_edges(root):
    path, vols = root
    ds = CTSliceDataset(path, split="train")
    assert ds.series_ids == ["a", "b"]
    assert len(ds) == 5
    for i in range(len(ds)):
        sid, z = ds.locate(i)
        item = ds[i]
        assert item.dtype == torch.int16 and item.shape == (3,) + vols[sid].shape[1:]
        np.testing.assert_array_equal(item.numpy(), expected_stack(vols[sid], z))
    np.testing.assert_array_equal(ds[0].numpy(), vols["a"][[0, 0, 1]])
    np.testing.assert_array_equal(ds[3].numpy(), vols["a"][[2, 3, 3]])
    np.testing.assert_array_equal(ds[4].numpy(), vols["b"][[0, 0, 0]])
    np.testing.assert_array_equal(ds[-1].numpy(), ds[4].numpy())
    with pytest.raises(IndexError):
        ds[5]


def test_split_selection_ranges_and_min_slices(root):
    path, _ = root
    assert CTSliceDataset(path, split="val").series_ids == ["c"]
    all_ds = CTSliceDataset(path, split="all")
    assert all_ds.series_ids == ["a", "b", "c"] and len(all_ds) == 8
    assert all_ds.series_ranges() == {"a": range(0, 4), "b": range(4, 5), "c": range(5, 8)}
    assert all_ds.locate(5) == ("c", 0)
    assert CTSliceDataset(path, split="all", min_slices=2).series_ids == ["a", "c"]
    explicit = CTSliceDataset(None, split="val", split_manifest=path / "_splits" / "val10_seed0.json",
                              index_csv=path / "_index" / "index.csv")
    assert explicit.series_ids == ["c"] and len(explicit) == 3


def test_user_errors(root, tmp_path_factory):
    path, _ = root
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match="dinox prep"):
        CTSliceDataset(empty)
    with pytest.raises(UserError, match="split manifest not found"):
        CTSliceDataset(path, split_manifest=path / "nope.json")
    with pytest.raises(UserError):
        CTSliceDataset(path, split="test")
    with pytest.raises(UserError, match="at least 5 slices"):
        CTSliceDataset(path, split="all", min_slices=5)
    (path / "volumes" / "c.npy").unlink()
    with pytest.raises(UserError, match="missing"):
        CTSliceDataset(path, split="val")
    (path / "_splits" / "val10_seed0.json").write_text(json.dumps({"train": ["zz"], "val": []}))
    with pytest.raises(UserError, match="not in"):
        CTSliceDataset(path, split="train")


@pytest.mark.parametrize("split, says", [
    ({"train": ["a", "b"], "val": "c"}, r"'val' must be a list of series ids, not a str"),
    ({"train": ["a", "b", "a"], "val": ["c"]}, r"lists series a more than once in 'train'"),
    ({"train": ["a", "b"], "val": ["b", "c"]}, r"lists 1 series in both train and val \(e\.g\. b\)"),
])
def test_a_manifest_is_checked_as_a_whole_whichever_side_is_read(root, split, says):
    path, _ = root
    (path / "_splits" / "val10_seed0.json").write_text(json.dumps(split))
    for side in ("train", "val"):
        with pytest.raises(UserError, match=says):
            CTSliceDataset(path, split=side)
    assert len(CTSliceDataset(path, split="all")) == 8   # no manifest read


def test_a_patient_on_both_sides_of_the_manifest_is_refused(root):
    """Series a (train) and c (val) of one patient: validation would score that patient."""
    path, _ = root
    index = path / "_index" / "index.csv"
    index.write_text(index.read_text().replace("pat-c", "pat-a"))
    for side in ("train", "val"):
        with pytest.raises(UserError, match=r"puts 1 patient\(s\) on both train and val \(e\.g\. series a in train and c in val are "
                                                 r"patient pat-a by the index's patient_id"):
            CTSliceDataset(path, split=side)
    index.write_text(index.read_text().replace(",pat-a,volumes/c", ",,volumes/c"))   # unknown patient
    assert CTSliceDataset(path, split="val").series_ids == ["c"]


def test_a_manifest_s_json_problem_is_named_and_a_bom_is_accepted(root):
    path, _ = root
    manifest = path / "_splits" / "val10_seed0.json"
    text = manifest.read_text()
    manifest.write_bytes(b"\xef\xbb\xbf" + text.encode())          # as Windows editors save UTF-8
    assert CTSliceDataset(path, split="val").series_ids == ["c"]
    manifest.write_text(text[:-3])
    with pytest.raises(UserError, match=r"is not valid JSON \(.* at line 1 column \d+\); fix it, or re-run"):
        CTSliceDataset(path, split="val")
    manifest.write_bytes(text.encode("utf-16"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        CTSliceDataset(path, split="val")
    manifest.unlink()
    (path / "prep_report.json").write_text("{}")
    (path / "_splits" / "val20_seed0.json").write_text(text)
    with pytest.raises(UserError, match=r"the folder has val20_seed0\.json: pass --split-manifest"):
        CTSliceDataset(path, split="val")


def test_a_folder_given_as_manifest_names_the_file_to_give(root):
    path, _ = root
    for folder in (path, path / "_splits"):
        with pytest.raises(UserError, match=r"is a folder; give a split JSON file, e\.g\. .*_splits/val10_seed0\.json"):
            CTSliceDataset(path, split_manifest=folder)


def test_pickles_without_mapped_volumes(root):
    path, vols = root
    ds = CTSliceDataset(path, split="all")
    ds[0], ds[6]
    blob = pickle.dumps(ds)
    assert len(blob) < 4000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[6].numpy(), ds[6].numpy())


def test_dataloader_workers(root):
    path, vols = root
    ds = CTSliceDataset(path, split="all")
    ds[0]  # maps opened in the parent must not leak into the workers
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=pad_collate, shuffle=False)
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == len(ds)
    assert batches[-1].shape[-2:] == (8, 8)
    np.testing.assert_array_equal(batches[-1][-1].numpy(), expected_stack(vols["c"], 2))


def test_pad_collate_centres_on_air():
    small = torch.ones(3, 2, 4, dtype=torch.int16)
    big = torch.full((3, 5, 6), 7, dtype=torch.int16)
    out = pad_collate([small, big])
    assert out.shape == (2, 3, 5, 6) and out.dtype == torch.int16
    assert torch.equal(out[1], big)
    expected = torch.full((3, 5, 6), -1024, dtype=torch.int16)
    expected[:, 1:3, 1:5] = 1
    assert torch.equal(out[0], expected)
    same = pad_collate([big, big])
    assert same.shape == (2, 3, 5, 6)
    with pytest.raises(ValueError):
        pad_collate([])


def test_end_to_end_synth_prep_dataset(tmp_path):
    labels = generate_dataset(tmp_path / "dicom", patients=3, slices=8, size=64, seed=5)
    report = prepare([tmp_path / "dicom"], tmp_path / "processed", workers=1, progress=False)
    assert len(report["series_written"]) == 3
    assert report["files_skipped_by_reason"] == {}      # labels.json and the XML are annotations, not skipped
    ds = CTSliceDataset(tmp_path / "processed", split="all")
    assert len(ds) == 24 and set(ds.series_ids) == {s["series_uid"] for s in labels["series"]}
    train = CTSliceDataset(tmp_path / "processed", split="train")
    val = CTSliceDataset(tmp_path / "processed", split="val")
    assert len(train) + len(val) == 24 and len(val) == 8
    # prepared volume = DICOM HU, slice order = position order, clipped to the CT range
    series = labels["series"][0]
    files = sorted((tmp_path / "dicom" / series["series_dir"]).glob("*.dcm"))
    hu = []
    for f in files:
        d = pydicom.dcmread(f)
        hu.append(d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept))
    hu = np.clip(np.stack(hu), -1024, 3071).astype(np.int16)
    k = ds.series_ids.index(series["series_uid"])
    start = ds.series_ranges()[series["series_uid"]].start
    for z in range(8):
        np.testing.assert_array_equal(ds[start + z].numpy(), expected_stack(hu, z))
    assert ds.records[k]["num_slices"] == "8"
    assert float(ds.records[k]["spacing_z"]) == pytest.approx(series["spacing_zyx_mm"][0])


def test_slice_gap_is_the_whole_number_of_slices_nearest_the_context():
    assert [slice_gap(5.0, s) for s in (5.0, 7.5, 3.0, 2.5, 2.0, 1.25, 0.625)] == [1, 1, 2, 2, 3, 4, 8]
    assert slice_gap(5.0, 10.0 / 3.0) == 2          # 1.5 rounds up
    assert slice_gap(0.0, 1.25) == 1                # 0: the adjacent slices
    assert slice_gap(5.0, None) == 1 and slice_gap(5.0, float("nan")) == 1 and slice_gap(5.0, 0.0) == 1


def test_neighbours_by_position_agree_with_the_gap_on_even_spacing():
    rng = np.random.default_rng(0)
    for _ in range(500):
        spacing = float(rng.choice([0.625, 1.0, 1.25, 2.5, 3.0, 4.0, 5.0, 7.5, 20.0, 30.0]))
        context, n = float(rng.choice([2.5, 5.0, 10.0])), int(rng.integers(1, 30))
        positions = float(rng.uniform(-300, 300)) + spacing * np.arange(n)
        by_gap, by_position = stack_neighbours(context, spacing, n), stack_neighbours(context, spacing, n, positions)
        assert np.array_equal(by_gap[0], by_position[0]) and np.array_equal(by_gap[1], by_position[1])


def test_neighbours_across_a_gap_stay_near_the_context():
    """5 mm slices with 5 missing between 20 and 50 mm: the median step (5 mm) gives g = 2,
    which from slice 3 (15 mm) reaches 50 mm; by position its upper neighbour is the slice
    nearest 25 mm, 20 mm (the last before the gap; 50 mm is 25 mm away)."""
    positions = np.array([0, 5, 10, 15, 20, 50, 55, 60, 65, 70], np.float64)
    lower, upper = stack_neighbours(10.0, 5.0, len(positions), positions)
    assert upper.tolist() == [2, 3, 4, 4, 5, 7, 8, 9, 9, 9]
    assert lower.tolist() == [0, 0, 0, 1, 2, 4, 5, 5, 6, 7]
    assert stack_neighbours(10.0, 5.0, 10)[1][3] == 5          # the whole-step rule: 35 mm away
    # a 1.25 mm part followed by a 5 mm part: 8 median steps would be 40 mm in the 5 mm part
    mixed = np.r_[np.arange(0, 20, 1.25), 20 + 5 * np.arange(6)]
    lower, upper = stack_neighbours(10.0, 1.25, len(mixed), mixed)
    assert all(abs(abs(mixed[j] - mixed[z]) - 10) <= 2.5 for z in range(8, 14) for j in (lower[z], upper[z]))
    # thicker than the context: still one slice away, as the gap rule's g >= 1
    assert stack_neighbours(10.0, 30.0, 3, np.array([0.0, 30.0, 60.0]))[1].tolist() == [1, 2, 2]


def test_the_dataset_stacks_by_position_where_the_index_records_positions(tmp_path, caplog):
    vols = make_root(tmp_path, {"a": (10, 6, 5), "b": (5, 6, 5)}, val=["b"])
    index = tmp_path / "_index" / "index.csv"
    rows = list(csv.DictReader(index.open()))
    rows[0].update(spacing_z="5", notes="1 gap in slice positions (about 5 missing slices)",
                   z_positions="0 5 10 15 20 50 55 60 65 70")
    with index.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "notes", "z_positions"])
        w.writeheader()
        w.writerows(rows)
    ds = CTSliceDataset(tmp_path, split="train", context_mm=10.0)
    assert torch.equal(ds[3], torch.from_numpy(vols["a"][[1, 3, 4]]))
    assert ds.stack_span(3) == (1, 4)
    assert "nearest by slice position in 1 series with gaps or uneven steps" in ds.stack_summary()
    assert torch.equal(CTSliceDataset(tmp_path, split="train")[3], torch.from_numpy(vols["a"][[2, 3, 4]]))
    # positions that cannot be used, or a gap noted by a prep that recorded none: warned, whole steps
    for cell, said in (("0 5 10", "cannot be used"), ("", "no recorded slice positions")):
        rows[0]["z_positions"] = cell
        with index.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*COLUMNS, "notes", "z_positions"])
            w.writeheader()
            w.writerows(rows)
        caplog.clear()
        with caplog.at_level("WARNING"):
            old = CTSliceDataset(tmp_path, split="train", context_mm=10.0)
        assert said in caplog.text and "dinox prep --force" in caplog.text
        assert torch.equal(old[3], torch.from_numpy(vols["a"][[1, 3, 5]]))


def test_a_context_in_mm_stacks_the_slices_that_far_from_z(tmp_path, caplog):
    vols = make_root(tmp_path, {"a": (12, 6, 5), "b": (5, 6, 5)}, val=["b"])   # spacing_z 2.5 mm
    ds = CTSliceDataset(tmp_path, split="train", context_mm=5.0)
    assert ds.gaps == [2]
    assert ds.stack_summary() == "2.5D stacks (the slices nearest 5 mm from z): z-2, z, z+2 in 1 series, 2.5 mm slices"
    for z in range(12):
        zs = [max(z - 2, 0), z, min(z + 2, 11)]
        assert torch.equal(ds[z], torch.from_numpy(vols["a"][zs]))
    adjacent = CTSliceDataset(tmp_path, split="train")                    # the default: z-1, z, z+1
    assert adjacent.gaps == [1] and torch.equal(adjacent[5], torch.from_numpy(expected_stack(vols["a"], 5)))
    # an index without the slice spacing: adjacent slices, and a warning that says so
    index = tmp_path / "_index" / "index.csv"
    index.write_text(index.read_text().replace(",2.5,", ",,"))
    with caplog.at_level("WARNING"):
        blind = CTSliceDataset(tmp_path, split="train", context_mm=5.0)
    assert blind.gaps == [1] and "no slice spacing" in caplog.text
