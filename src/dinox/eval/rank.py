"""Label-free statistics of an embedding matrix: effective rank and dispersion."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def effective_rank(embeddings: torch.Tensor, eps: float = 1e-7, center: bool = False) -> float:
    """RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of
    pretrained self-supervised representations by their rank").

    With singular values s of the (n, D) matrix, p_k = s_k / sum(s) + eps and
    erank = exp(-sum_k p_k log p_k), between 1 (collapse onto one direction) and min(n, D).
    The matrix is not centred by default, as in the paper; ``center=True`` subtracts the
    mean embedding first (then a common offset shared by all samples does not count as a
    dimension). Computed in float64. Returns 0.0 for an all-zero matrix and NaN when the
    input holds NaN or Inf.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (n, D), got {tuple(embeddings.shape)}")
    x = embeddings.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return math.nan
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the (unbiased) std across samples of L2-normalised embeddings.

    The user guide's collapse statistic: about 1/sqrt(D) for embeddings spread over the
    sphere, near 0 when every sample maps to the same direction. Needs n >= 2.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be (n >= 2, D), got {tuple(embeddings.shape)}")
    z = F.normalize(embeddings.detach().to(torch.float64), dim=1)
    return float(z.std(0).mean())


def embedding_stats(embeddings: torch.Tensor) -> dict:
    """{"n", "dim", "erank", "emb_std"} for logging and the anomaly guard."""
    n, d = embeddings.shape
    return {"n": n, "dim": d, "erank": effective_rank(embeddings), "emb_std": embedding_std(embeddings)}
