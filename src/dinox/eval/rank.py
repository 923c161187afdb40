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


def normalized_std(embeddings: torch.Tensor) -> torch.Tensor:
    """The user guide's collapse statistic as a 0-d tensor on the input's device (no host
    synchronisation): the mean over dimensions of the (unbiased) std across samples of the
    L2-normalised rows. About 1/sqrt(D) for embeddings spread over the sphere, near 0 when
    every sample maps to the same direction; NaN for fewer than 2 rows."""
    return F.normalize(embeddings.detach(), dim=-1).std(dim=0).mean()


def embedding_std(embeddings: torch.Tensor) -> float:
    """`normalized_std` of an (n >= 2, D) matrix, computed in float64."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be (n >= 2, D), got {tuple(embeddings.shape)}")
    return float(normalized_std(embeddings.to(torch.float64)))


def embedding_stats(embeddings: torch.Tensor) -> dict:
    """Dispersion statistics of n embeddings (n, D) (or (..., D), flattened to rows), as
    written to the monitor's stats.json.

    `std` is `normalized_std` (collapse -> 0); `raw_std` the same without normalisation;
    `effective_rank` is RankMe. Stds are None for fewer than 2 samples.
    """
    x = embeddings.detach().reshape(-1, embeddings.shape[-1]).to("cpu", torch.float32)
    n, d = x.shape
    enough = n >= 2
    return {
        "n": n,
        "dim": d,
        "std": float(normalized_std(x)) if enough else None,
        "raw_std": float(x.std(dim=0).mean()) if enough else None,
        "mean_norm": float(x.norm(dim=-1).mean()) if n else None,
        "effective_rank": effective_rank(x) if n else None,
    }
