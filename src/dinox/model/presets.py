"""Named backbone presets, CLI overrides (``--vit-*``) and architecture validation.

Backbone parameter counts (no head) at ``--img-size 224`` (the position embeddings grow
with the grid), from ``benchmarks/bench_model.py``:

=========== ===== ===== ===== ===== ====== =========
name        patch dim   depth heads mlp    params
=========== ===== ===== ===== ===== ====== =========
vit-tiny    8     192   6     3     768    2.9 M
vit-small   14    384   12    6     1536   21.6 M
vit-base    14    768   12    12    3072   85.7 M
vit-large   14    1024  24    16    4096   303.2 M
vit-giant   14    1408  40    16    6144   1011.3 M
=========== ===== ===== ===== ===== ====== =========

``vit-tiny`` is for CPU smoke runs on 32-96 px crops (patch 8 gives a 4x4 to 12x12 grid).
``vit-giant`` is ViT-g/14 of Zhai et al. 2022 ("Scaling Vision Transformers"): width 1408
with MLP 6144; with the usual MLP ratio 4 (5632) it would have only ~0.95 B parameters.
"""
from __future__ import annotations

import dataclasses

from dinox.errors import UserError
from dinox.model.vit import ViTArch, check_patch_multiple

PRESETS: dict[str, ViTArch] = {
    "vit-tiny": ViTArch(patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "vit-small": ViTArch(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit-base": ViTArch(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit-large": ViTArch(patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                         mlp_hidden_dim=4096),
    "vit-giant": ViTArch(patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                         mlp_hidden_dim=6144),
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
    patch size. ``img_size=None`` skips the image-size check."""
    for field, flag in FLAGS.items():
        value = getattr(arch, field)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"{flag} must be a positive integer (got {value})")
    if arch.num_registers < 0:
        raise UserError(f"the number of register tokens must be >= 0 (got {arch.num_registers})")
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
        check_patch_multiple(img_size, arch.patch_size, "--img-size")
