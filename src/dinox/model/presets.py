"""Named backbone presets, CLI overrides (``--vit-*``) and architecture validation.

Backbone parameter counts (no head) at ``--img-size 224`` (the learned position
embeddings grow with the grid; the RoPE presets have none), from
``benchmarks/bench_model.py``:

================= ===== ===== ===== ===== ====== ====== ==== =========
name              patch dim   depth heads mlp    ffn    pos  params
================= ===== ===== ===== ===== ====== ====== ==== =========
vit-tiny          8     192   2     3     768    GELU   abs  1.1 M
vit-small         14    384   12    6     1536   GELU   abs  21.6 M
vit-base          14    768   12    12    3072   GELU   abs  85.7 M
vit-large         14    1024  24    16    4096   GELU   abs  303.2 M
vit-giant         14    1408  40    16    6144   GELU   abs  1011.3 M
vit-giant2        14    1536  40    24    6144   SwiGLU abs  1134.8 M
dinov3-vits16     16    384   12    6     1536   GELU   RoPE 21.6 M
dinov3-vits16plus 16    384   12    6     2304   SwiGLU RoPE 28.7 M
dinov3-vitb16     16    768   12    12    3072   GELU   RoPE 85.7 M
dinov3-vitl16     16    1024  24    16    4096   GELU   RoPE 303.2 M
dinov3-vith16plus 16    1280  32    20    7680   SwiGLU RoPE 840.6 M
================= ===== ===== ===== ===== ====== ====== ==== =========

``vit-tiny`` is for CPU smoke runs and the demo on 32-96 px crops (patch 8 gives a 4x4 to 12x12
grid). It has two blocks: at the demo's fixed compute a shallower network trains more steps,
and on the phantoms two blocks for 670 steps learnt more than six for 290, three for 520 or
four for 420 in the same time (docs/recipes.md, "The tiny network's depth").
``vit-giant`` is ViT-g/14 of Zhai et al. 2022 ("Scaling Vision Transformers"): width 1408
with MLP 6144; with the usual MLP ratio 4 (5632) it would have only ~0.95 B parameters.
``vit-giant2`` is DINOv2's ViT-g/14 (``vit_giant2`` in dinov2/models/vision_transformer.py:
width 1536, 24 heads of 64, SwiGLU of hidden width 4096), the shape of the released
``dinov2_vitg14`` weights. ``vit-small`` .. ``vit-large`` are DINOv2's ViT-S/B/L/14.
The released DINOv2 files without ``_reg`` have no register tokens: use ``--registers 0``.

The ``dinov3-*`` presets are the shapes of the released DINOv3 ViTs (dinov3/hub/backbones.py):
patch 16, RoPE (base 100), 4 register ("storage") tokens, the key bias masked to zero,
LayerNorm eps 1e-5, LayerScale; the "plus" models use SwiGLU with an MLP ratio of 6.
"""
from __future__ import annotations

import dataclasses

from dinox.errors import UserError
from dinox.model.vit import ViTArch, check_patch_multiple

def _dinov3(dim: int, depth: int, heads: int, ffn_ratio: int, swiglu: bool = False) -> ViTArch:
    """The shape of a released DINOv3 ViT (dinov3/hub/backbones.py)."""
    return ViTArch(patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                   mlp_hidden_dim=ffn_ratio * dim, swiglu=swiglu, num_registers=4,
                   layerscale_init=1e-5, rope=True, rope_base=100.0, mask_k_bias=True,
                   ln_eps=1e-5)


