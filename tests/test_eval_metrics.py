from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dinox.eval.rank import embedding_std, effective_rank
from dinox.eval.retrieval import correct_key_ranks, nearest_keys, spread_sample, view_retrieval


def brute_force_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> float:
    """Python loop over queries in float64; ties counted against the query."""
    q = queries.double()
    kk = keys.double()
    hits = 0
    for i in range(len(q)):
        sims = [float(q[i] @ kk[j] / (q[i].norm() * kk[j].norm())) for j in range(len(kk))]
        better_or_tied = sum(1 for j, s in enumerate(sims) if j != i and s >= sims[i])
        hits += better_or_tied < k
    return hits / len(q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_view_retrieval_matches_brute_force(dtype):
    g = torch.Generator().manual_seed(0)
    n, d = 48, 8
    base = torch.randn(n, d, generator=g)
    queries = (base + 0.9 * torch.randn(n, d, generator=g)).to(dtype)
    keys = (base + 0.9 * torch.randn(n, d, generator=g)).to(dtype)
    result = view_retrieval(queries, keys, ks=(1, 3, 5), chunk_size=7)
    for k in (1, 3, 5):
        assert result[f"top{k}"] == pytest.approx(brute_force_topk(queries, keys, k))
    assert 0 < result["top1"] < 1
    assert result["n"] == n
    assert result["baseline"] == pytest.approx(1 / n)
    assert result["ratio"] == pytest.approx(result["top1"] * n)


def test_nearest_keys_match_a_python_loop():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(30, 6, generator=g), 3.0 * torch.randn(40, 6, generator=g)
    expected = []
    for i in range(len(q)):
        sims = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) for j in range(len(k))]
        expected.append(max(range(len(k)), key=lambda j: sims[j]))
    assert nearest_keys(q, k, chunk_size=7).tolist() == expected


def test_uncropped_views_show_the_whole_slice():
    from dinox.data.augment import LUNG_WINDOW, AugmentConfig
    from dinox.eval.runner import view_augment

    train = AugmentConfig(global_size=32, n_local=4, global_scale=(0.4, 1.0))
    assert view_augment(train, "train").global_scale == (0.4, 1.0) and view_augment(train).n_local == 0
    whole = view_augment(train, "uncropped")
    assert whole.global_scale == (1.0, 1.0) and whole.ratio == (1.0, 1.0)
    assert whole.window_families == train.window_families
    lung = view_augment(train, "uncropped-lung")
    assert lung.window_families == (LUNG_WINDOW,) and lung.global_scale == (1.0, 1.0)
    with pytest.raises(ValueError):
        view_augment(train, "cropped")


def test_chunking_does_not_change_ranks():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g)
    assert torch.equal(correct_key_ranks(q, k, chunk_size=1), correct_key_ranks(q, k, chunk_size=1000))


def test_identical_views_are_perfect():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    result = view_retrieval(x, x.clone())
    assert result["top1"] == 1.0
    assert result["ratio"] == pytest.approx(64)
    assert result["mean_rank"] == 1.0


def test_scale_invariance_uses_cosine():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    scales = torch.linspace(0.1, 10, 32).unsqueeze(1)
    assert view_retrieval(x, x * scales)["top1"] == 1.0


def test_independent_views_are_at_chance():
    ratios = []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        ratios.append(view_retrieval(torch.randn(256, 32, generator=g), torch.randn(256, 32, generator=g))["ratio"])
    assert sum(ratios) / len(ratios) < 3


def test_topk_monotone_in_k():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(128, 16, generator=g)
    result = view_retrieval(base + torch.randn(128, 16, generator=g), base + torch.randn(128, 16, generator=g),
                            ks=(1, 2, 5, 10, 50, 128))
    values = [result[f"top{k}"] for k in (1, 2, 5, 10, 50, 128)]
    assert values == sorted(values)
    assert values[-1] == 1.0


