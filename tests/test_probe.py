"""`dinox eval probe` (issue 13): labelled validation by linear probes on frozen features."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_support import TINY_MODEL, only_run
from dinox.cli import main
from dinox.data.annotations import NODULES_TABLE, write_table
from dinox.errors import UserError
from dinox.eval import probe, stats

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- AUROC and bootstrap

def test_auroc_matches_scikit_learn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.standard_normal(300) + y, 1)   # rounding makes ties
    assert stats.auroc(scores, y) == pytest.approx(roc_auc_score(y, scores))
    w = rng.integers(0, 3, (4, 300)).astype(float)
    for row, got in zip(w, stats.auroc(scores, y, w)):
        assert got == pytest.approx(roc_auc_score(y, scores, sample_weight=row))
    assert np.isnan(stats.auroc(scores, np.zeros(300)))


def test_bootstrap_interval_of_a_separable_problem_is_one():
    y = np.array([0, 1] * 20)
    groups = np.repeat(np.arange(10), 4)          # 10 test patients
    weights, unit = stats.bootstrap_weights(groups, 500, seed=0)
    assert unit == "test patients"
    point, ci, _ = stats.score_with_ci(lambda w: stats.auroc(y.astype(float), y, w), weights)
    assert point == 1.0 and ci == [1.0, 1.0]


def test_bootstrap_interval_of_random_scores_covers_one_half():
    """Scores independent of the labels: AUROC about 0.5, and the 95 % interval covers 0.5
    in most draws (percentile intervals of an AUROC cover a little less than nominal:
    91 % measured over 300 such draws)."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), 10)
    points, covered = [], 0
    for draw in range(40):
        y = rng.integers(0, 2, 400)
        scores = rng.standard_normal(400)
        weights, _ = stats.bootstrap_weights(groups, 200, seed=draw)
        point, ci, _ = stats.score_with_ci(lambda w, s=scores, t=y: stats.auroc(s, t, w), weights)
        points.append(point)
        covered += ci[0] <= 0.5 <= ci[1]
        assert ci[1] - ci[0] < 0.25
    assert abs(np.mean(points) - 0.5) < 0.02
    assert covered >= 32          # >= 80 % of 40


def test_bootstrap_resamples_samples_when_patients_are_few():
    weights, unit = stats.bootstrap_weights(np.array(["a"] * 5 + ["b"] * 5), 50, seed=0)
    assert unit == "test samples" and weights.shape == (50, 10)
    assert (weights.sum(1) == 10).all()


def test_patient_bootstrap_moves_a_patients_samples_together():
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"])
    weights, unit = stats.bootstrap_weights(groups, 100, seed=0)
    assert unit == "test patients"
    assert (weights[:, 0::2] == weights[:, 1::2]).all()


def test_macro_auroc_perfect_and_one_vs_rest():
    y = np.array([0, 1, 2] * 5)
    proba = np.eye(3)[y]
    assert stats.macro_auroc(proba, y, [0, 1, 2]) == 1.0
    assert stats.macro_auroc(proba[:, ::-1], y, [0, 1, 2]) < 1.0


def test_probe_refuses_a_patient_on_both_sides():
    x = np.random.default_rng(0).standard_normal((8, 3))
    y = np.array([0, 1] * 4)
    with pytest.raises(UserError, match="both the training and the test side"):
        probe.fit_probe(x, y, np.array(list("aabbccdd")), x, np.array(list("dddeeeff")[:8]))


def test_probe_fits_a_separable_problem():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    x = rng.standard_normal((60, 4)) + 3.0 * y[:, None]
    groups = np.repeat(np.arange(6), 10)
    proba, c, classes, note = probe.fit_probe(x[:40], y[:40], groups[:40], x[40:], groups[40:])
    assert classes == [0, 1] and c in probe.CS and note is None
    assert stats.auroc(proba[:, 1], y[40:]) > 0.95


def test_a_fold_without_a_class_does_not_decide_the_sweep():
    """GridSearchCV's mean over folds is NaN for every C once one fold is; it then took the
    grid's first C (1e-4) as if chosen. The other folds decide now, and with no fold
    scored, C is 1 and said to be unchosen."""
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 30)
    x = rng.standard_normal((60, 4)) + 3.0 * y[:, None]
    groups = np.repeat(np.arange(6), 10)
    y_one = y.copy()
    y_one[groups == 5] = 0                           # patient 5 without positives
    results = {"split0_test_score": np.array([np.nan] * 6), "split1_test_score": np.array([0.5, 0.9, 0.9, 0.7, 0.6, 0.6]),
               "split2_test_score": np.array([0.5, 0.8, 0.95, 0.7, 0.6, 0.6])}
    assert probe.CS[probe._best_c(results)] == 1e-2   # the NaN fold left out, the tie to the lower C
    assert probe.CS[probe._best_c({"split0_test_score": np.full(6, np.nan)})] == 1.0
    _, c, _, note = probe.fit_probe(x, y_one, groups, x[:5], np.full(5, 99))
    assert note is None and c != 1e-4                # separable data: not the strongest regularisation
    _, c, _, note = probe.fit_probe(x[:20], np.r_[np.zeros(10), np.ones(10)], groups[:20], x[:5], np.full(5, 99))
    assert c == 1.0 and note.startswith("no cross-validation fold could be scored")   # each patient one class
    _, c, _, note = probe.fit_probe(x[:10], y[:10], groups[:10], x[:5], np.full(5, 99))
    assert c == 1.0 and note.startswith("one training patient, no cross-validation")
    # several classes, the rarest in one patient: the folds without it in training are left out
    y3 = np.tile([0, 1, 2], 20)
    x3 = rng.standard_normal((60, 4)) + 3.0 * np.eye(4)[y3]
    y3[(groups != 0) & (y3 == 2)] = 0
    _, c, classes, note = probe.fit_probe(x3, y3, groups, x3[:5], np.full(5, 99))
    assert classes == [0, 1, 2] and note is None and c != 1e-4