PRESETS: dict[str, ViTArch] = {
    "vit-tiny": ViTArch(patch_size=8, embed_dim=192, depth=2, num_heads=3),
    "vit-small": ViTArch(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit-base": ViTArch(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit-large": ViTArch(patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                         mlp_hidden_dim=4096),
    "vit-giant": ViTArch(patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                         mlp_hidden_dim=6144),
    "vit-giant2": ViTArch(patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                          mlp_hidden_dim=6144, swiglu=True),
    "dinov3-vits16": _dinov3(384, 12, 6, 4),
    "dinov3-vits16plus": _dinov3(384, 12, 6, 6, swiglu=True),
    "dinov3-vitb16": _dinov3(768, 12, 12, 4),
    "dinov3-vitl16": _dinov3(1024, 24, 16, 4),
    "dinov3-vith16plus": _dinov3(1280, 32, 20, 6, swiglu=True),
}

CUSTOM = "custom"

FLAGS = {
    "patch_size": "--vit-patch",
    "embed_dim": "--vit-dim",
    "depth": "--vit-depth",
    "num_heads": "--vit-heads",
    "mlp_hidden_dim": "--vit-mlp",
}


def resolve_arch(name: str, patch: int | None = None, dim: int | None = None,
                 depth: int | None = None, heads: int | None = None,
                 mlp_hidden_dim: int | None = None) -> ViTArch:
    """The preset ``name`` with any given value overriding it; ``"custom"`` needs all of
    patch, dim, depth and heads. When ``dim`` changes and ``mlp_hidden_dim`` is not given,
    the MLP goes back to 4 * dim (a preset's own MLP width belongs to its own dim)."""
    if name == CUSTOM:
        given = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads}
        missing = [FLAGS[k] for k, v in given.items() if v is None]
        if missing:
            raise UserError("--config custom needs --vit-patch, --vit-dim, --vit-depth and "
                            f"--vit-heads; missing: {', '.join(missing)}")
        return ViTArch(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                       mlp_hidden_dim=mlp_hidden_dim)
    if name not in PRESETS:
        choices = ", ".join([*PRESETS, CUSTOM])
        raise UserError(f"unknown --config {name!r}; choose one of: {choices}")
    base = PRESETS[name]
    changes: dict[str, int | None] = {}
    for field, value in (("patch_size", patch), ("embed_dim", dim), ("depth", depth),
                         ("num_heads", heads)):
        if value is not None:
            changes[field] = value
    if mlp_hidden_dim is not None:
        changes["mlp_hidden_dim"] = mlp_hidden_dim
    elif dim is not None and dim != base.embed_dim:
        changes["mlp_hidden_dim"] = None
    return dataclasses.replace(base, **changes)


def _multiples_near(value: int, k: int) -> str:
    lo, hi = value // k * k, (value // k + 1) * k
    return f"{lo} or {hi}" if lo > 0 else f"{hi}"


def validate_arch(arch: ViTArch, img_size: int | None = None) -> None:
    """UserError (one line, naming the flag and a fix) for an architecture that cannot be
    built: non-positive sizes, dim not divisible by heads, img_size not a multiple of the
    patch size or under two patches. ``img_size=None`` skips the image-size check."""
    for field, flag in FLAGS.items():
        value = getattr(arch, field)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"{flag} must be a positive integer (got {value})")
    if arch.num_registers < 0:
        raise UserError(f"the number of register tokens must be >= 0 (got {arch.num_registers})")
    if arch.rope and (arch.embed_dim % arch.num_heads == 0) and arch.head_dim % 4:
        raise UserError(f"RoPE needs a head width divisible by 4 (--vit-dim {arch.embed_dim} / "
                        f"--vit-heads {arch.num_heads} = {arch.head_dim}); use heads of 64 channels")
    if arch.layerscale_init is not None and arch.layerscale_init <= 0:
        raise UserError(f"layerscale init must be positive or None (got {arch.layerscale_init})")
    if arch.embed_dim % arch.num_heads:
        raise UserError(
            f"--vit-dim {arch.embed_dim} is not divisible by --vit-heads {arch.num_heads}; "
            f"pick a dim that is a multiple of {arch.num_heads}, e.g. "
            f"{_multiples_near(arch.embed_dim, arch.num_heads)}")
    if img_size is not None:
        if not isinstance(img_size, int) or img_size <= 0:
            raise UserError(f"--img-size must be a positive integer (got {img_size})")
        grid = img_size // arch.patch_size
        if grid < 2:   # the patch-level losses compare tokens within a view; the iBOT head's BN needs two
            raise UserError(f"--img-size {img_size} gives a {grid}x{grid} patch grid with --vit-patch "
                            f"{arch.patch_size}; the patch-level losses (iBOT, Gram, dense) need at least 2x2: "
                            f"use --img-size {2 * arch.patch_size} or more")
        check_patch_multiple(img_size, arch.patch_size, "--img-size")
