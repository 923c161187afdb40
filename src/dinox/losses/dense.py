"""Dense correspondence loss: a patch token must pick out its own anatomy in the other view.

The two global views of a slice are crops (and flips) of the same image with known boxes,
so every student patch token of view a has a known point in view b. There the teacher's
patch-token map is sampled bilinearly; that feature is the positive, and the features at
every other matched point of the batch (other places of the same slice, other slices) are
the negatives of an InfoNCE loss (van den Oord et al. 2018), as in the geometric-matching
dense objectives (PixPro, Xie et al. 2021; VICRegL, Bardes et al. 2022; DenseCL, Wang et
al. 2021, which matches by feature instead). The views differ in HU window, crop scale and
sub-patch offset, so the tokens must describe what lies under them in a way that survives
all three, not where they sit on the grid (the positions differ between the views).

    L = -1/M sum_i log softmax_j(<q_i, k_j> / tau)_i,   q, k L2-normalised,

over the M student tokens whose point lies inside the other view (and, with iBOT, that are
not masked), averaged over both directions a -> b and b -> a.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_token_map(tokens: torch.Tensor, grid: int, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (B, P, D) of a (B, grid * grid, D) token map at (B, h, w, 2)
    ``grid_sample`` coordinates, P = h * w."""
    b, _, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, grid, grid)
    return F.grid_sample(fmap, coords.to(fmap.dtype), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def dense_correspondence_loss(student: torch.Tensor, teacher: torch.Tensor, coords: torch.Tensor,
                              valid: torch.Tensor, grid: int, temperature: float,
                              teacher_grid: int | None = None) -> torch.Tensor:
    """InfoNCE of one direction: student (B, N, D) tokens of view a, teacher (B, K, D)
    tokens of view b on a teacher_grid x teacher_grid map (default `grid`; finer where the
    teacher saw the view enlarged), coords (B, grid, grid, 2) of view a's token centres in
    view b (``grid_sample`` units, so they hold on any grid of the same view), valid (B, N)
    the tokens that take part. Zero (with a gradient path) when none does."""
    with torch.no_grad():
        k = F.normalize(sample_token_map(teacher, teacher_grid or grid, coords)[valid], dim=-1)
    # 1 / tau folded into the queries: one scaling of (M, D) rather than of the (M, M) logits
    q = F.normalize(student[valid], dim=-1) / temperature
    if q.shape[0] == 0:
        return student.sum() * 0.0
    return F.cross_entropy(q @ k.T, torch.arange(q.shape[0], device=q.device))
