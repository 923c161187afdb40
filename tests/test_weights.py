"""Weight import / export (dinox.model.weights, dinox export, dinox.load_backbone) against
transformers models with random weights, official-layout files written here, and bad inputs.

No download: every source model is built in the test from a small config and saved."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from _train_support import only_run, processed_root, train_args  # noqa: F401
import dinox
from dinox.cli import main
from dinox.errors import UserError
from dinox.model import weights
from dinox.model.head import DINOHead
from dinox.model.vit import ViTArch, VisionTransformer
from dinox.run import checkpoint

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5
DIM, DEPTH, HEADS, PATCH, IMG = 64, 2, 4, 8, 32
# errors at a grid other than the native one, collected for the report (pytest -s prints them)
OTHER_GRID: dict[str, float] = {}

CASES = {
    # name: (config class, model class, config kwargs, dinox arch of the same shape)
    "dinov2": ("Dinov2Config", "Dinov2Model", {},
               dict(num_registers=0)),
    "dinov2-swiglu": ("Dinov2Config", "Dinov2Model", {"use_swiglu_ffn": True},
                      dict(num_registers=0, swiglu=True)),
    "dinov2-registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {"num_register_tokens": 4},
                         dict(num_registers=4)),
    "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel", {"num_register_tokens": 4, "intermediate_size": 4 * DIM},
               dict(num_registers=4, rope=True, mask_k_bias=True, ln_eps=1e-5)),
    "dinov3-swiglu": ("DINOv3ViTConfig", "DINOv3ViTModel",
                      {"num_register_tokens": 4, "intermediate_size": 96, "use_gated_mlp": True,
                       "hidden_act": "silu"},
                      dict(num_registers=4, rope=True, mask_k_bias=True, ln_eps=1e-5, swiglu=True,
                           mlp_hidden_dim=144)),
}


def dinox_arch(case: str) -> ViTArch:
    return ViTArch(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, **CASES[case][3])


def random_hf(case: str, seed: int = 0):
    cfg_cls, model_cls, kwargs, _ = CASES[case]
    config = getattr(transformers, cfg_cls)(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                            image_size=IMG, patch_size=PATCH, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # every tensor random (LayerNorm, LayerScale and mask token too)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    base = tmp_path_factory.mktemp("hf")
    out = {}
    for case in CASES:
        model = random_hf(case)
        model.save_pretrained(base / case)
        out[case] = (model, base / case)
    return out


def tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["cls"][:, None], out["registers"], out["patches"]], dim=1)


def hf_tokens(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def dinox_tokens(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tokens(backbone.eval()(x))


# ----------------------------------------------------------------------------- transformers -> dinox

@pytest.mark.parametrize("case", list(CASES))
def test_transformers_folder_imports_and_matches(case, hf_folders):
    model, folder = hf_folders[case]
    backbone = VisionTransformer(dinox_arch(case), img_size=IMG)
    report = weights.load_pretrained(folder, backbone).as_dict()
    assert report["kind"].startswith("hf-") and len(report["sha256"]) == 64
    x = torch.randn(3, 3, IMG, IMG)
    ref, mine = hf_tokens(model, x), dinox_tokens(backbone, x)
    r = backbone.num_registers
    assert mine.shape == ref.shape == (3, 1 + r + (IMG // PATCH) ** 2, DIM)
    # class token, registers and patch tokens, each to 1e-5
    assert (mine[:, 0] - ref[:, 0]).abs().max() <= TOL
    if r:
        assert (mine[:, 1:1 + r] - ref[:, 1:1 + r]).abs().max() <= TOL
    assert (mine[:, 1 + r:] - ref[:, 1 + r:]).abs().max() <= TOL

    # another grid (48 px = 6x6 patches): imported at that grid, positions resampled once with
    # the source's convention, and the native-grid import run there with dinox's own one
    x48 = torch.randn(2, 3, 48, 48)
    ref48 = hf_tokens(model, x48)
    at48 = VisionTransformer(dinox_arch(case), img_size=48)
    report48 = weights.load_pretrained(folder, at48).as_dict()
    err_import = float((dinox_tokens(at48, x48) - ref48).abs().max())
    err_runtime = float((dinox_tokens(backbone, x48) - ref48).abs().max())
    exported = dinox.load_backbone(folder)  # keeps the source's convention for any grid
    err_loaded = float((dinox_tokens(exported, x48) - ref48).abs().max())
    OTHER_GRID[case] = err_runtime
    print(f"\n[{case}] native max|err| {float((mine - ref).abs().max()):.2e}; 48 px: imported at 48 "
          f"{err_import:.2e}, load_backbone {err_loaded:.2e}, dinox's own resampling {err_runtime:.2e} "
          f"({report48['position_embedding']})")
    assert err_import <= TOL and err_loaded <= TOL
    if case != "dinov2-registers":  # the others resample exactly as dinox does (or use RoPE)
        assert err_runtime <= TOL


@pytest.mark.parametrize("case", ["dinov2-swiglu", "dinov3"])
def test_transformers_in_memory_names_are_read_too(case, hf_folders, tmp_path):
    """transformers 5 renames the saved layout in memory (q_proj, gate_proj, model.layer.N);
    a folder written from such a state dict imports the same."""
    model, folder = hf_folders[case]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randn(2, 3, IMG, IMG)
    assert (dinox_tokens(dinox.load_backbone(tmp_path), x) - hf_tokens(model, x)).abs().max() <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_export_reproduces_every_tensor(case, hf_folders):
    model, folder = hf_folders[case]
    original = safetensors_torch.load_file(str(folder / "model.safetensors"))
    backbone = VisionTransformer(dinox_arch(case), img_size=IMG)
    report = weights.load_pretrained(folder, backbone)
    exported = weights.hf_state(backbone, report.source.extras)
    assert sorted(exported) == sorted(original)
    different = [k for k in original if not torch.equal(exported[k], original[k])]
    assert not different
    config = json.loads((folder / "config.json").read_text())
    mine = weights.hf_config(backbone.arch, IMG)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                "image_size", "layer_norm_eps", "num_register_tokens", "intermediate_size", "use_gated_mlp",
                "use_swiglu_ffn", "key_bias", "rope_theta"):
        if key in config:
            assert mine.get(key) == config[key], key


def _load_strict(folder: Path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    noisy = [r.getMessage() for r in records if r.levelno >= logging.WARNING
             and any(w in r.getMessage() for w in ("not used", "newly initialized", "not initialized", "MISSING"))]
    assert not noisy, noisy
    return model.eval()


@pytest.mark.parametrize("arch", [
    ViTArch(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_registers=0, layerscale_init=None),
    ViTArch(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_registers=2, swiglu=True, qkv_bias=False),
    ViTArch(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_registers=4, rope=True, mask_k_bias=True,
            ln_eps=1e-5, swiglu=True),
    ViTArch(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_registers=0, rope=True, mask_k_bias=False),
], ids=["dinov2-no-layerscale", "registers-swiglu-no-qkv-bias", "rope-swiglu", "rope-key-bias"])
def test_dinox_backbone_exports_to_transformers(arch, tmp_path):
    torch.manual_seed(1)
    backbone = VisionTransformer(arch, img_size=IMG)
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0.0, 0.2)
    weights.write_hf_folder(tmp_path, backbone)
    model = _load_strict(tmp_path)
    x = torch.randn(2, 3, IMG, IMG)
    assert (dinox_tokens(backbone, x) - hf_tokens(model, x)).abs().max() <= TOL
    back = dinox.load_backbone(tmp_path)
    assert back.arch.rope == arch.rope and back.num_registers == arch.num_registers
    assert (dinox_tokens(back, x) - dinox_tokens(backbone, x)).abs().max() <= TOL


# ----------------------------------------------------------------------------- official layouts

def hub_dinov2_from_hf(sd: dict, depth: int) -> dict:
    """The torch-hub DINOv2 key layout (dinov2/models/vision_transformer.py), written out here."""
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "mask_token": sd["embeddings.mask_token"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.attention."
        out[b + "attn.qkv.weight"] = torch.cat([sd[a + n + ".weight"] for n in ("query", "key", "value")])
        out[b + "attn.qkv.bias"] = torch.cat([sd[a + n + ".bias"] for n in ("query", "key", "value")])
        out[b + "attn.proj.weight"] = sd[h + "attention.output.dense.weight"]
        out[b + "attn.proj.bias"] = sd[h + "attention.output.dense.bias"]
        for n in ("norm1", "norm2"):
            out[b + n + ".weight"], out[b + n + ".bias"] = sd[h + n + ".weight"], sd[h + n + ".bias"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = sd[h + "layer_scale1.lambda1"], sd[h + "layer_scale2.lambda1"]
        for n in ("fc1", "fc2"):
            out[b + f"mlp.{n}.weight"], out[b + f"mlp.{n}.bias"] = sd[h + f"mlp.{n}.weight"], sd[h + f"mlp.{n}.bias"]
    return {k: v.clone() for k, v in out.items()}


def hub_dinov3_from_hf(sd: dict, depth: int, dim: int, heads: int, gated: bool) -> dict:
    """The DINOv3 key layout (dinov3/models/vision_transformer.py, layers/attention.py)."""
    head_dim = dim // heads
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"].reshape(1, dim),
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)),
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    for i in range(depth):
        h, b = f"layer.{i}.", f"blocks.{i}."
        a = h + "attention."
        out[b + "attn.qkv.weight"] = torch.cat([sd[a + n + "_proj.weight"] for n in "qkv"])
        q_bias = sd[a + "q_proj.bias"]
        out[b + "attn.qkv.bias"] = torch.cat([q_bias, torch.full_like(q_bias, 3.0), sd[a + "v_proj.bias"]])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = sd[a + "o_proj.weight"], sd[a + "o_proj.bias"]
        for n in ("norm1", "norm2"):
            out[b + n + ".weight"], out[b + n + ".bias"] = sd[h + n + ".weight"], sd[h + n + ".bias"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = sd[h + "layer_scale1.lambda1"], sd[h + "layer_scale2.lambda1"]
        m = h + "mlp."
        names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if gated else {"fc1": "up_proj", "fc2": "down_proj"}
        for mine, theirs in names.items():
            out[b + f"mlp.{mine}.weight"], out[b + f"mlp.{mine}.bias"] = sd[m + theirs + ".weight"], sd[m + theirs + ".bias"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("case", ["dinov2", "dinov2-registers"])
def test_torch_hub_dinov2_file_imports_and_matches(case, hf_folders, tmp_path):
    model, folder = hf_folders[case]
    hub = hub_dinov2_from_hf(safetensors_torch.load_file(str(folder / "model.safetensors")), DEPTH)
    path = tmp_path / "dinov2_vitx14_pretrain.pth"
    torch.save(hub, path)
    assert weights.detect_source(path) == weights.DINOV2_HUB
    backbone = VisionTransformer(dinox_arch(case), img_size=IMG)
    report = weights.load_pretrained(path, backbone).as_dict()
    assert report["sha256"] == checkpoint.file_sha256(path)
    assert report["not_used"] == ["cls_pos_embed", "cls_token", "mask_token"]
    x = torch.randn(2, 3, IMG, IMG)
    assert (dinox_tokens(backbone, x) - hf_tokens(model, x)).abs().max() <= TOL
    # and back to the official layout, bit for bit
    extras = weights.read_weights(path, heads=HEADS).extras
    again = weights.dinov2_hub_state(backbone, extras)
    assert sorted(again) == sorted(hub) and all(torch.equal(again[k], hub[k]) for k in hub)


@pytest.mark.parametrize("case", ["dinov3", "dinov3-swiglu"])
def test_dinov3_file_imports_and_matches(case, hf_folders, tmp_path):
    model, folder = hf_folders[case]
    arch = dinox_arch(case)
    hub = hub_dinov3_from_hf(safetensors_torch.load_file(str(folder / "model.safetensors")), DEPTH, DIM, HEADS,
                             arch.swiglu)
    path = tmp_path / "dinov3_vitx16_pretrain.pth"
    torch.save(hub, path)
    assert weights.detect_source(path) == weights.DINOV3_HUB
    backbone = VisionTransformer(arch, img_size=IMG)
    report = weights.load_pretrained(path, backbone).as_dict()
    assert "rope_embed.periods" in report["checked"]
    x = torch.randn(2, 3, 48, 48)  # RoPE: any grid
    # the key bias of the file is 3.0 everywhere: masked, as in DINOv3, it changes nothing
    assert (dinox_tokens(backbone, x) - hf_tokens(model, x)).abs().max() <= TOL
    again = weights.dinov3_hub_state(backbone, weights.read_weights(path).extras)
    assert sorted(again) == sorted(hub) and all(torch.equal(again[k], hub[k]) for k in hub)


# ----------------------------------------------------------------------------- dinox checkpoint -> export

@pytest.fixture(scope="module")
def tiny_checkpoint(processed_root, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("runs")
    assert main(train_args(processed_root, out, "--max-steps", "2", "--batch-size", "4", "--ckpt-every", "2")) == 0
    run = only_run(out)
    (run / "view_retrieval_step2_N16.json").write_text(json.dumps(
        {"step": 2, "n": 16, "split": "val", "top1": 0.25, "top5": 0.5, "ratio": 4.0, "effective_rank": 7.5}))
    return next(run.glob("checkpoint_final_*.pth"))


def test_checkpoint_exports_to_transformers_strictly(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(tiny_checkpoint), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "dino_head.safetensors", "ct_preprocessing.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    model = _load_strict(out)
    backbone = dinox.load_backbone(tiny_checkpoint)  # the teacher
    x = torch.randn(2, 3, 32, 32)
    assert (dinox_tokens(backbone, x) - hf_tokens(model, x)).abs().max() <= TOL
    assert (dinox_tokens(dinox.load_backbone(out), x) - dinox_tokens(backbone, x)).abs().max() <= TOL
    larger = torch.randn(2, 3, 48, 64)   # positions resampled: dinox's own export as its checkpoint
    assert (dinox_tokens(dinox.load_backbone(out), larger) - dinox_tokens(backbone, larger)).abs().max() <= TOL

    state = torch.load(tiny_checkpoint, weights_only=True)
    card = (out / "README.md").read_text()
    prov = state["provenance"]
    for text in (prov["git_commit"], prov["data_manifest_hash"], "step 2", "view_retrieval_step2_N16.json",
                 "| 4 |", checkpoint.file_sha256(tiny_checkpoint)):
        assert str(text) in card, text
    pre = json.loads((out / "ct_preprocessing.json").read_text())
    assert pre["image_size"] == 32 and pre["normalisation"]["mean"] == 0.5
    assert [f["name"] for f in pre["training_windows"]["families"]] == ["lung", "mediastinal", "bone", "broad"]
    assert pre["standardize_per_image"] is bool(state["config"]["standardize_views"])
    assert pre["input"]["context_mm"] == state["config"]["context_mm"] == 10.0
    assert "10 mm" in pre["input"]["slice_gap"] and "z+g" in card and "10 mm" in card

    head_state, meta = weights.read_safetensors(out / "dino_head.safetensors")
    head = DINOHead(int(meta["in_dim"]), int(meta["out_dim"]), hidden_dim=int(meta["hidden_dim"]),
                    bottleneck_dim=int(meta["bottleneck_dim"]), nlayers=int(meta["nlayers"]),
                    use_bn=meta["use_bn"] == "True")
    head.load_state_dict(head_state)
    flat = state["config"]
    assert (int(meta["out_dim"]), int(meta["hidden_dim"]), int(meta["bottleneck_dim"])) == (
        flat["out_dim"], flat["head_hidden"], flat["head_bottleneck"])
    expected = {k[5:]: v for k, v in state["teacher"].items() if k.startswith("head.")}
    assert all(torch.equal(head.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("fmt", ["safetensors", "dinov2-hub"])
def test_checkpoint_exports_as_state_dicts(fmt, tiny_checkpoint, tmp_path):
    out = tmp_path / fmt
    assert main(["export", str(tiny_checkpoint), "--format", fmt, "--out", str(out), "--network", "student"]) == 0
    student = dinox.load_backbone(tiny_checkpoint, network="student")
    file = out / ("backbone.safetensors" if fmt == "safetensors" else "backbone.pth")
    again = dinox.load_backbone(out if fmt == "safetensors" else file)
    assert not again.training
    for x in (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 64)):   # the training size, and resampled
        assert torch.equal(dinox_tokens(again, x), dinox_tokens(student, x))
    if fmt == "safetensors":  # the file is plain safetensors: the reference library reads it
        plain = safetensors_torch.load_file(str(file))
        assert all(torch.equal(plain[k], v) for k, v in student.state_dict().items())
    # the export folder itself reads as the export (what --init-from and load_backbone are given)
    folder = dinox.load_backbone(out)
    x = torch.randn(2, 3, 48, 64)
    assert torch.equal(dinox_tokens(folder, x), dinox_tokens(student, x))
    target = VisionTransformer(student.arch, img_size=32)
    assert weights.init_backbone_from(out, target)["kind"] == ("dinox-safetensors" if fmt == "safetensors"
                                                               else "dinov2-hub")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in student.state_dict().items())


def test_a_transformers_bin_file_reads_as_its_folder(hf_folders, tmp_path):
    """pytorch_model.bin given as a file is read with its config.json, as model.safetensors is."""
    model, folder = hf_folders["dinov2-registers"]
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    torch.save(safetensors_torch.load_file(str(folder / "model.safetensors")), bin_folder / "pytorch_model.bin")
    backbone = VisionTransformer(dinox_arch("dinov2-registers"), img_size=IMG)
    report = weights.init_backbone_from(bin_folder / "pytorch_model.bin", backbone)
    assert report["kind"] == "hf-dinov2-registers"
    x = torch.randn(2, 3, IMG, IMG)
    assert torch.allclose(dinox_tokens(backbone, x), hf_tokens(model, x), atol=TOL)
    (bin_folder / "pytorch_model-old.bin").write_bytes((bin_folder / "pytorch_model.bin").read_bytes())
    one_line_error(lambda: weights.init_backbone_from(bin_folder / "pytorch_model-old.bin", backbone),
                   "is not the model weights of .*pytorch_model.bin")


def test_export_refuses_a_layout_the_model_cannot_have(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "v3"
    assert main(["export", str(tiny_checkpoint), "--format", "dinov3-hub", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--format dinov2-hub" in err and "\n" not in err
    assert not out.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "full")]) == 1
    assert "not an empty folder" in capsys.readouterr().err


def _card(fmt: str, backbone: VisionTransformer) -> str:
    from dinox.commands import export
    from dinox.data.augment import AugmentConfig
    info = {"provenance": {}, "network": "teacher", "step": 1, "checkpoint": "c.pth", "checkpoint_sha256": "0",
            "dinox_version": "0", "retrieval": []}
    return export.model_card(fmt, backbone, export.ct_preprocessing(AugmentConfig(), backbone.img_size,
                                                                    backbone.patch_size), info)


def _card_call(card: str) -> dict:
    """The keyword arguments of the card's ``model = DinoVisionTransformer(...).eval()`` (the
    card's code parses as Python)."""
    import ast
    code = ast.parse(card.split("```python\n", 1)[1].split("```", 1)[0])
    [call] = [node.value.func.value for node in code.body if isinstance(node, ast.Assign)
              and getattr(node.targets[0], "id", None) == "model"]
    assert call.func.id == "DinoVisionTransformer" and not call.args
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


