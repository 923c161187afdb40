"""--init-from: the backbone starts from pretrained weights, stays frozen while the new heads
learn, then trains; provenance records the source; the run resumes exactly."""
from __future__ import annotations

import torch

from _train_support import TINY_MODEL, only_run, processed_root, train_args  # noqa: F401
from dinox.cli import main
from dinox.config import resolve
from dinox.model.dino_model import build_dino_model
from dinox.model.weights import write_hf_folder
from dinox.run.checkpoint import file_sha256, load_checkpoint


def pretrained_folder(tmp_path):
    """A transformers folder holding a random backbone of the tiny test model's shape."""
    given = {"config": "vit-tiny", "vit_depth": 2, "vit_dim": 64, "vit_heads": 2, "vit_mlp": 128, "img_size": 32}
    cfg = resolve(given, hardware_preset="cpu").cfg
    torch.manual_seed(123)
    backbone = build_dino_model(cfg.model, img_size=32).backbone
    write_hf_folder(tmp_path / "pretrained", backbone)
    return tmp_path / "pretrained", backbone.state_dict()


def backbone_of(state: dict, net: str = "student") -> dict:
    return {k[len("backbone."):]: v for k, v in state[net].items() if k.startswith("backbone.")}


def test_init_from_freezes_then_trains_and_resumes_exactly(processed_root, tmp_path, capsys):
    folder, source = pretrained_folder(tmp_path)
    common = ("--batch-size", "4", "--max-steps", "6", "--ckpt-every", "1", "--ckpt-keep-last", "10",
              "--init-from", str(folder), "--freeze-backbone-steps", "3")
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, *common)) == 0
    printed = capsys.readouterr().out
    assert "backbone initialised from" in printed
    run = only_run(out)
    ckpts = {s: load_checkpoint(run / f"checkpoint_{s:08d}.pth") for s in range(1, 7)}
    for step in (1, 2, 3):  # steps 0-2 ran with the backbone frozen
        for key, value in backbone_of(ckpts[step]).items():
            assert torch.equal(value, source[key]), f"step {step}: {key} moved while frozen"
        assert torch.equal(ckpts[step]["teacher"]["backbone.blocks.0.attn.qkv.weight"],
                           source["blocks.0.attn.qkv.weight"])
    moved = [k for k, v in backbone_of(ckpts[4]).items() if not torch.equal(v, source[k])]
    assert moved, "the backbone never started to train"
    head_before = ckpts[1]["student"]["head.mlp.0.weight"]
    assert not torch.equal(head_before, ckpts[3]["student"]["head.mlp.0.weight"]), "the heads must learn"
    record = ckpts[6]["provenance"]["init_from"]
    assert record["sha256"] and record["kind"]
    assert ckpts[6]["config"]["lr"] == 1e-4 and ckpts[6]["config"]["min_lr"] == 1e-4  # the warm-start recipe

    # exact resume from step 3: the init file is not read again, every tensor matches
    from test_train import assert_same_state

    split = tmp_path / "split"
    assert main(train_args(processed_root, split, *common)) == 0
    split_run = only_run(split)
    for path in split_run.glob("checkpoint_*"):
        step = int(path.name.split("_")[-1].split(".")[0])
        if step > 3:
            path.unlink()
    (folder / "model.safetensors").unlink()  # proves resume does not need the source any more
    assert main(train_args(processed_root, split, *common, "--resume", "auto")) == 0
    straight_final = sorted(run.glob("checkpoint_final_*.pth"))[-1]
    split_final = sorted(split_run.glob("checkpoint_final_*.pth"))[-1]
    assert_same_state(load_checkpoint(straight_final), load_checkpoint(split_final))


def test_init_from_with_another_shape_is_a_one_line_error(processed_root, tmp_path, capsys):
    folder, _ = pretrained_folder(tmp_path)
    code = main(train_args(processed_root, tmp_path / "runs", "--max-steps", "1", "--init-from", str(folder),
                           "--vit-dim", "96", "--vit-heads", "3", "--vit-mlp", "192"))
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1
    assert file_sha256(folder / "model.safetensors")


def test_dry_run_checks_the_init_from_weights(processed_root, tmp_path, capsys):
    """A dry run reads --init-from and checks its shape as training would, without a backbone."""
    folder, _ = pretrained_folder(tmp_path)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--dry-run", "--init-from", str(folder))) == 0
    assert f"--init-from {folder}:" in capsys.readouterr().out
    for bad, extra in ((tmp_path / "missing.pth", ()), (folder, ("--vit-dim", "96", "--vit-heads", "3",
                                                                  "--vit-mlp", "192"))):
        code = main(train_args(processed_root, out, "--dry-run", "--init-from", str(bad), *extra))
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_dry_run_reads_the_shapes_of_the_init_from_weights_not_their_data(processed_root, tmp_path, capsys,
                                                                          monkeypatch):
    """A plan for a ViT-g must not read (hash, scan, concatenate) its gigabytes: the dry run
    checks the architecture from the shapes alone; training still reads and checks the values."""
    from dinox.model import weights

    folder, _ = pretrained_folder(tmp_path)
    exported = tmp_path / "hub"
    exported.mkdir()
    src = weights.read_weights(folder)
    backbone = build_dino_model(resolve({"config": "vit-tiny", "vit_depth": 2, "vit_dim": 64, "vit_heads": 2,
                                         "vit_mlp": 128, "img_size": 32}, hardware_preset="cpu").cfg.model,
                                img_size=32).backbone
    weights.apply_weights(src, backbone)
    torch.save(weights.dinov2_hub_state(backbone), exported / "dinov2.pth")

    def no_data(*args, **kwargs):
        raise AssertionError("a plan read the weights' data")

    monkeypatch.setattr(weights, "file_sha256", no_data)
    out = tmp_path / "runs"
    for source in (folder, exported / "dinov2.pth"):
        checked = weights.check_init_source(source, backbone.arch)
        assert checked.state["blocks.0.attn.qkv.weight"].is_meta and checked.state["pos_embed"].is_meta
        assert main(train_args(processed_root, out, "--dry-run", "--init-from", str(source))) == 0
        assert f"--init-from {source}:" in capsys.readouterr().out


def test_resume_accepts_the_same_init_from_however_spelled(processed_root, tmp_path, capsys):
    """A requeue that names the starting weights with a trailing slash, a relative or an
    absolute path continues the run; other weights are still refused."""
    import os

    folder, _ = pretrained_folder(tmp_path)
    out = tmp_path / "runs"
    common = ("--batch-size", "4", "--max-steps", "2", "--ckpt-every", "1")
    assert main(train_args(processed_root, out, *common, "--init-from", str(folder))) == 0
    capsys.readouterr()
    for spelled in (f"{folder}/", os.path.relpath(folder), str(folder)):
        code = main(train_args(processed_root, out, *common, "--max-steps", "3", "--resume", "auto", "--dry-run",
                               "--init-from", spelled))
        assert code == 0, (spelled, capsys.readouterr().err)
    other = tmp_path / "other"
    other.mkdir()
    code = main(train_args(processed_root, out, *common, "--max-steps", "3", "--resume", "auto", "--dry-run",
                           "--init-from", str(other)))
    err = capsys.readouterr().err
    assert code == 1 and "would be ignored" in err and err.count("\n") == 1
