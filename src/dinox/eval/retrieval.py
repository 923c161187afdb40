"""Label-free view retrieval: do two augmented views of the same slice find each other?

Query i (an embedding of view 1 of sample i) ranks all keys (view 2 of every sample) by
cosine similarity; it is a top-k hit when key i is among the k most similar. A model that
has learnt nothing scores about the chance level 1/n, so ``ratio = top1 / (1/n)`` measures
how far above chance the features are (the user guide reports ratio 3 as the first sign of
semantic learning).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def correct_key_ranks(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """0-based rank of key i among all keys for query i, by cosine similarity, shape (n,).

    Ties are broken against the query (conservative): every other key whose similarity
    equals the correct key's is ranked ahead of it, so duplicated or collapsed embeddings
    cannot score hits by luck. A NaN similarity to another key counts as ahead; a NaN
    similarity to the correct key gives rank n (a miss at every k). Similarities are
    computed ``chunk_size`` queries at a time (default: about 16M similarities per chunk,
    64 MiB in float32) so n = 4096+ at D = 1024 stays in modest memory. Float64 inputs are
    compared in float64, anything else in float32.
    """
    if queries.dim() != 2 or queries.shape != keys.shape:
        raise ValueError(f"queries and keys must both be (n, D), got {tuple(queries.shape)} and {tuple(keys.shape)}")
    n = queries.shape[0]
    dtype = torch.float64 if queries.dtype == torch.float64 and keys.dtype == torch.float64 else torch.float32
    q = F.normalize(queries.to(dtype), dim=1)
    k = F.normalize(keys.to(dtype).to(q.device), dim=1)
    step = chunk_size or max(1, _DEFAULT_CHUNK_ELEMENTS // max(n, 1))
    ranks = torch.empty(n, dtype=torch.long, device=q.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        sim = q[start:stop] @ k.T
        rows = torch.arange(stop - start, device=q.device)
        correct = sim[rows, rows + start].unsqueeze(1)
        ahead = (sim > correct) | torch.isnan(sim)
        tied = sim == correct
        tied[rows, rows + start] = False
        rank = ahead.sum(1) + tied.sum(1)
        ranks[start:stop] = torch.where(torch.isnan(correct[:, 0]), n, rank)
    return ranks


def nearest_keys(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Index of each query's most cosine-similar key, shape (n,), in chunks as
    ``correct_key_ranks`` (a tie goes to the lowest index)."""
    if queries.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must be (n, D) and (m, D), got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float().to(q.device), dim=1)
    step = chunk_size or max(1, _DEFAULT_CHUNK_ELEMENTS // max(k.shape[0], 1))
    return torch.cat([(q[i:i + step] @ k.T).argmax(1) for i in range(0, q.shape[0], step)])


def view_retrieval(
    queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 5), chunk_size: int | None = None
) -> dict:
    """Top-k view retrieval accuracy of ``queries`` (n, D) against ``keys`` (n, D).

    Returns ``{"n", "top{k}" for each k, "baseline": 1/n, "ratio": top1/baseline,
    "mean_rank"}`` as plain Python numbers (``mean_rank`` is 1-based; top1 is always
    reported, even when 1 is not in ``ks``).
    """
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    n = queries.shape[0]
    if n == 0:
        raise ValueError("view_retrieval needs at least one query")
    ranks = correct_key_ranks(queries, keys, chunk_size).cpu()
    result: dict = {"n": n}
    for k in sorted({1, *(int(k) for k in ks)}):
        result[f"top{k}"] = float((ranks < k).double().mean())
    result["baseline"] = 1.0 / n
    result["ratio"] = result["top1"] * n
    result["mean_rank"] = float((ranks + 1).double().mean())
    return result


def spread_sample(ranges: dict[str, range], n: int, seed: int, min_gap: int = 1) -> list[int]:
    """``n`` distinct sample indices spread evenly over series, deterministic per ``seed``.

    Series are shuffled, then served round-robin, one slice per series per pass, skipping
    series that are full, so the counts per series differ by at most one wherever a series
    has enough slices. Within a series the slices are a uniformly random subset whose
    positions are at least ``min_gap`` apart. When fewer than ``n`` can be picked, all that
    can are returned (with ``min_gap=1``: every index). The result is in round-robin order,
    so any prefix is spread too.

    ``min_gap`` defaults to 1 (any distinct slices) so that the sample is exactly "n
    distinct indices". Neighbouring slices of a 3-slice stack share two of their three
    slices and look nearly identical: they act as hard negatives and can only lower the
    retrieval score, never inflate it; ``min_gap=3`` gives stacks that share no slice.
    """
    if n < 0 or min_gap < 1:
        raise ValueError(f"need n >= 0 and min_gap >= 1, got n={n}, min_gap={min_gap}")
    rng = random.Random(seed)
    names = sorted(ranges)
    rng.shuffle(names)
    capacity = {s: (len(ranges[s]) + min_gap - 1) // min_gap for s in names}
    counts = dict.fromkeys(names, 0)
    order: list[str] = []
    while len(order) < n:
        open_series = [s for s in names if counts[s] < capacity[s]]
        if not open_series:
            break
        for s in open_series[: n - len(order)]:
            counts[s] += 1
            order.append(s)
    picks = {}
    for s in names:
        m, length = counts[s], len(ranges[s])
        if m == 0:
            continue
        slots = sorted(rng.sample(range(length - (m - 1) * (min_gap - 1)), m))
        positions = [slot + i * (min_gap - 1) for i, slot in enumerate(slots)]
        rng.shuffle(positions)
        picks[s] = iter([ranges[s][p] for p in positions])
    return [next(picks[s]) for s in order]