@pytest.mark.parametrize("registers,swiglu,layerscale", [(0, False, 1e-5), (4, False, None), (4, True, 1e-5)])
def test_model_card_says_how_each_loader_resamples_positions(registers, swiglu, layerscale):
    """A dinov2-hub card gives the official constructor that resamples as dinox does (DINOv2's
    default interpolate_offset=0.1 shifts the features away from the training size); an hf card
    of a register-free backbone (Dinov2Model, no antialiasing) does not claim a difference.
    A backbone without LayerScale still gets init_values: its state holds gammas of ones."""
    arch = ViTArch(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_registers=registers,
                   swiglu=swiglu, mlp_hidden_dim=3 * DIM if swiglu else None, qkv_bias=not swiglu,
                   layerscale_init=layerscale)
    backbone = VisionTransformer(arch, img_size=IMG)
    card = lambda fmt: _card(fmt, backbone)
    hub = card("dinov2-hub")
    kwargs = _card_call(hub)
    assert kwargs == {"img_size": IMG, "patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS,
                      "ffn_layer": "swiglufused" if swiglu else "mlp", "mlp_ratio": 3 if swiglu else 4,
                      "qkv_bias": not swiglu, "init_values": layerscale or 1.0, "num_register_tokens": registers,
                      "block_chunks": 0, "interpolate_offset": 0.0, "interpolate_antialias": False}
    assert "transformers" not in hub.split("Inputs of another size", 1)[1].split("## Provenance")[0]
    resize = card("hf").split("Inputs of another size", 1)[1].split("## Provenance")[0]
    if registers:
        assert "Dinov2WithRegistersModel antialiases" in resize
    else:
        assert "Dinov2Model resamples the same way" in resize and "differ" not in resize


