"""Gram anchoring (Siméoni et al. 2025, DINOv3, section 4 "Gram anchoring").

For each image, with X the (N, D) matrix of L2-normalised patch features, the Gram matrix
G = X X^T holds all patch-to-patch cosine similarities. The loss keeps the student's
patch similarity structure close to that of a "Gram teacher" (an earlier, frozen
snapshot whose patch features are still well localised):

    L_Gram = 1/B sum_b 1/N^2 || X_s[b] X_s[b]^T - X_g[b] X_g[b]^T ||_F^2

Only the similarity structure is anchored, not the features themselves, so the features
remain free to move. In dinox it is always on: on CT, without it the dense features
collapse (all lung tissue looks alike) and nodules stop being distinguishable from vessels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dinox.errors import UserError


def patch_gram(patches: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine-similarity Gram matrices, in float32."""
    x = F.normalize(patches.float(), p=2, dim=-1)
    return x @ x.transpose(-1, -2)


def gram_anchoring_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor,
                        remove_negative: bool = False) -> torch.Tensor:
    """Mean over images of the mean squared difference of the per-image Gram matrices.

    The teacher side carries no gradient. Feature dims may differ (only N must match).
    ``remove_negative`` clips negative similarities to 0 on both sides first (an option
    of the DINOv3 code, off by default here)."""
    if student_patches.shape[:2] != teacher_patches.shape[:2]:
        raise ValueError(f"student patches {tuple(student_patches.shape)} and teacher patches "
                         f"{tuple(teacher_patches.shape)} need the same (B, N)")
    with torch.autocast(device_type=student_patches.device.type, enabled=False):
        with torch.no_grad():
            target = patch_gram(teacher_patches.detach())
        gram = patch_gram(student_patches)
        if remove_negative:
            target = target.clamp_min(0.0)
            gram = gram.clamp_min(0.0)
        return F.mse_loss(gram, target)


def validate_gram_weight(weight: float) -> None:
    """UserError unless ``--gram-weight`` is a positive finite number."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise UserError(
            f"--gram-weight must be positive (got {weight}): Gram anchoring cannot be disabled, "
            "because without it CT features collapse and all lung tissue looks alike; "
            "pass a positive --gram-weight, e.g. 1.0")