def test_collapsed_embeddings_score_zero():
    x = torch.ones(16, 4)
    result = view_retrieval(x, x)
    assert result["top1"] == 0.0 and result["top5"] == 0.0


def test_nan_embeddings_are_misses():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    x[3] = float("nan")
    ranks = correct_key_ranks(x, x.clone())
    assert ranks[3] == 16
    assert torch.equal(ranks[torch.arange(16) != 3], torch.ones(15, dtype=torch.long))
    result = view_retrieval(x, x.clone())
    assert result["top1"] == 0.0 and result["top5"] == pytest.approx(15 / 16)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        view_retrieval(torch.zeros(4, 3), torch.zeros(5, 3))


def test_effective_rank_orthonormal():
    q, _ = torch.linalg.qr(torch.randn(32, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    assert effective_rank(q.T) == pytest.approx(12, rel=1e-4)


def test_effective_rank_rank_one():
    u = torch.randn(50, 1, generator=torch.Generator().manual_seed(7))
    v = torch.randn(1, 20, generator=torch.Generator().manual_seed(8))
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_diagonal_hand_computed():
    x = torch.diag(torch.tensor([3.0, 1.0]))
    p = [0.75, 0.25]
    expected = math.exp(-sum(pk * math.log(pk) for pk in p))
    assert effective_rank(x, eps=0.0) == pytest.approx(expected, rel=1e-12)
    assert effective_rank(x) == pytest.approx(expected, rel=1e-5)


def test_effective_rank_centering_and_edge_cases():
    offset = torch.ones(10, 4) * 5
    noise = torch.randn(10, 4, generator=torch.Generator().manual_seed(9)) * 1e-3
    assert effective_rank(offset + noise) < 1.1
    assert effective_rank(offset + noise, center=True) > 2
    assert effective_rank(torch.zeros(5, 3)) == 0.0
    assert math.isnan(effective_rank(torch.full((3, 3), float("nan"))))


def test_embedding_std():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    z = x / x.norm(dim=1, keepdim=True)
    expected = sum(
        math.sqrt(sum((z[i, j] - z[:, j].mean()) ** 2 for i in range(6)) / 5) for j in range(5)
    ) / 5
    assert embedding_std(x) == pytest.approx(float(expected))
    assert embedding_std(torch.ones(8, 3) * torch.arange(1, 9).unsqueeze(1)) == pytest.approx(0.0, abs=1e-12)


def _ranges(lengths):
    out, start = {}, 0
    for i, length in enumerate(lengths):
        out[f"s{i}"] = range(start, start + length)
        start += length
    return out


def test_spread_sample_even_and_distinct():
    ranges = _ranges([40, 50, 60, 45, 55])
    picks = spread_sample(ranges, 37, seed=0)
    assert len(picks) == 37 == len(set(picks))
    owner = {i: s for s, r in ranges.items() for i in r}
    counts = Counter(owner[i] for i in picks)
    assert len(counts) == 5 and max(counts.values()) - min(counts.values()) <= 1
    assert spread_sample(ranges, 37, seed=0) == picks
    assert spread_sample(ranges, 37, seed=1) != picks


def test_spread_sample_small_series_and_shortfall():
    ranges = _ranges([2, 30, 30, 0])
    picks = spread_sample(ranges, 20, seed=3)
    owner = {i: s for s, r in ranges.items() for i in r}
    counts = Counter(owner[i] for i in picks)
    assert counts["s0"] == 2 and abs(counts["s1"] - counts["s2"]) <= 1 and len(picks) == 20
    everything = spread_sample(ranges, 1000, seed=3)
    assert sorted(everything) == list(range(62))


def test_spread_sample_prefix_is_round_robin():
    ranges = _ranges([10, 10, 10])
    picks = spread_sample(ranges, 9, seed=5)
    owner = {i: s for s, r in ranges.items() for i in r}
    assert len({owner[i] for i in picks[:3]}) == 3


def test_spread_sample_min_gap():
    ranges = _ranges([20, 9])
    picks = spread_sample(ranges, 100, seed=2, min_gap=3)
    assert len(picks) == 7 + 3
    for r in ranges.values():
        mine = sorted(i for i in picks if i in r)
        assert all(b - a >= 3 for a, b in zip(mine, mine[1:]))


def test_paired_draw_ratio_is_the_ratio_of_sums_with_an_interval_that_keeps_the_pairs():
    from dinox.eval.runner import paired_draw_ratio

    ratio, ci = paired_draw_ratio([30.0, 40.0], [10.0, 10.0])
    assert ratio == 3.5
    # two draws: a resample holds draw 1 twice (3.0), draw 2 twice (4.0) or both (3.5)
    assert 3.0 <= ci[0] <= 3.5 <= ci[1] <= 4.0
    # pairing: where the trained hits move with the untrained ones the ratio is constant,
    # so every resample reads it exactly (unpaired resampling would not)
    ratio, ci = paired_draw_ratio([12.0, 30.0, 21.0, 9.0], [4.0, 10.0, 7.0, 3.0])
    assert ratio == pytest.approx(3.0) and ci == pytest.approx([3.0, 3.0])
    assert paired_draw_ratio([5.0], [2.0]) == (2.5, None)


@pytest.mark.parametrize("num, den", [([1.0, 2.0], [1.0]), ([], []), ([1.0, 2.0], [0.0, 0.0])])
def test_paired_draw_ratio_refuses_what_it_cannot_pair(num, den):
    from dinox.eval.runner import paired_draw_ratio

    with pytest.raises(ValueError):
        paired_draw_ratio(num, den)


def test_against_untrained_pairs_the_draws_and_reports_the_untrained_figures():
    from dinox.eval.runner import against_untrained

    trained = {"ratio": 35.0, "top1": 35 / 480, "mean_rank": 40.0,
               "draws": [{"ratio": 30.0}, {"ratio": 40.0}]}
    untrained = {"ratio": 10.0, "top1": 10 / 480, "mean_rank": 150.0,
                 "draws": [{"ratio": 10.0}, {"ratio": 10.0}]}
    out = against_untrained(trained, untrained)
    assert out["x_untrained"] == 3.5 and 3.0 <= out["x_untrained_ci95"][0] <= 3.5 <= out["x_untrained_ci95"][1]
    assert out["untrained"] == {"ratio": 10.0, "top1": 10 / 480, "mean_rank": 150.0, "draws": [10.0, 10.0]}
    # one draw (no "draws" list): the point figure, no interval
    one = against_untrained({"ratio": 12.0, "top1": 0.1, "mean_rank": 1.0}, {"ratio": 4.0, "top1": 0.0, "mean_rank": 9.0})
    assert one["x_untrained"] == 3.0 and one["x_untrained_ci95"] is None
    # an untrained network that finds nothing leaves the multiple undefined, not infinite
    none = against_untrained(trained, {**untrained, "ratio": 0.0, "draws": [{"ratio": 0.0}, {"ratio": 0.0}]})
    assert none["x_untrained"] is None and none["x_untrained_ci95"] is None


def test_the_multiple_of_the_untrained_network_keeps_its_unbounded_resamples():
    """A resample of draws where the untrained network found nothing is an unbounded ratio:
    left out, it cut the interval's top (10.5x read [3.58, 11.25] with a third of the
    resamples unbounded)."""
    from dinox.eval.runner import paired_draw_ratio
    ratio, ci = paired_draw_ratio([10.0, 12.0, 9.0, 11.0], [0.0, 0.0, 0.0, 4.0])
    assert ratio == 10.5 and ci[0] < 10.5 and ci[1] is None
    ratio, ci = paired_draw_ratio([30.0] * 4, [6.0] * 4)
    assert ci == [5.0, 5.0]