@pytest.mark.parametrize("change", [
    dict(),                                                                       # the dinov3-* presets' layout
    dict(num_registers=0, layerscale_init=None, ln_eps=1e-6, qkv_bias=False),
    dict(embed_dim=72, num_heads=2, mlp_hidden_dim=272, swiglu=True, mask_k_bias=False, rope_base=1000.0),
    dict(ln_eps=1e-7),                                                            # no DINOv3 norm_layer name
], ids=["preset-layout", "no-registers-layerscale-qkv-bias", "swiglu-ratio-3.78", "other-eps"])
def test_dinov3_hub_card_gives_the_official_constructor(change):
    """The dinov3-hub card's DinoVisionTransformer(...) call (facebookresearch/dinov3) is the model
    that backbone.pth fills strictly with dinox's features: every setting of the arch record
    and of the state dict is an argument (shapes, MLP width, storage tokens, key-bias mask,
    LayerScale, LayerNorm eps), RoPE as dinox computes it (float32, no coordinate augmentation),
    one norm for all tokens. Checked against the official code by hand: max |diff| 0 to 1e-6."""
    arch = ViTArch(**{"patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS, "num_registers": 4,
                      "rope": True, "mask_k_bias": True, "ln_eps": 1e-5, **change})
    backbone = VisionTransformer(arch, img_size=IMG)
    card = _card("dinov3-hub", backbone)
    kwargs = _card_call(card)
    assert "from dinov3.models.vision_transformer import DinoVisionTransformer" in card
    state = weights.dinov3_hub_state(backbone)
    ratio = kwargs.pop("ffn_ratio")
    hidden = int(arch.embed_dim * ratio)   # how the official Block sizes its MLP
    assert hidden == arch.mlp_dim
    first = state["blocks.0.mlp.w1.weight" if arch.swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    assert first == ((int(hidden * 2 / 3) + 7) // 8 * 8 if arch.swiglu else hidden)   # SwiGLUFFN, align_to 8
    norm = kwargs.pop("norm_layer")
    assert norm == {1e-6: "layernorm", 1e-5: "layernormbf16"}.get(arch.ln_eps, "layernorm_eps1e-07")
    if arch.ln_eps == 1e-7:   # registered on the card with the eps itself
        assert f"norm_layer_dict['{norm}'] = functools.partial(torch.nn.LayerNorm, eps=1e-07)" in card
    assert kwargs.pop("layerscale_init") == (arch.layerscale_init or 1.0) and "blocks.0.ls1.gamma" in state
    assert kwargs.pop("mask_k_bias") is ("blocks.0.attn.qkv.bias_mask" in state)
    assert kwargs.pop("n_storage_tokens") == (state["storage_tokens"].shape[1] if "storage_tokens" in state else 0)
    assert kwargs.pop("qkv_bias") is ("blocks.0.attn.qkv.bias" in state)
    assert kwargs == {"img_size": IMG, "patch_size": PATCH, "embed_dim": arch.embed_dim, "depth": DEPTH,
                      "num_heads": arch.num_heads, "pos_embed_rope_base": arch.rope_base,
                      "pos_embed_rope_min_period": None, "pos_embed_rope_max_period": None,
                      "pos_embed_rope_normalize_coords": "separate", "pos_embed_rope_shift_coords": None,
                      "pos_embed_rope_jitter_coords": None, "pos_embed_rope_rescale_coords": None,
                      "pos_embed_rope_dtype": "fp32", "ffn_layer": "swiglu" if arch.swiglu else "mlp",
                      "proj_bias": True, "ffn_bias": True, "untie_cls_and_patch_norms": False,
                      "untie_global_and_local_cls_norm": False}
    assert "model.forward_features(x)" in card and "x_storage_tokens" in card


# ----------------------------------------------------------------------------- bad inputs

def one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


class _Payload:
    """Unpickling this calls os.system: a checkpoint with code in it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "payload": _Payload(marker)}, path)
    backbone = VisionTransformer(dinox_arch("dinov2"), img_size=IMG)
    one_line_error(lambda: weights.load_pretrained(path, backbone), "pickled code")
    one_line_error(lambda: dinox.load_backbone(path), "pickled code")
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) != 0
    assert "error: " in capsys.readouterr().err
    assert not marker.exists()


def test_non_checkpoints_and_folders_without_config(tmp_path):
    backbone = VisionTransformer(dinox_arch("dinov2"), img_size=IMG)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    one_line_error(lambda: weights.load_pretrained(text, backbone), "is a text file .*not a PyTorch file")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    one_line_error(lambda: weights.load_pretrained(empty, backbone), r"is empty \(0 bytes\)")
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)
    one_line_error(lambda: weights.load_pretrained(listing, backbone), "not a backbone state dict")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    one_line_error(lambda: weights.load_pretrained(folder, backbone), "no config.json")
    one_line_error(lambda: weights.load_pretrained(tmp_path / "missing", backbone), "does not exist")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    one_line_error(lambda: weights.read_safetensors(broken), "not a valid safetensors file")
    other = tmp_path / "vit"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    one_line_error(lambda: weights.load_pretrained(other, backbone), "model_type 'vit'")


def test_a_run_folder_names_its_newest_checkpoint(tiny_checkpoint):
    run = tiny_checkpoint.parent
    message = one_line_error(lambda: dinox.load_backbone(run), "is a dinox training run folder")
    assert f"e.g. {tiny_checkpoint}" in message and "model_type" not in message


def test_a_head_file_or_another_file_of_an_export_is_not_read_as_its_backbone(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(tiny_checkpoint), "--format", "hf", "--out", str(out)]) == 0
    backbone = dinox.load_backbone(tiny_checkpoint)
    target = VisionTransformer(backbone.arch, img_size=32)
    head = out / "dino_head.safetensors"
    one_line_error(lambda: dinox.load_backbone(head), "holds a projection head .*not a backbone")
    one_line_error(lambda: weights.init_backbone_from(head, target), "holds a projection head")
    (out / "copy.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    one_line_error(lambda: dinox.load_backbone(out / "copy.safetensors"),
                   "is not the model weights of .*model.safetensors")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(dinox_tokens(dinox.load_backbone(out / "model.safetensors"), x), dinox_tokens(backbone, x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_tensor_named(tiny_checkpoint, tmp_path, bad):
    backbone = dinox.load_backbone(tiny_checkpoint)
    with torch.no_grad():
        backbone.norm.weight[0] = bad
    file = weights.write_backbone_safetensors(tmp_path / "backbone.safetensors", backbone)
    hf = tmp_path / "hf"
    weights.write_hf_folder(hf, backbone)
    target = VisionTransformer(backbone.arch, img_size=32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for source in (file, hf):
        one_line_error(lambda: dinox.load_backbone(source), r"non-finite value \(NaN or Inf\) in norm.weight")
        one_line_error(lambda: weights.init_backbone_from(source, target), "norm.weight")
        one_line_error(lambda: weights.check_init_source(source, backbone.arch), "norm.weight")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_mismatched_shapes_name_both_and_load_nothing(hf_folders):
    _, folder = hf_folders["dinov2-registers"]
    wrong = VisionTransformer(ViTArch(patch_size=8, embed_dim=64, depth=2, num_heads=2, num_registers=0),
                              img_size=IMG)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    msg = one_line_error(lambda: weights.load_pretrained(folder, wrong), "requested architecture")
    assert "heads 4 vs 2" in msg and "registers 4 vs 0" in msg and "--registers 4" in msg
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())
    _, folder3 = hf_folders["dinov3"]
    msg = one_line_error(lambda: weights.load_pretrained(folder3, wrong), "requested architecture")
    assert "positions RoPE base 100 vs learned" in msg


@pytest.mark.parametrize("case", ["dinov3", "dinov3-swiglu"])
def test_a_layout_no_flag_sets_is_answered_with_the_preset_that_has_it(hf_folders, case):
    """RoPE, the masked key bias and DINOv3's LayerNorm eps come only with a dinov3-*
    preset: the hint names one, with the flags that then give the source's shape, and
    following it fits the weights."""
    import re

    from dinox.model.presets import resolve_arch

    _, folder = hf_folders[case]
    tiny = VisionTransformer(ViTArch(patch_size=8, embed_dim=64, depth=2, num_heads=2, num_registers=0),
                             img_size=IMG)
    msg = one_line_error(lambda: weights.load_pretrained(folder, tiny), "requested architecture")
    preset = re.search(r"train with --config (dinov3-[\w]+) --registers 4 and --vit-depth, --vit-dim, "
                       r"--vit-heads, --vit-mlp / --swiglu, --vit-patch set to the weights' shape$", msg)
    assert preset, msg
    source = dinox_arch(case)
    followed = resolve_arch(preset.group(1), patch=source.patch_size, dim=source.embed_dim, depth=source.depth,
                            heads=source.num_heads, mlp_hidden_dim=source.mlp_hidden_dim or 4 * source.embed_dim)
    followed = dataclasses.replace(followed, num_registers=4, swiglu=source.swiglu)
    weights.check_init_source(folder, followed)   # fits: no error


def test_every_tensor_must_be_consumed(hf_folders, tmp_path):
    _, folder = hf_folders["dinov2"]
    hub = hub_dinov2_from_hf(safetensors_torch.load_file(str(folder / "model.safetensors")), DEPTH)
    backbone = VisionTransformer(dinox_arch("dinov2"), img_size=IMG)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    extra = tmp_path / "extra.pth"
    torch.save({**hub, "head.weight": torch.zeros(3, 3)}, extra)
    one_line_error(lambda: weights.load_pretrained(extra, backbone), "head.weight.*nothing was loaded")
    missing = tmp_path / "missing.pth"
    # the last block's last tensor too: the tensors left by then no longer look like a ViT
    for key in ("blocks.1.norm2.bias", f"blocks.{DEPTH - 1}.mlp.fc2.bias"):
        torch.save({k: v for k, v in hub.items() if k != key}, missing)
        assert "is no ViT" not in one_line_error(lambda: weights.load_pretrained(missing, backbone), key)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_an_mlp_width_transformers_cannot_describe_is_refused_for_hf_only(tmp_path):
    """transformers 5 takes Dinov2's mlp_ratio as a whole number: vit-giant's 6144 at 1408
    wrote 4.36, and the folder did not load."""
    arch = ViTArch(patch_size=8, embed_dim=64, depth=1, num_heads=4, mlp_hidden_dim=96)
    backbone = VisionTransformer(arch, img_size=32)
    one_line_error(lambda: weights.hf_config(arch, 32), "mlp_ratio takes whole numbers only.*--format safetensors")
    assert "1.5x" in one_line_error(lambda: weights.write_hf_folder(tmp_path / "hf", backbone), "dinov2-hub")
    assert "dinox.load_backbone" in _card("safetensors", backbone)   # the card of another format is written
    weights.write_backbone_safetensors(tmp_path / "b.safetensors", backbone)


@pytest.mark.parametrize("fmt", ["hf", "dinov2-hub", "safetensors"])
def test_dinox_exports_read_back_at_another_size_resample_as_the_checkpoint(fmt, tmp_path):
    """An import (--init-from) of dinox's own export at another input size took the layout's
    home convention (transformers' antialiasing, DINOv2's offset 0.1), not the checkpoint's."""
    torch.manual_seed(0)
    arch = ViTArch(patch_size=14, embed_dim=64, depth=2, num_heads=4, num_registers=2)
    source = VisionTransformer(arch, img_size=56).eval()
    with torch.no_grad():
        source.pos_embed.copy_(torch.randn_like(source.pos_embed))
    (tmp_path / weights.PREPROCESSING_FILE).write_text("{}")   # what marks a dinox export
    if fmt == "hf":
        weights.write_hf_folder(tmp_path, source)
        path = tmp_path
    elif fmt == "safetensors":
        path = weights.write_backbone_safetensors(tmp_path / "backbone.safetensors", source)
    else:
        path = tmp_path / "backbone.pth"
        torch.save(weights.dinov2_hub_state(source), path)
        (tmp_path / "backbone.json").write_text(json.dumps(weights.hub_sidecar(source)))
    larger = VisionTransformer(arch, img_size=84).eval()
    weights.load_pretrained(path, larger)
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        assert torch.equal(larger(x)["patches"], source(x)["patches"])


def test_init_backbone_from_reports_for_provenance(hf_folders):
    _, folder = hf_folders["dinov2"]
    backbone = VisionTransformer(dinox_arch("dinov2"), img_size=64)
    report = weights.init_backbone_from(folder, backbone)
    json.dumps(report)  # JSON-safe
    assert report["kind"] == weights.HF_DINOV2 and report["position_embedding"].startswith("resampled 4x4 -> 8x8")
    assert set(report["files"]) == {"config.json", "model.safetensors"}


def test_safetensors_writer_matches_the_reference_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).bfloat16(),
               "d": torch.zeros(1, 0, 8), "e": torch.tensor([True, False]), "f": torch.randn(2, 3).half()}
    path = weights.write_safetensors(tmp_path / "t.safetensors", tensors, {"note": "x"})
    theirs = safetensors_torch.load_file(str(path))
    assert sorted(theirs) == sorted(tensors) and all(torch.equal(theirs[k], v) for k, v in tensors.items())
    safetensors_torch.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"note": "y"})
    mine, meta = weights.read_safetensors(tmp_path / "ref.safetensors")
    assert meta == {"note": "y"} and all(torch.equal(mine[k], v) for k, v in tensors.items())