def test_a_macro_resample_without_a_class_is_not_a_mean_over_fewer():
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = np.eye(3)[y] * 0.8 + 0.1
    classes = [0, 1, 2]
    full, without_2 = np.ones(6), np.array([1.0, 1, 0, 1, 1, 0])
    boots = stats.macro_auroc(proba, y, classes, np.stack([full, without_2]))
    assert boots[0] == 1.0 and np.isnan(boots[1])
    # a class the whole test side lacks stays out of the point figure and of every resample
    y2 = np.array([0, 1, 0, 1, 0, 1])
    assert stats.macro_auroc(proba, y2, classes) == stats.macro_auroc(proba, y2, classes, full[None])[0]


def test_a_refit_resample_equals_the_probe_fitted_on_its_copies():
    """The refit interval's weights: a count k stands for k copies of a sample, in the
    scaler, the class balance and the fit; checked against refitting on the copies."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6))
    y = (x[:, 0] + rng.standard_normal(300) > 1.0).astype(int)
    groups = np.repeat(np.arange(60), 5)
    tr, te = groups < 40, groups >= 40
    train_counts, _ = stats.bootstrap_weights(groups[tr], 3, 1)
    test_counts, _ = stats.bootstrap_weights(groups[te], 3, 2)
    refit = probe.refit_scores(x[tr], y[tr], x[te], y[te], 0.1, train_counts, test_counts)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    for r in range(3):
        copies = np.repeat(np.arange(tr.sum()), train_counts[r].astype(int))
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
        model.fit(x[tr][copies], y[tr][copies])
        tests = np.repeat(np.arange(te.sum()), test_counts[r].astype(int))
        assert refit[r] == pytest.approx(stats.auroc(model.predict_proba(x[te][tests])[:, 1], y[te][tests]),
                                         abs=1e-6)
    # every weight 1: the probe as fitted once; a training resample of one class scores NaN
    ones = probe.refit_scores(x[tr], y[tr], x[te], y[te], 0.1, np.ones((1, tr.sum())), np.ones((1, te.sum())))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
    assert ones[0] == pytest.approx(stats.auroc(model.fit(x[tr], y[tr]).predict_proba(x[te])[:, 1], y[te]))
    one_class = np.where(y[tr] == 0, 1.0, 0.0)[None]
    assert np.isnan(probe.refit_scores(x[tr], y[tr], x[te], y[te], 0.1, one_class, np.ones((1, te.sum()))))[0]


def test_the_refit_interval_moves_the_training_patients_and_is_paired_over_sources(monkeypatch):
    """run_task with n_refit: each binary task carries the refit interval and a paired
    refit interval per lead; a source identical to the checkpoint leads by exactly 0."""
    rng = np.random.default_rng(1)
    n = 240
    groups = np.repeat(np.array([f"p{i}" for i in range(48)]), 5)
    y = (rng.random(n) < 0.4).astype(int)
    side = np.where(np.arange(n) < 160, "train", "test")
    feats = {"checkpoint": rng.standard_normal((n, 4)) + 1.5 * y[:, None]}
    feats["untrained"] = feats["checkpoint"].copy()
    feats["pixels"] = rng.standard_normal((n, 4))
    task = probe.Task("slice_nodule", "toy", "cls", "slice", np.arange(n), y, side, groups)
    monkeypatch.setattr(probe, "task_matrix", lambda data, task, source: feats[source])
    entry = probe.run_task(None, task, ["checkpoint", "untrained", "pixels"], n_boot=50, seed=0, n_refit=40)
    plain = probe.run_task(None, task, ["checkpoint", "untrained", "pixels"], n_boot=50, seed=0)
    assert "refit" not in plain and "delta_ci95_refit" not in plain["baselines"]["pixels"]
    lo, hi = entry["refit"]["ci95"]
    assert entry["refit"]["resamples"] == 40 and entry["refit"]["failed"] == 0
    assert entry["refit"]["training_unit"] == "training patients"
    assert 0.5 < lo <= entry["auroc"] <= hi <= 1.0
    assert entry["baselines"]["untrained"]["delta_ci95_refit"] == [0.0, 0.0]
    assert entry["baselines"]["pixels"]["delta_ci95_refit"][0] > 0.2
    # the plain figures do not change when the refit interval is asked for
    def without_refit(d):
        return {k: without_refit(v) if isinstance(v, dict) else v for k, v in d.items() if "refit" not in k}
    assert without_refit(entry) == plain


def test_probe_with_the_refit_interval_prints_and_writes_it(labelled, tmp_path, capsys):
    root, ckpt = labelled
    assert main(_probe_args(root, ckpt, tmp_path, "--min-auroc", "0", "--refit-bootstrap", "5")) == 0
    result = json.loads(next(tmp_path.glob("probe_step*.json")).read_text())
    out = capsys.readouterr().out
    assert result["bootstrap"]["refit_resamples"] == 5 and "refit interval" in out
    for name in probe.GATE_TASKS:
        task = result["tasks"][name]
        assert task["refit"]["resamples"] == 5
        assert all("delta_ci95_refit" in base for base in task["baselines"].values())


# ----------------------------------------------------------------------------- labels

SERIES = "1.2.3"


def _row(reader, slice_index, box, source="lidc-xml", kind="nodule", nodule_id="N1", **extra):
    r0, c0, r1, c1 = box
    return {"series_id": SERIES, "patient_id": "P1", "source": source, "reader": reader, "kind": kind,
            "nodule_id": nodule_id, "slice_index": slice_index, "row0": r0, "col0": c0, "row1": r1, "col1": c1,
            "center_row": (r0 + r1) / 2, "center_col": (c0 + c1) / 2, **extra}


def _labelled_root(tmp_path, rows) -> Path:
    (tmp_path / NODULES_TABLE).parent.mkdir(parents=True, exist_ok=True)
    write_table(tmp_path / NODULES_TABLE, rows)
    return tmp_path


def test_a_nodule_counts_where_two_of_four_readers_marked_it(tmp_path):
    rows = [
        # slice 3: readers 1 and 2 outline the same nodule (overlapping boxes): consensus
        _row("reader1", 3, (10, 10, 14, 14), texture=5, malignancy=4),
        _row("reader2", 3, (11, 11, 15, 15), nodule_id="other id", texture=5, malignancy=3),
        # slice 7: one reader only: no consensus, ambiguous
        _row("reader3", 7, (30, 30, 33, 33)),
        # non-nodules and the other readers' marks elsewhere never make a nodule
        _row("reader4", 10, (5, 5, 5, 5), kind="non_nodule"),
    ]
    labels = probe.load_labels(_labelled_root(tmp_path, rows))
    assert "2 readers" in labels.rule
    def span(z, g):
        return max(z - g, 0), min(z + g, 11)
    assert [probe.slice_label(labels, SERIES, z, span(z, 1)) for z in range(12)] == \
        [0, 0, None, 1, None, 0, None, None, None, 0, 0, 0]
    # a stack two slices apart spans z-2 .. z+2: a mark anywhere in that span is not a negative
    assert [probe.slice_label(labels, SERIES, z, span(z, 2)) for z in range(12)] == \
        [0, None, None, 1, None, None, None, None, None, None, 0, 0]
    # across a gap the stack's span is what the positions chose: 0 .. 1 holds no mark
    assert probe.slice_label(labels, SERIES, 0, (0, 2)) == 0 and probe.slice_label(labels, SERIES, 0, (0, 3)) is None
    (region,) = labels.regions[(SERIES, 3)]
    assert (region["row0"], region["col0"], region["row1"], region["col1"]) == (11, 11, 14, 14)
    assert region["texture"] == 5 and region["malignancy"] == 4   # the readers' median, rounded half up
    strict = probe.load_labels(tmp_path, min_readers=3)
    assert probe.slice_label(strict, SERIES, 3, (2, 4)) is None


def test_synthetic_truth_is_used_only_without_reader_rows(tmp_path):
    rows = [_row("truth", 4, (20, 20, 24, 24), source="synth", texture=1)]
    labels = probe.load_labels(_labelled_root(tmp_path, rows))
    assert probe.slice_label(labels, SERIES, 4, 8) == 1
    assert labels.regions[(SERIES, 4)][0]["texture"] == 1
    assert any("ground truth" in n for n in labels.notes)


def test_missing_labels_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="dinox prep"):
        probe.load_labels(tmp_path)


# ----------------------------------------------------------------------------- geometry

def test_every_consensus_box_has_a_nodule_cell():
    shape, grid = (96, 96), 8                      # 12-px cells
    for box in [(0, 0, 0, 0), (11, 11, 12, 12), (40, 50, 44, 53), (10, 10, 60, 60)]:
        cells = probe.nodule_cells(box, shape, grid)
        ci, cj = int((box[0] + box[2] + 1) / 2 * grid / 96), int((box[1] + box[3] + 1) / 2 * grid / 96)
        assert cells[ci, cj]
    big = probe.nodule_cells((12, 12, 47, 47), shape, grid)   # 3x3 cells fully covered
    assert big[1:4, 1:4].all() and big.sum() == 9
    assert probe.cell_overlap((0, 0, 95, 95), shape, grid).sum() == 96 * 96


def test_lung_mask_excludes_the_air_around_the_body():
    hu = np.full((40, 40), -1000.0)
    hu[5:35, 5:35] = 40.0                           # body
    hu[10:30, 10:18] = -850.0                       # a lung inside it
    lung = probe.lung_mask(hu)
    assert lung[10:30, 10:18].all() and lung.sum() == 20 * 8


def test_patch_classes_need_the_same_share_of_lung():
    """A cell that is 3/8 chest wall is neither an other-lung negative nor, with a nodule
    in it, a patch_nodule positive; one of pure lung is either (MIN_LUNG_FRACTION 0.8)."""
    hu = np.full((32, 32), 40.0)                     # body filling the image...
    hu[2:30, 2:30] = -850.0                          # ...around a lung, 8-px cells on a 4x4 grid
    hu[8:16, 8:11] = 40.0                            # cell (1, 1): 3 of 8 columns wall
    assert abs(probe.lung_mask(hu)[8:16, 8:16].mean() - 5 / 8) < 1e-9
    labels = probe.ProbeLabels(regions={("s", 0): [{"row0": 10, "col0": 12, "row1": 11, "col1": 13},
                                                   {"row0": 18, "col0": 20, "row1": 19, "col1": 21}]},
                               marks={("s", 0): [(10, 12, 11, 13), (18, 20, 19, 21)]}, series={"s"},
                               patient_of={"s": "p"}, vessels={}, rule="test")
    data = probe.ProbeData(slices=[probe.SliceRecord(0, "s", "p", 0, "train", 1)])
    probe.plan_patches(data, 0, hu, labels, 4, None, random.Random(0))
    by_cell = {p.cell: p for p in data.patches}
    assert by_cell[5].nodule and not by_cell[5].in_lung          # 5/8 lung + a 2x2 nodule < 0.8
    assert by_cell[10].nodule and by_cell[10].in_lung            # pure lung around its nodule
    negatives = {p.cell for p in data.patches if p.lung}
    assert negatives and 5 not in negatives and negatives <= {6, 9}   # the clean pure-lung cells


def test_no_negative_lies_under_a_nodule_of_a_slice_the_stack_spans():
    """The network sees z-gap .. z+gap: a cell over a nodule on a neighbour slice is not
    "other lung" on slice z, though slice z itself holds no mark there."""
    hu = np.full((32, 32), 40.0)                     # body around a lung: cells 5, 6, 9, 10 pure lung
    hu[2:30, 2:30] = -850.0
    labels = probe.ProbeLabels(regions={("s", 6): [{"row0": 9, "col0": 9, "row1": 12, "col1": 12}]},
                               marks={("s", 6): [(9, 9, 12, 12)]}, series={"s"},
                               patient_of={"s": "p"}, vessels={}, rule="test")
    for seed in range(20):                           # LUNG_PATCHES_PER_SLICE of them, drawn at random
        for span, excluded in (((3, 5), set()), ((2, 6), {5})):
            data = probe.ProbeData(slices=[probe.SliceRecord(0, "s", "p", 4, "train", 0)])
            probe.plan_patches(data, 0, hu, labels, 4, None, random.Random(seed), span=span)
            negatives = {p.cell for p in data.patches if p.lung}
            assert negatives and not negatives & excluded and not any(p.nodule for p in data.patches)
    taken = set()
    for seed in range(40):                           # a stack of 3..5 leaves slice 6 out: cell 5 may be drawn
        data = probe.ProbeData(slices=[probe.SliceRecord(0, "s", "p", 4, "train", 0)])
        probe.plan_patches(data, 0, hu, labels, 4, None, random.Random(seed), span=(3, 5))
        taken |= {p.cell for p in data.patches if p.lung}
    assert 5 in taken


def test_vessel_cells_follow_the_segment_through_the_slice():
    seg = np.array([[0.0, 10.0, 10.0, 8.0, 10.0, 50.0, 1.5, 1.5]])  # z 0 -> 8, x 10 -> 50
    pts = probe.vessel_points(seg)
    cells = probe.vessel_cells(pts, 4, (64, 64), 8)
    assert cells.sum() >= 1 and cells[1].any() and not cells[4:].any()
    thin = seg.copy()
    thin[0, 6:] = 0.3
    assert len(probe.vessel_points(thin)) == 0


# ----------------------------------------------------------------------------- split

def _labels_for(series_patients: dict, positives: list[str]) -> probe.ProbeLabels:
    regions = {(s, 1): [{"row0": 0, "col0": 0, "row1": 1, "col1": 1}] for s in positives}
    return probe.ProbeLabels(regions=regions, marks={}, series=set(series_patients),
                             patient_of=dict(series_patients), vessels={}, rule="test")


def test_patient_split_keeps_patients_on_one_side():
    series = {f"s{k}": f"p{k // 2}" for k in range(20)}          # two series per patient
    labels = _labels_for(series, list(series))
    for seed in range(5):
        split = probe.choose_split(labels, series, mode="patients", seed=seed)
        assert split.mode == "patients"
        assert not set(split.patients("train")) & set(split.patients("test"))
        assert sorted(split.train + split.test) == sorted(series)


def test_a_manifest_with_a_patient_on_both_sides_is_refused(tmp_path):
    series = {"s0": "p0", "s1": "p0", "s2": "p1", "s3": "p2"}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"train": ["s0", "s2"], "val": ["s1", "s3"]}))
    with pytest.raises(UserError, match=r"puts 1 patient\(s\) on both train and val \(e\.g\. series s0 in "
                                           r"train and s1 in val are patient p0 "):
        probe.choose_split(_labels_for(series, list(series)), series, mode="auto", manifest=manifest)


@pytest.mark.parametrize("content, says", [
    ({"train": ["s0", "zz"], "val": ["s3"]}, r"1 series of .*m\.json \(train\) are not in the index"),
    ({"train": ["s0", "s0"], "val": ["s3"]}, r"lists series s0 more than once"),
    ({"train": [[1]], "val": ["s3"]}, r"'train' must be a list of series ids, not a list with entries that are not ids"),
    ({"train": ["s0"]}, r'needs both a "train" and a "val" list'),
])
def test_the_probe_reads_a_manifest_as_strictly_as_training(tmp_path, content, says):
    """A manifest of another root, or a damaged one, used to fall back to a seeded split."""
    series = {"s0": "p0", "s1": "p1", "s2": "p2", "s3": "p3"}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(content))
    with pytest.raises(UserError, match=says):
        probe.choose_split(_labels_for(series, list(series)), series, mode="auto", manifest=manifest)


def test_auto_uses_the_manifest_val_split_when_it_holds_nodules(tmp_path):
    series = {f"s{k}": f"p{k}" for k in range(6)}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"train": ["s0", "s1", "s2", "s3"], "val": ["s4", "s5"]}))
    split = probe.choose_split(_labels_for(series, ["s1", "s4"]), series, manifest=manifest)
    assert split.mode == "manifest-val" and split.test == ["s4", "s5"]
    fallback = probe.choose_split(_labels_for(series, ["s1", "s2"]), series, manifest=manifest)
    assert fallback.mode == "patients" and fallback.notes
    with pytest.raises(UserError, match="--split patients"):
        probe.choose_split(_labels_for(series, ["s1", "s2"]), series, mode="val", manifest=manifest)


# ----------------------------------------------------------------------------- untrained baseline

def test_untrained_network_is_the_trainers_step0_weights(labelled, tmp_path):
    """One step at a learning rate of 1e-30 leaves the trainer's initial weights in the
    checkpoint (the teacher's EMA of an unchanged student is unchanged): the baseline,
    rebuilt from the configuration alone, must equal them bit for bit."""
    from dinox.eval.load import load_for_inference

    root, _ = labelled
    manifest = next((root / "_splits").glob("*.json"))
    assert main(["train", *TINY_MODEL, "--data-root", str(root), "--split-manifest", str(manifest),
                 "--out", str(tmp_path), "--max-steps", "1", "--batch-size", "4", "--lr", "1e-30",
                 "--min-lr", "1e-30", "--seed", "11"]) == 0
    ckpt = next(only_run(tmp_path).glob("checkpoint_final_*.pth"))
    teacher, cfg, _ = load_for_inference(ckpt, torch.device("cpu"))
    before = torch.get_rng_state()
    ours = probe.untrained_backbone(cfg, torch.device("cpu")).state_dict()
    assert torch.equal(before, torch.get_rng_state())          # the caller's RNG is left alone
    theirs = teacher.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A synthetic root (10 patients, four simulated readers) and a 2-step tiny checkpoint,
    trained at 64 px so that the probe's default grid (8x8 on these 64 px slices) has
    cells of 80 % lung (MIN_LUNG_FRACTION); with this seed the patient split of --seed 0
    leaves every task probeable."""
    from dinox.data.ingest import prepare
    from dinox.data.synth import generate_dataset

    base = tmp_path_factory.mktemp("probe")
    generate_dataset(base / "dicom", patients=10, slices=8, size=64, seed=4)
    prepare([base / "dicom"], base / "processed", val_fraction=0.25, progress=False)
    root = base / "processed"
    manifest = next((root / "_splits").glob("*.json"))
    assert main(["train", *TINY_MODEL, "--data-root", str(root), "--split-manifest", str(manifest),
                 "--out", str(base / "runs"), "--max-steps", "2", "--batch-size", "4", "--img-size", "64"]) == 0
    ckpt = next(only_run(base / "runs").glob("checkpoint_final_*.pth"))
    return root, ckpt


def test_the_probe_keeps_the_copies_of_one_scan_on_one_side(labelled, tmp_path):
    """Copies of one scan (prep's same_scans: a NIfTI beside its DICOM series) took patient
    ids from their own sources; a probe splitting by those ids could test on one copy of a
    scan it was fitted on."""
    import shutil

    from dinox.config import RunConfig
    from dinox.data.layout import REPORT_FILE

    root = tmp_path / "processed"
    shutil.copytree(labelled[0], root)
    series = sorted(probe.load_labels(root, probe.MIN_READERS).series)
    groups = [series[k:k + 2] for k in range(0, len(series) - 1, 2)]   # pairs of two patients' series
    report = json.loads((root / REPORT_FILE).read_text())
    report["same_scans"] = groups
    (root / REPORT_FILE).write_text(json.dumps(report))
    apart = 0
    for seed in range(6):
        try:
            _, _, split, _ = probe.probe_inputs(RunConfig(), root, split="patients", seed=seed)
        except UserError:   # nodules on one side only for this seed
            continue
        for group in groups:
            assert len({"train" if s in split.train else "test" for s in group}) == 1, (seed, group)
        labels = probe.load_labels(root, probe.MIN_READERS)
        try:   # the split by the index's own patient ids
            plain = probe.choose_split(labels, labels.patient_of, mode="patients", seed=seed)
        except UserError:
            continue
        apart += any(len({s in plain.train for s in group}) == 2 for group in groups)
    assert apart, "the pairs would never have been split apart: the test shows nothing"


def _probe_args(root, ckpt, out, *extra):
    return ["eval", "probe", "--checkpoint", str(ckpt), "--data-root", str(root), "--device", "cpu",
            "--out", str(out), "--bootstrap", "100", "--split", "patients", *extra]


@pytest.fixture(scope="module")
def probe_run(labelled, tmp_path_factory):
    """The probe's command run once, its stderr kept as under nohup with the progress
    lines' minute made 0 s (`probe_stderr`)."""
    import contextlib
    import io

    from dinox.data import parallel
    root, ckpt = labelled
    out = tmp_path_factory.mktemp("probe_out")
    err, every = io.StringIO(), parallel.PLAIN_PROGRESS_S
    parallel.PLAIN_PROGRESS_S = 0.0
    try:
        with contextlib.redirect_stderr(err):
            code = main(_probe_args(root, ckpt, out, "--min-auroc", "0"))
    finally:
        parallel.PLAIN_PROGRESS_S = every
    (out / "stderr.txt").write_text(err.getvalue())
    return code, out


def test_the_probe_shows_its_embedding_and_its_fitting_under_nohup(probe_run):
    """Its fitting (a C sweep and bootstraps per task and source) said nothing, even on a
    terminal: 27 s for vit-tiny on 100 series, longer at ViT-L width."""
    lines = (probe_run[1] / "stderr.txt").read_text().splitlines()
    assert any(line.startswith("probe: embedding: ") and "left" in line for line in lines), lines
    assert any(line.startswith("probe: fitting: ") and " tasks (" in line and "left" in line for line in lines), lines


def test_probe_writes_the_json_and_passes_at_zero(probe_run, capsys):
    code, out = probe_run
    assert code == 0
    (path,) = out.glob("probe_step*.json")
    assert path.name == "probe_step2_patients_seed0_bootstrap100.json"   # --split patients is not the default
    result = json.loads(path.read_text())
    assert {"slice_nodule", "slice_nodule_cls_meanpatch", "patch_nodule"} <= result["tasks"].keys()
    for name, task in result["tasks"].items():
        assert 0.0 <= task["auroc"] <= 1.0
        lo, hi = task["ci95"]
        assert 0.0 <= lo <= hi <= 1.0
        assert task["n_train"] > 0 and task["n_test"] > 0
        assert {"untrained", "pixels"} <= task["baselines"].keys()
        for base in task["baselines"].values():
            assert 0.0 <= base["auroc"] <= 1.0 and "delta_ci95" in base
        # the hand-feature reference: patch tasks only, and outside the baselines (no verdict)
        if name.startswith("patch_"):
            ref = task["references"]["hand_features"]
            assert 0.0 <= ref["auroc"] <= 1.0 and ref["dim"] == len(probe.HAND_FEATURES)
            assert ref["delta"] == pytest.approx(task["auroc"] - ref["auroc"], abs=1e-3)
        else:
            assert "references" not in task
    assert set(result["tasks"]) | set(result["skipped"]) >= {"patch_nodule_vs_vessel", "nodule_type",
                                                              "nodule_malignancy"}
    assert result["passed"] is True and result["verdict"].startswith("PASS")
    assert result["split"]["mode"] == "patients"
    assert result["probe"]["min_lung_fraction"] == probe.MIN_LUNG_FRACTION


def test_probe_split_has_no_patient_on_both_sides(probe_run):
    _, out = probe_run
    result = json.loads(next(out.glob("probe_step*.json")).read_text())
    train, test = result["split"]["train_patient_ids"], result["split"]["test_patient_ids"]
    assert train and test and not set(train) & set(test)


def test_probe_exit_code_follows_the_pass_line(labelled, tmp_path, capsys):
    root, ckpt = labelled
    code = main(_probe_args(root, ckpt, tmp_path, "--min-auroc", "1.0", "--no-baselines"))
    result = json.loads((tmp_path / "probe_step2_patients_seed0_bootstrap100_nobaselines.json").read_text())
    perfect = all(result["tasks"][t]["auroc"] >= 1.0 for t in probe.GATE_TASKS)
    assert code == (0 if perfect else 2)
    assert result["tasks"]["slice_nodule"]["baselines"] == {}
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("PASS" if perfect else "FAIL") and "slice_nodule" in line


def test_a_rerun_with_other_probe_settings_keeps_the_earlier_result(probe_run, labelled, capsys):
    code, out = probe_run
    root, ckpt = labelled
    main(_probe_args(root, ckpt, out, "--min-auroc", "0", "--no-baselines", "--min-readers", "1",
                     "--max-slices", "64", "--test-fraction", "0.5"))
    names = sorted(p.name for p in out.glob("probe_step*.json"))
    assert names == ["probe_step2_patients_seed0_bootstrap100.json",
                     "probe_step2_patients_seed0_readers1_maxslices64_testfraction0.5_bootstrap100_nobaselines.json"]
    earlier = json.loads((out / names[0]).read_text())
    assert earlier["labels"]["min_readers"] == 2 and earlier["tasks"]["slice_nodule"]["baselines"]


def test_probe_tags_name_only_settings_that_are_not_the_defaults(tmp_path):
    from argparse import Namespace

    from dinox.commands.eval import probe_tags
    from dinox.data.layout import path_tag

    defaults = dict(min_readers=probe.MIN_READERS, max_slices=probe.DEFAULT_MAX_SLICES, labels_json=None,
                    test_fraction=probe.DEFAULT_TEST_FRACTION, no_baselines=False, bootstrap=probe.BOOTSTRAP,
                    refit_bootstrap=probe.REFIT_BOOTSTRAP)
    assert probe_tags(Namespace(**defaults), "patients") == []
    other = Namespace(**{**defaults, "test_fraction": 0.2, "labels_json": str(tmp_path / "labels.json")})
    labels = path_tag("labels", tmp_path / "labels.json")
    assert probe_tags(other, "patients") == ["testfraction0.2", labels]
    assert probe_tags(other, "manifest-val") == [labels]   # the manifest's split uses no test fraction
    # other resamples give other intervals: a result of its own, not the default's overwritten
    resampled = Namespace(**{**defaults, "bootstrap": 200, "refit_bootstrap": 50})
    assert probe_tags(resampled, "manifest-val") == ["bootstrap200", "refit50"]


def test_a_warm_started_run_s_untrained_baseline_is_noted_as_random_init(labelled, tmp_path):
    root, ckpt = labelled
    state = torch.load(ckpt, weights_only=False)
    state["config"]["init_from"] = "/weights/dinov2_vits14.pth"
    warm = tmp_path / "warm.pth"
    torch.save(state, warm)
    main(_probe_args(root, warm, tmp_path, "--min-auroc", "0", "--max-slices", "64"))
    (path,) = tmp_path.glob("probe_step*.json")
    assert any("warm-started from /weights/dinov2_vits14.pth" in n for n in json.loads(path.read_text())["notes"])


def test_a_gate_task_the_labels_cannot_probe_is_bad_input(labelled, tmp_path, capsys):
    """On a 4x4 grid of these 64 px slices no cell is 80 % lung: no patch_nodule samples."""
    root, ckpt = labelled
    assert main(_probe_args(root, ckpt, tmp_path, "--size", "32", "--no-baselines")) == 1
    err = capsys.readouterr().err.strip()
    assert "patch_nodule could not be probed (no positive patch cell at this input size" in err
    assert "a larger --size gives smaller cells" in err and "label more patients" not in err
    assert len(err.splitlines()) == 1
    result = json.loads((tmp_path / "probe_step2_patients_seed0_size32_bootstrap100_nobaselines.json").read_text())
    assert "patch_nodule" in result["skipped"] and result["passed"] is False


def test_probe_at_another_input_size_has_a_finer_grid_and_its_own_json(labelled, tmp_path):
    root, ckpt = labelled
    trained = json.loads((ckpt.parent / "config.json").read_text())
    size = 2 * int(trained["train"]["img_size"])
    patch = int(trained["train"]["vit_patch"])
    assert main(_probe_args(root, ckpt, tmp_path, "--min-auroc", "0", "--no-baselines", "--size", str(size))) == 0
    (path,) = tmp_path.glob("probe_step*.json")
    assert path.name == f"probe_step2_patients_seed0_size{size}_bootstrap100_nobaselines.json"
    result = json.loads(path.read_text())
    assert result["probe"]["size"] == size and result["probe"]["grid"] == size // patch
    assert result["tasks"]["patch_nodule"]["n_train"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--size", "60"], "multiple of the model's patch size"),
    (["--size", "100000"], "give at most 4096 px"),   # was taken, then sat resizing slices to 100000 px
    (["--batch-size", "0"], "argument --batch-size: expected a number >= 1, got 0"),
    (["--min-auroc", "1.5"], "between 0 and 1"),
    (["--test-fraction", "1"], "--test-fraction"),
    (["--refit-bootstrap", "-1"], "argument --refit-bootstrap"),
    (["--split-manifest", "/nonexistent/m.json"], "not found"),
])
def test_probe_bad_input_is_one_line(labelled, tmp_path, capsys, extra, message):
    root, ckpt = labelled
    assert main(_probe_args(root, ckpt, tmp_path, *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_probe_out_naming_a_file_is_one_line(labelled, tmp_path, capsys):
    root, ckpt = labelled
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(_probe_args(root, ckpt, target)) == 1
    err = capsys.readouterr().err.strip()
    assert "existing file" in err and len(err.splitlines()) == 1


def test_probe_script_without_labels_exits_1_from_a_shell(labelled, tmp_path):
    root, ckpt = labelled
    bare = tmp_path / "bare"
    (bare / "_index").mkdir(parents=True)
    (bare / "_index" / "index.csv").write_text((root / "_index" / "index.csv").read_text())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "phase6_probe_eval.py"), "--checkpoint", str(ckpt),
                           "--data-root", str(bare), "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "no nodule labels" in proc.stderr and "Traceback" not in proc.stderr


def test_probe_every_logs_eval_probe_rows_during_training(labelled, tmp_path):
    """--probe-every: the nodule probes run in training and land in metrics.jsonl."""
    import json

    root, _ = labelled
    manifest = next((root / "_splits").glob("*.json"))
    out = tmp_path / "runs"
    assert main(["train", *TINY_MODEL, "--data-root", str(root), "--split-manifest", str(manifest),
                 "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--probe-every", "2"]) == 0
    rows = [json.loads(line) for line in (only_run(out) / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "Eval/Probe_slice_nodule" in r]
    assert probes and probes[0]["step"] == 2
    assert 0.0 <= probes[0]["Eval/Probe_slice_nodule"] <= 1.0


def test_hand_features_against_a_hand_computed_cell():
    """A 3x3 bright blob on the centre slice only, in cell (0, 1) of a 16 px input with
    8 px patches: each feature of that cell against numpy, and the blob filter and the
    z-contrast peak in that cell."""
    x = torch.zeros(1, 3, 16, 16)
    x[:, 1, 2:5, 10:13] = 1.0
    f = probe.hand_features(x, 8)
    assert f.shape == (1, 4, len(probe.HAND_FEATURES))
    cell = x[0, 1, 0:8, 8:16].numpy()
    mean, mx, std, blob, zc = f[0, 1].tolist()
    assert mean == pytest.approx(cell.mean()) and mx == pytest.approx(1.0)
    assert std == pytest.approx(cell.std(ddof=1), rel=1e-5)
    assert zc == pytest.approx(1.0)                     # |1 - (0 + 0) / 2| at the blob
    assert blob > 0 and blob == pytest.approx(f[0, :, 3].max().item())
    assert f[0, 2, 4] == 0.0 and f[0, 2, 0] == 0.0      # an empty cell
    kernel = probe._blob_kernel(probe.BLOB_SIGMA)
    assert kernel.sum().item() == pytest.approx(0.0, abs=1e-5) and kernel[0, 0, 3, 3] > 0   # zero-sum, positive centre


def test_a_table_without_rows_says_so(tmp_path):
    """A header-only label table (prep found annotation files but no nodule marks in them)."""
    from dinox.data.annotations import NODULES_TABLE, write_table
    from dinox.errors import UserError
    from dinox.eval import probe

    path = tmp_path / NODULES_TABLE
    path.parent.mkdir(parents=True)
    write_table(path, [])
    labels = probe.load_labels(tmp_path)
    with pytest.raises(UserError, match="holds no annotated series"):
        probe.choose_split(labels, {"1.2.3": "P1"})


def test_the_demo_prints_each_lead_over_a_baseline_with_its_paired_interval(tmp_path, capsys):
    """The demo's probe lines give the checkpoint's lead over each baseline with the paired
    interval, and say how wide those intervals are on the demo's test side."""
    from dinox.commands.demo import _probe

    final = tmp_path / "checkpoint_final_00000010.pth"

    def task(auroc, leads):
        return {"auroc": auroc, "ci95": [auroc - 0.1, auroc + 0.1], "n_test_patients": 40,
                "baselines": {name: {"auroc": auroc - d, "delta": d, "delta_ci95": [d - w, d + w]}
                              for name, (d, w) in leads.items()}}

    tasks = {"slice_nodule": task(0.7, {"untrained": (0.13, 0.13), "pixels": (0.09, 0.1)}),
             "patch_nodule": task(0.5, {"untrained": (-0.08, 0.12), "pixels": (-0.09, 0.14)})}

    def fake_main(argv):
        (tmp_path / "probe_step10.json").write_text(json.dumps({"tasks": tasks}))
        return 0

    _probe(fake_main, final, tmp_path, tmp_path / "m.json", "chest")
    out = capsys.readouterr().out
    assert "[demo] probes for nodules (frozen features" in out
    assert "probe slice_nodule: AUROC 0.700 [0.600, 0.800] | untrained 0.570 (lead +0.130 [0.000, 0.260])" in out
    assert "| pixels 0.590 (lead -0.090 [-0.230, 0.050])" in out
    assert "with 40 test patients the intervals are +-0.10 to +-0.14 wide" in out
    _probe(fake_main, final, tmp_path, tmp_path / "m.json", "head")
    assert "probes for haemorrhages (frozen features, patient-level split) of checkpoint_final_00000010.pth; " \
           "the tasks named nodule below are its haemorrhages" in capsys.readouterr().out


def test_marks_on_slices_outside_their_volume_are_noted_or_refused(tmp_path):
    """A table row whose slice lies beyond its prepared volume can never be probed: noted
    when some are, refused when all are (the table belongs to other volumes)."""
    rows = [_row("reader1", 3, (10, 10, 14, 14)), _row("reader2", 999, (10, 10, 14, 14))]
    labels = probe.load_labels(_labelled_root(tmp_path, rows))
    probe._check_slices_in_volumes(labels, {SERIES: 12, "other": 5}, tmp_path)
    assert any(n.startswith(f"1 of 2 marked slices lie outside their prepared volumes (e.g. slice 999 of series "
                            f"{SERIES}, which has 12 slices)") for n in labels.notes)
    with pytest.raises(UserError, match="every nodule mark .* lies on a slice outside its prepared volume"):
        probe._check_slices_in_volumes(labels, {SERIES: 3}, tmp_path)


def test_a_probe_in_training_without_any_task_warns_instead_of_printing_nothing(monkeypatch, caplog, capsys):
    from types import SimpleNamespace

    from dinox.observe.monitor_hook import run_probe

    monkeypatch.setattr(probe, "probe_backbone", lambda *a, **k: {
        "tasks": {}, "skipped": {"slice_nodule": "one class only on the training side"}})
    logged = []
    cfg = SimpleNamespace(io=SimpleNamespace(data_root="r", split_manifest=None), runtime=SimpleNamespace(seed=0))
    metrics = SimpleNamespace(log=lambda step, scores: logged.append(scores))
    with caplog.at_level("WARNING"):
        assert run_probe(None, cfg, step=5, device="cpu", metrics=metrics) is None
    assert "nodule probe at step 5 found no task it could fit (slice_nodule: one class only" in caplog.text
    assert not logged and "probe step=" not in capsys.readouterr().out


def test_in_training_checks_leave_every_rng_as_they_found_it(monkeypatch):
    """What a check draws, and what a library it imports on first use draws (scikit-learn's
    import draws from Python's `random`), must not move the training's streams: a run
    resumed after the first probe would otherwise hold other RNG states than a straight one."""
    from types import SimpleNamespace

    from dinox.train.checks import InTrainingChecks

    def draws(self, backbone, step):
        random.random(), np.random.rand(), torch.rand(1)

    monkeypatch.setattr(InTrainingChecks, "_probe", draws)
    trainer = SimpleNamespace(cfg=SimpleNamespace(watch=SimpleNamespace(eval_every=0, probe_every=2, monitor_every=0)),
                              ssl=SimpleNamespace(inference_backbone=lambda on_this_rank: None),
                              dist=SimpleNamespace(is_main=True), device=torch.device("cpu"))
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    InTrainingChecks(trainer).run(2)
    after = random.getstate(), np.random.get_state()[1], torch.get_rng_state()
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])


def test_a_patient_split_with_nodules_on_one_side_names_the_flags_that_draw_another():
    """Enough labelled patients, but this seed's split puts every positive on one side: the
    message points at --seed and --test-fraction, not only at more data."""
    series = {f"s{k}": f"p{k}" for k in range(12)}
    labels = _labels_for(series, ["s0", "s1"])
    seeds = [seed for seed in range(40) if not _one_sided(labels, series, seed)]
    one_sided = next(seed for seed in range(40) if _one_sided(labels, series, seed))
    with pytest.raises(UserError, match=rf"the patient split \(--seed {one_sided}, --test-fraction 0.3\) of 12 "
                                        r"annotated patients puts consensus nodules on one side only; try another "
                                        r"--seed or --test-fraction"):
        probe.choose_split(labels, series, mode="patients", seed=one_sided)
    assert probe.choose_split(labels, series, mode="patients", seed=seeds[0]).test


def _one_sided(labels, series, seed) -> bool:
    try:
        probe.choose_split(labels, series, mode="patients", seed=seed)
    except UserError:
        return True
    return False
