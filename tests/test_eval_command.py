"""`dinox eval retrieval`: plain mistakes give one-line errors, result names carry split and
seed (issue 16, defects 12-14)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _train_support import only_run, processed_root, train_args  # noqa: F401
from dinox.cli import main


@pytest.fixture(scope="module")
def checkpoint(processed_root, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("eval_runs")
    assert main(train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4")) == 0
    return next(only_run(out).glob("checkpoint_final_*.pth"))


def _args(checkpoint, root, out, *extra):
    manifest = next((root / "_splits").glob("*.json"))
    return ["eval", "retrieval", "--checkpoint", str(checkpoint), "--split-manifest", str(manifest),
            "--index-csv", str(root / "_index" / "index.csv"), "--device", "cpu", "--n", "16",
            "--min-ratio", "0", "--out", str(out), *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--topk", "0"], "--topk 0"),
    (["--topk", "1", "-3"], "--topk -3"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--draws", "0"], "--draws 0"),
])
def test_nonsense_numbers_are_one_line_errors(checkpoint, processed_root, tmp_path, capsys, extra, message):  # noqa: F811
    # refused by the flag's type before the checkpoint is read
    assert main(_args(checkpoint, processed_root, tmp_path, *extra)) == 1
    err = _one_line_error(capsys)
    assert "expected a number >= 1" in err and message.split()[0] in err
    assert not list(tmp_path.glob("*.json"))


def test_out_naming_an_existing_file_is_a_one_line_error(checkpoint, processed_root, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "results.json"
    target.write_text("{}")
    assert main(_args(checkpoint, processed_root, target)) == 1
    assert "existing file" in _one_line_error(capsys)
    assert target.read_text() == "{}"


def test_out_below_a_file_is_a_one_line_error(checkpoint, processed_root, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(_args(checkpoint, processed_root, target / "sub")) == 1
    assert "--out" in _one_line_error(capsys)


@pytest.mark.parametrize("command", ["retrieval", "probe"])
def test_an_out_that_takes_no_files_is_refused_before_any_work(checkpoint, command, monkeypatch, capsys):
    from dinox.eval import load

    monkeypatch.setattr(load, "load_for_inference", lambda *a, **k: pytest.fail("read the checkpoint first"))
    # even root may create no file in sysfs
    assert main(["eval", command, "--checkpoint", str(checkpoint), "--device", "cpu", "--out", "/sys/kernel"]) == 1
    err = _one_line_error(capsys)
    assert "/sys/kernel" in err and "give another --out" in err


def test_embedding_progress_shows_under_nohup_with_the_time_left(checkpoint, processed_root, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    """Where stderr is no terminal (nohup, a scheduler's log) the embedding's tqdm bar wrote
    nothing, so `eval retrieval --n 4096` on 100 series sat silent for its ~30-60 s (minutes
    on LIDC-sized data and a large model, hours on a CPU), and `eval probe` alike. It now
    writes prep's plain progress line (data.parallel.Progress) at most once a minute, with
    the time left."""
    from dinox.data import parallel

    monkeypatch.setattr(parallel, "PLAIN_PROGRESS_S", 0.0)
    assert main(_args(checkpoint, processed_root, tmp_path, "--batch-size", "4")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retrieval: embedding:")]
    assert lines and all("slices" in line and "left" in line for line in lines), lines


def test_topk_larger_than_n_is_left_out_with_a_note(checkpoint, processed_root, tmp_path, capsys):  # noqa: F811
    assert main(_args(checkpoint, processed_root, tmp_path, "--topk", "1", "5", "100000")) == 0
    out = capsys.readouterr().out
    assert "--topk 100000 exceeds" in out
    (path,) = tmp_path.glob("view_retrieval_*.json")
    result = json.loads(path.read_text())
    assert "top100000" not in result and "top5" in result


def test_result_names_carry_split_and_seed(checkpoint, processed_root, tmp_path, capsys):  # noqa: F811
    assert main(_args(checkpoint, processed_root, tmp_path)) == 0
    assert main(_args(checkpoint, processed_root, tmp_path, "--seed", "7")) == 0
    assert main(_args(checkpoint, processed_root, tmp_path, "--split", "train")) == 0
    names = sorted(p.name for p in tmp_path.glob("view_retrieval_*.json"))
    assert len(names) == 3, names                     # nothing overwritten
    default = [n for n in names if n.endswith("_N16.json")]
    assert len(default) == 1 and default[0].startswith("view_retrieval_step2_")
    assert any(n.endswith("_N16_val_seed7.json") for n in names)
    assert any(n.endswith("_N16_train_seed1234.json") for n in names)


def test_diagnostic_views_get_their_own_result_and_the_same_series_figure(checkpoint, processed_root, tmp_path,  # noqa: F811
                                                                         capsys):
    assert main(_args(checkpoint, processed_root, tmp_path)) == 0
    assert main(_args(checkpoint, processed_root, tmp_path, "--views", "uncropped")) == 0
    assert "(views uncropped)" in capsys.readouterr().out
    train = json.loads(next(tmp_path.glob("view_retrieval_*_N16.json")).read_text())
    whole = json.loads(next(tmp_path.glob("view_retrieval_*_N16_uncropped.json")).read_text())
    assert train["views"] == "train" and whole["views"] == "uncropped"
    for result in (train, whole):
        # an exact hit is also a same-series hit
        assert result["top1"] <= result["top1_same_series"] <= 1.0


def test_draws_average_the_single_draws(checkpoint, processed_root, tmp_path, capsys):  # noqa: F811
    singles = []
    for seed in (1234, 1235, 1236):
        assert main(_args(checkpoint, processed_root, tmp_path / str(seed), "--seed", str(seed))) == 0
        singles.append(json.loads(next((tmp_path / str(seed)).glob("view_retrieval_*.json")).read_text()))
    assert main(_args(checkpoint, processed_root, tmp_path, "--draws", "3")) == 0
    assert "mean of 3 draws" in capsys.readouterr().out
    (path,) = tmp_path.glob("view_retrieval_*_draws3.json")
    result = json.loads(path.read_text())
    assert result["draw_count"] == 3 and [d["seed"] for d in result["draws"]] == [1234, 1235, 1236]
    for key in ("top1", "top5", "ratio", "mean_rank", "top1_same_series"):
        assert result[key] == pytest.approx(sum(s[key] for s in singles) / 3), key
    assert [d["ratio"] for d in result["draws"]] == [s["ratio"] for s in singles]


def test_without_data_flags_the_run_s_own_root_and_split_are_scored(checkpoint, processed_root, tmp_path,  # noqa: F811
                                                                      capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)    # no data/processed here: the root comes from the checkpoint
    args = ["eval", "retrieval", "--checkpoint", str(checkpoint), "--device", "cpu", "--n", "16",
            "--min-ratio", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("view_retrieval_*.json")
    result = json.loads(path.read_text())
    own = next((processed_root / "_splits").glob("*.json"))
    assert own.name != "val10_seed0.json"      # the run's own split, not the root's default name
    assert Path(result["data_root"]) == processed_root and Path(result["split_manifest"]) == own
    assert path.name.endswith("_N16.json")


def test_run_data_paths_takes_the_run_s_index_and_split_only_on_its_own_root(tmp_path):
    from types import SimpleNamespace

    from dinox.errors import UserError
    from dinox.eval.load import run_data_paths

    own, other = tmp_path / "own", tmp_path / "other"
    (own / "_splits").mkdir(parents=True)
    (other / "_index").mkdir(parents=True)
    manifest = own / "_splits" / "val20_seed1.json"
    manifest.write_text("{}")
    cfg = SimpleNamespace(io=SimpleNamespace(data_root=str(own), index_csv=str(own / "idx.csv"),
                                             split_manifest=str(manifest)))
    assert run_data_paths(cfg) == (own, own / "idx.csv", manifest)
    assert run_data_paths(cfg, data_root=other) == (other, None, None)
    assert run_data_paths(cfg, index_csv=other / "_index" / "index.csv") == (other, other / "_index" / "index.csv", None)
    assert run_data_paths(cfg, data_root=other, split_manifest="m.json") == (other, None, Path("m.json"))
    with pytest.raises(UserError, match=r"--index-csv .*x\.csv is not in a processed root's _index/ folder"):
        run_data_paths(cfg, index_csv=tmp_path / "x.csv")
    manifest.unlink()           # the run's split is gone: the root's default may hold its training patients
    with pytest.raises(UserError, match=r"the run's split manifest .*val20_seed1\.json is gone; give --split-manifest"):
        run_data_paths(cfg)
    assert run_data_paths(cfg, split_manifest=own / "m.json")[2] == own / "m.json"
    with pytest.raises(UserError, match=r"the run's data root .*gone not found here; give --data-root"):
        run_data_paths(SimpleNamespace(io=SimpleNamespace(data_root=str(tmp_path / "gone"), index_csv=None,
                                                          split_manifest=None)))


def test_a_relative_data_root_is_the_one_the_run_recorded_not_a_namesake_here(tmp_path, monkeypatch):
    """A run trained with --data-root proc, evaluated from a folder that has its own proc:
    the provenance's absolute paths decide, not the current folder."""
    from types import SimpleNamespace

    from dinox.eval.load import run_data_paths

    trained = tmp_path / "trained" / "proc"
    (trained / "_index").mkdir(parents=True)
    (trained / "_splits").mkdir()
    (trained / "_splits" / "val10_seed0.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "proc" / "_index").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = SimpleNamespace(io=SimpleNamespace(data_root="proc", index_csv=None, split_manifest="proc/_splits/val10_seed0.json"))
    provenance = {"data_files": [str(trained / "_index" / "index.csv"), str(trained / "_splits" / "val10_seed0.json")]}
    assert run_data_paths(cfg, provenance=provenance) == (trained, None, trained / "_splits" / "val10_seed0.json")
    assert run_data_paths(cfg, data_root="proc", provenance=provenance) == (Path("proc"), None, None)


def test_result_name_rule():
    from dinox.commands.eval import PROBE_DEFAULTS, result_name

    assert result_name("probe_step5", split="auto", seed=0, defaults=PROBE_DEFAULTS) == "probe_step5.json"
    assert result_name("probe_step5", split="val", seed=1, defaults=PROBE_DEFAULTS) == "probe_step5_val_seed1.json"
    assert result_name("probe_step5", split="auto", seed=0, defaults=PROBE_DEFAULTS,
                       network="student") == "probe_step5_student.json"
    named = result_name("probe_step5", split="auto", seed=0, defaults=PROBE_DEFAULTS, root="/a/processed",
                        trained_root="/b/processed")
    assert named.startswith("probe_step5_root") and len(named) == len("probe_step5_root12345678.json")
    custom = result_name("probe_step5", split="val", seed=0, defaults=PROBE_DEFAULTS, manifest="/a/p/_splits/v25.json",
                         root="/a/p")
    assert custom == "probe_step5_val-v25_seed0.json"


def test_same_named_checkpoints_evaluated_from_their_own_folders_keep_both_results(tmp_path, monkeypatch, capsys):
    from dinox.commands.eval import _write_result

    out, name, typed = tmp_path / "shared", "view_retrieval_step30_N16.json", "checkpoint_final_00000030.pth"
    out.mkdir()
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        _write_result(out, name, {"checkpoint": typed, "ratio": 1.0})
    recorded = {json.loads(p.read_text())["checkpoint"]: p.name for p in out.glob("*.json")}
    mine, theirs = (str((tmp_path / run / typed).resolve()) for run in ("a", "b"))
    assert set(recorded) == {mine, theirs} and recorded[mine] == name and "_ckpt" in recorded[theirs]
    assert "holds the result of another checkpoint" in capsys.readouterr().out
    # a result that recorded the path as typed (older dinox) is still read: here, the same checkpoint
    (out / name).write_text(json.dumps({"checkpoint": typed}))
    assert _write_result(out, name, {"checkpoint": typed}) == out / name


def test_a_split_changed_since_training_is_warned_of(checkpoint, processed_root, tmp_path, capsys):  # noqa: F811
    """A later prep may rewrite the run's split file over new series; the evaluation says so."""
    from dinox.eval.load import changed_split_warning
    from dinox.run.checkpoint import load_checkpoint

    provenance = load_checkpoint(checkpoint)["provenance"]
    own = Path(provenance["data_files"][1])
    assert len(provenance["data_file_hashes"]) == 2
    assert changed_split_warning(provenance, processed_root, own) is None
    assert changed_split_warning(provenance, processed_root, tmp_path / "other.json") is None
    assert changed_split_warning({"data_files": provenance["data_files"]}, processed_root, own) is None  # older
    original = own.read_bytes()
    split = json.loads(original)
    split["train"], split["val"] = split["train"][1:], split["val"] + split["train"][:1]
    try:
        own.write_text(json.dumps(split))
        warning = changed_split_warning(provenance, processed_root, own)
        assert warning and "\n" not in warning and "--split-manifest" in warning
        args = ["eval", "retrieval", "--checkpoint", str(checkpoint), "--device", "cpu", "--n", "16",
                "--min-ratio", "0", "--out", str(tmp_path)]
        assert main(args) == 0
        assert f"warning: the split manifest {own} has changed" in capsys.readouterr().out
    finally:
        own.write_bytes(original)


def test_untrained_network_is_scored_on_the_same_draws_and_gates_the_verdict(checkpoint, processed_root,  # noqa: F811
                                                                             tmp_path, capsys):
    from dinox.eval.load import load_for_inference
    from dinox.eval.probe import untrained_backbone

    assert main(_args(checkpoint, processed_root, tmp_path, "--draws", "2", "--untrained")) == 0
    out = capsys.readouterr().out
    assert "untrained network: ratio" in out and "its hits" in out
    (path,) = tmp_path.glob("view_retrieval_*_draws2.json")
    result = json.loads(path.read_text())
    hits, hits0 = [d["ratio"] for d in result["draws"]], result["untrained"]["draws"]
    assert len(hits0) == 2 and result["min_x_untrained"] is None
    if sum(hits0):
        assert result["x_untrained"] == pytest.approx(sum(hits) / sum(hits0))
    # a later eval of the same draws without --untrained keeps that comparison in the file...
    assert main(_args(checkpoint, processed_root, tmp_path, "--draws", "2")) == 0
    assert "note: kept the untrained network's figures of the same view draws" in capsys.readouterr().out
    assert json.loads(path.read_text())["untrained"] == result["untrained"]
    # ...but not one of other figures (as another checkpoint's bytes under the same path would give)
    path.write_text(json.dumps({**result, "draws": [{**d, "ratio": d["ratio"] + 1} for d in result["draws"]]}))
    assert main(_args(checkpoint, processed_root, tmp_path, "--draws", "2")) == 0
    assert "untrained" not in json.loads(path.read_text())
    # the untrained network is the run's step-0 weights: a 2-step run has moved them
    trained, cfg, _ = load_for_inference(checkpoint, torch.device("cpu"))
    step0 = untrained_backbone(cfg, torch.device("cpu"))
    assert any(not (a == b).all() for a, b in zip(trained.state_dict().values(), step0.state_dict().values()))
    # a factor no network reaches fails the run with exit 2 and says why (where the untrained
    # network finds nothing, any hit of the checkpoint beats it)
    code = main(_args(checkpoint, processed_root, tmp_path, "--draws", "2", "--min-x-untrained", "1000"))
    out = capsys.readouterr().out
    if sum(hits0):
        assert code == 2 and "FAIL:" in out and "x the untrained network < 1000x" in out
        assert json.loads(path.read_text())["passed"] is False
    else:
        assert code == (0 if sum(hits) else 2) and "the untrained network finds none" in out


def test_a_warm_started_run_s_untrained_baseline_says_it_is_random_init(checkpoint, processed_root, tmp_path,  # noqa: F811
                                                                         capsys):
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["init_from"] = "/weights/dinov2_vits14.pth"
    warm = tmp_path / "warm.pth"
    torch.save(state, warm)
    assert main(_args(warm, processed_root, tmp_path, "--untrained")) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("untrained network"))
    assert "warm-started from /weights/dinov2_vits14.pth" in line and "random network" in line
    (path,) = tmp_path.glob("view_retrieval_*.json")
    assert "not that starting point" in json.loads(path.read_text())["untrained_note"]


def test_retrieval_verdict_names_each_bar_and_decides_the_untrained_edge_cases():
    from dinox.commands.eval import retrieval_verdict

    base = {"ratio": 40.0, "min_ratio": 3.0}
    assert retrieval_verdict(base) == (True, "PASS: ratio 40.00 >= 3")
    assert retrieval_verdict({**base, "min_x_untrained": 3.0, "x_untrained": 2.5}) == (
        False, "FAIL: ratio 40.00 >= 3; 2.50x the untrained network < 3x")
    # the untrained network found nothing: any hit passes the multiple, none does not
    assert retrieval_verdict({**base, "min_x_untrained": 3.0, "x_untrained": None})[0] is True
    assert retrieval_verdict({"ratio": 0.0, "min_ratio": 0.0, "min_x_untrained": 3.0, "x_untrained": None}) == (
        False, "FAIL: ratio 0.00 >= 0; the untrained network finds none")


def test_eval_reads_the_stacks_the_run_trained_on(checkpoint, processed_root, tmp_path, monkeypatch):  # noqa: F811
    """The 2.5D context is the checkpoint's (a run at --context-mm 0 is scored on adjacent slices)."""
    import dinox.data.dataset as dataset_module

    seen = []

    class Recording(dataset_module.CTSliceDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.context_mm)

    monkeypatch.setattr(dataset_module, "CTSliceDataset", Recording)
    state = torch.load(checkpoint, weights_only=False)
    assert state["config"]["context_mm"] == 10.0
    state["config"]["context_mm"] = 0.0
    adjacent = tmp_path / "adjacent.pth"
    torch.save(state, adjacent)
    for ckpt in (checkpoint, adjacent):
        assert main(_args(ckpt, processed_root, tmp_path / ckpt.stem)) == 0
        assert main(["monitor", "--checkpoint", str(ckpt), "--data-root", str(processed_root), "--device", "cpu",
                     "--out", str(tmp_path / f"m_{ckpt.stem}")]) == 0
    assert seen == [10.0, 10.0, 0.0, 0.0]
