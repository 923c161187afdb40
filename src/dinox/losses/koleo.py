"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"),
as used by DINOv2 (Oquab et al. 2024) on the student's class tokens.

It is the Kozachenko-Leonenko differential-entropy estimator up to constants:

    L = -1/B sum_i log(d_i + eps),   d_i = min_{j != i} || x_i - x_j ||_2

on L2-normalised features x. Minimising it pushes each sample away from its nearest
neighbour in the batch, spreading the embeddings uniformly over the sphere, which
counters the dimensional collapse DINO alone can drift into. The trainer applies it to
the class token of each student global view separately and multiplies by its weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D). Needs B >= 2; for B < 2 there is no neighbour and the loss is 0."""
        if x.shape[0] < 2:
            return x.sum() * 0.0
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                sim = z @ z.t()
                sim.fill_diagonal_(-2.0)
                nearest = sim.argmax(dim=1)
            distance = (z - z[nearest]).norm(p=2, dim=-1)
            return -torch.log(distance + self.eps).mean()
