"""Presets, CLI overrides and the architecture validation messages."""
from __future__ import annotations

import pytest
import torch

from dinox.errors import UserError
from dinox.model.head import DINOHead
from dinox.model.presets import PRESETS, resolve_arch, validate_arch
from dinox.model.vit import ViTArch, VisionTransformer, count_parameters, swiglu_hidden_dim


def expected_backbone_params(arch: ViTArch, img_size: int, in_chans: int = 3) -> int:
    """Parameter count written out layer by layer."""
    d, p = arch.embed_dim, arch.patch_size
    n_patches = (img_size // p) ** 2
    embed = in_chans * p * p * d + d
    # RoPE models (the dinov3-* presets) learn no position embedding
    tokens = d + arch.num_registers * d + (0 if arch.rope else n_patches * d)
    attn = (d * 3 * d + (3 * d if arch.qkv_bias else 0)) + (d * d + d)
    if arch.swiglu:
        h = swiglu_hidden_dim(arch.mlp_dim)
        mlp = (d * 2 * h + 2 * h) + (h * d + d)
    else:
        h = arch.mlp_dim
        mlp = (d * h + h) + (h * d + d)
    norms = 2 * (2 * d)
    layerscale = 2 * d if arch.layerscale_init is not None else 0
    return embed + tokens + arch.depth * (attn + mlp + norms + layerscale) + 2 * d


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_expected_count(name):
    arch = PRESETS[name]
    validate_arch(arch, 224)
    model = VisionTransformer(arch, img_size=224, device="meta")
    n = count_parameters(model)
    print(f"{name}: {n:,} backbone parameters")
    assert all(p.is_meta for p in model.parameters())
    assert n == expected_backbone_params(arch, 224)


def test_preset_sizes():
    counts = {name: count_parameters(VisionTransformer(a, img_size=224, device="meta"))
              for name, a in PRESETS.items()}
    assert 300e6 <= counts["vit-large"] <= 310e6
    assert counts["vit-giant"] > 1.0e9
    assert 1e6 < counts["vit-tiny"] < 5e6
    assert counts["vit-small"] < counts["vit-base"] < counts["vit-large"]
    tiny = PRESETS["vit-tiny"]
    assert (tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (8, 192, 2, 3)
    large = PRESETS["vit-large"]
    assert (large.patch_size, large.embed_dim, large.depth, large.num_heads) == (14, 1024, 24, 16)
    giant = PRESETS["vit-giant"]
    assert (giant.patch_size, giant.embed_dim, giant.depth, giant.num_heads,
            giant.mlp_dim) == (14, 1408, 40, 16, 6144)


def test_meta_head_for_giant():
    with torch.device("meta"):
        head = DINOHead(1408, 65536)
    expected = (1408 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 256 + 256) \
        + 65536 * 256 + 65536
    assert count_parameters(head) == expected


def test_resolve_overrides_and_mlp_rule():
    assert resolve_arch("vit-large") == PRESETS["vit-large"]
    arch = resolve_arch("vit-large", patch=16)
    assert (arch.patch_size, arch.embed_dim, arch.mlp_dim) == (16, 1024, 4096)
    wider = resolve_arch("vit-giant", dim=1536)
    assert (wider.embed_dim, wider.mlp_dim, wider.depth) == (1536, 6144, 40)
    same = resolve_arch("vit-giant", dim=1408)
    assert same.mlp_dim == 6144
    narrow = resolve_arch("vit-giant", dim=1024)
    assert narrow.mlp_dim == 4096
    explicit = resolve_arch("vit-giant", dim=1024, mlp_hidden_dim=5000)
    assert explicit.mlp_dim == 5000
    assert resolve_arch("vit-base", depth=6, heads=6).depth == 6


def test_resolve_custom():
    arch = resolve_arch("custom", patch=16, dim=768, depth=12, heads=12)
    assert (arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads, arch.mlp_dim) == \
        (16, 768, 12, 12, 3072)
    with pytest.raises(UserError) as err:
        resolve_arch("custom", patch=16, depth=12)
    assert str(err.value).endswith("missing: --vit-dim, --vit-heads")
    with pytest.raises(UserError, match="unknown --config 'vit-huge'.*vit-tiny.*custom"):
        resolve_arch("vit-huge")


def test_validate_messages():
    with pytest.raises(UserError) as err:
        validate_arch(resolve_arch("vit-giant", dim=1000), 224)
    assert str(err.value) == ("--vit-dim 1000 is not divisible by --vit-heads 16; pick a dim "
                              "that is a multiple of 16, e.g. 992 or 1008")
    with pytest.raises(UserError) as err:
        validate_arch(PRESETS["vit-large"], 512)
    assert str(err.value) == ("--img-size 512 is not a multiple of --vit-patch 14; use "
                              "--vit-patch 16 (512 = 32 x 16) or --img-size 504 or 518")
    validate_arch(resolve_arch("vit-large", patch=16), 512)
    with pytest.raises(UserError, match=r"^--vit-depth must be a positive integer \(got 0\)$"):
        validate_arch(resolve_arch("vit-base", depth=0), 224)
    with pytest.raises(UserError, match=r"^--vit-heads must be a positive integer \(got -2\)$"):
        validate_arch(resolve_arch("custom", patch=8, dim=64, depth=2, heads=-2), 64)
    with pytest.raises(UserError, match=r"^--img-size must be a positive integer"):
        validate_arch(PRESETS["vit-tiny"], 0)
    with pytest.raises(UserError, match=r"^--img-size 20 is not a multiple of --vit-patch 8; "
                                        r"use --vit-patch 5 \(20 = 4 x 5\) or --img-size 16 or 24$"):
        validate_arch(PRESETS["vit-tiny"], 20)
    # under two patches a side the message names the smallest size that works, not the nearest multiple
    for size, grid in ((12, 1), (8, 1), (5, 0)):
        with pytest.raises(UserError, match=rf"^--img-size {size} gives a {grid}x{grid} patch grid with --vit-patch 8; "
                                            r".* need at least 2x2: use --img-size 16 or more$"):
            validate_arch(PRESETS["vit-tiny"], size)
    validate_arch(PRESETS["vit-tiny"], None)