def test_a_backbone_inside_a_training_checkpoint_reads_as_the_backbone(hf_folders, tmp_path):
    """DINOv2's teacher_checkpoint.pth ({"teacher": {"backbone.…", "dino_head.…"}}), its run
    checkpoint ({"model": {"student.backbone.…", "teacher.backbone.…"}, "optimizer": …}) and a
    DDP model saved as {"state_dict": {"module.…"}} load the backbone a plain hub file gives."""
    model, folder = hf_folders["dinov2"]
    hub = hub_dinov2_from_hf(safetensors_torch.load_file(str(folder / "model.safetensors")), DEPTH)
    plain = tmp_path / "plain.pth"
    torch.save(hub, plain)
    head = {"dino_head.mlp.0.weight": torch.ones(4, DIM)}
    wrapped = {
        "teacher_checkpoint.pth": {"teacher": {**{f"backbone.{k}": v for k, v in hub.items()}, **head}},
        "model_final.pth": {"model": {**{f"teacher.backbone.{k}": v for k, v in hub.items()},
                                      **{f"student.backbone.{k}": v * 0 for k, v in hub.items()}},
                            "optimizer": {"state": {}}, "iteration": 12},
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in hub.items()}},
    }
    reference = VisionTransformer(dinox_arch("dinov2"), img_size=IMG)
    weights.load_pretrained(plain, reference)
    for name, obj in wrapped.items():
        torch.save(obj, tmp_path / name)
        assert weights.detect_source(tmp_path / name) == weights.DINOV2_HUB
        backbone = VisionTransformer(dinox_arch("dinov2"), img_size=IMG)
        weights.load_pretrained(tmp_path / name, backbone)
        assert all(torch.equal(backbone.state_dict()[k], v) for k, v in reference.state_dict().items()), name
    torch.save({"optimizer": {"state": {}}, "iteration": 12}, tmp_path / "no_model.pth")
    one_line_error(lambda: weights.detect_source(tmp_path / "no_model.pth"), "'teacher', 'model', 'state_dict'")


def test_weights_of_another_kind_of_network_are_named_as_such(tmp_path):
    """A ResNet's (or any non-ViT) state dict is not "an incomplete DINOv2 backbone"."""
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8), "fc.weight": torch.zeros(2, 8)}
    torch.save(resnet, tmp_path / "resnet50.pth")
    backbone = VisionTransformer(dinox_arch("dinov2"), img_size=IMG)
    one_line_error(lambda: weights.load_pretrained(tmp_path / "resnet50.pth", backbone),
                   r"is no ViT: none of its 3 tensors is a patch embedding or a transformer block \(e.g. bn1.weight")


def test_the_card_says_to_resize_before_windowing_and_its_code_imports_what_it_uses():
    backbone = VisionTransformer(ViTArch(patch_size=8, embed_dim=64, depth=1, num_heads=4), img_size=32)
    for fmt in ("hf", "dinov2-hub"):
        card = _card(fmt, backbone)
        assert "resized to the input size first (the HU stack first, bilinear" in card
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        assert "torch." not in code or code.index("import torch") < code.index("torch.")
