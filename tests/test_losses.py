"""DINO, Sinkhorn, KoLeo and Gram losses against float64 loop references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinox.errors import UserError
from dinox.losses.dino import DINOLoss, entropy, prototypes_in_use, sinkhorn_knopp
from dinox.losses.gram import gram_anchoring_loss, validate_gram_weight
from dinox.losses.koleo import KoLeoLoss
from dinox.model.head import DINOHead
from dinox.model.vit import resample_token_grid


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ref_softmax(row, temp):
    m = max(row)
    e = [math.exp((v - m) / temp) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_log_softmax(row, temp):
    m = max(v / temp for v in row)
    lse = m + math.log(sum(math.exp(v / temp - m) for v in row))
    return [v / temp - lse for v in row]


def ref_dino_loss(student, teacher, student_temp, local_weight=1.0):
    """student: V lists of B rows; teacher: G lists of B probability rows; a pair whose
    student view is a local one (i >= G) counts local_weight."""
    total, pairs = 0.0, 0.0
    for i, s_view in enumerate(student):
        for j, t_view in enumerate(teacher):
            if i == j:
                continue
            w = local_weight if i >= len(teacher) else 1.0
            for s_row, t_row in zip(s_view, t_view):
                logp = ref_log_softmax(s_row, student_temp)
                total += -w * sum(t * lp for t, lp in zip(t_row, logp)) / len(s_view)
            pairs += w
    return total / pairs


def random_views(n_views, batch=3, k=7, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, k, generator=g) * scale for _ in range(n_views)]


# ---------------------------------------------------------------- DINO


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_loss_cross_view_pairs(n_local):
    loss_fn = DINOLoss(out_dim=7, student_temp=0.1)
    student = random_views(2 + n_local, seed=1)
    teacher_logits = random_views(2, seed=2)
    loss_fn.center.copy_(torch.randn(1, 7) * 0.1)
    teacher = [loss_fn.teacher_probs(t, teacher_temp=0.04) for t in teacher_logits]
    c = loss_fn.center[0].tolist()
    ref_teacher = [[ref_softmax([v - cc for v, cc in zip(row, c)], 0.04) for row in t.tolist()]
                   for t in teacher_logits]
    for got, want in zip(teacher, ref_teacher):
        np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-5, atol=1e-7)
    loss = loss_fn(student, teacher)
    expected = ref_dino_loss([s.tolist() for s in student], ref_teacher, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("local_weight", [0.5, 0.0, 2.0])
def test_dino_local_pairs_are_weighted(local_weight):
    """DINOv3's reweight_dino_local_loss, as a weighted mean over the pairs: 2 global views
    give 2 global pairs, 3 locals 6 local pairs, each local pair counting local_weight."""
    loss_fn = DINOLoss(out_dim=7, student_temp=0.1)
    student = random_views(5, seed=3)
    teacher = [torch.softmax(t / 0.04, dim=-1) for t in random_views(2, seed=4)]
    loss = loss_fn(student, teacher, local_weight=local_weight)
    expected = ref_dino_loss([s.tolist() for s in student], [t.tolist() for t in teacher], 0.1,
                             local_weight=local_weight)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if local_weight != 1.0:
        assert loss.item() != pytest.approx(loss_fn(student, teacher).item(), rel=1e-3)
    with pytest.raises(ValueError, match="weighted 0"):
        loss_fn(student[:1] + student[2:], teacher[:1], local_weight=0.0)


def test_dino_loss_gradient_reaches_only_the_student():
    """dL/ds_i[b] = sum over teachers j paired with i of (p_i[b] - t_j[b]) / (tau_s P B)."""
    torch.manual_seed(0)
    student_head = DINOHead(6, 9, hidden_dim=8, bottleneck_dim=4)
    teacher_head = DINOHead(6, 9, hidden_dim=8, bottleneck_dim=4)
    loss_fn = DINOLoss(out_dim=9, student_temp=0.1)
    x = [torch.randn(4, 6) for _ in range(4)]
    s_logits = [student_head(v) for v in x]
    for s in s_logits:
        s.retain_grad()
    t_logits = [teacher_head(v) for v in x[:2]]
    teacher = [loss_fn.teacher_probs(t, 0.05) for t in t_logits]
    assert not any(t.requires_grad for t in teacher)
    loss_fn(s_logits, teacher).backward()
    assert all(p.grad is None for p in teacher_head.parameters())
    assert student_head.mlp[0].weight.grad is not None
    n_pairs, batch = 4 * 2 - 2, 4
    for i, s in enumerate(s_logits):
        p = torch.softmax(s.detach().double() / 0.1, dim=-1)
        expected = sum(p - teacher[j].double() for j in range(2) if j != i) / (0.1 * n_pairs * batch)
        torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_dino_loss_detaches_teacher_inputs():
    loss_fn = DINOLoss(out_dim=5)
    teacher = [torch.softmax(torch.randn(2, 5), -1).requires_grad_() for _ in range(2)]
    student = [torch.randn(2, 5, requires_grad=True) for _ in range(3)]
    loss_fn(student, teacher).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)


def test_center_ema():
    loss_fn = DINOLoss(out_dim=4, center_momentum=0.9)
    batches = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    center = [0.0] * 4
    for b in batches:
        loss_fn.update_center(b)
        rows = b.tolist()
        mean = [sum(r[k] for r in rows) / len(rows) for k in range(4)]
        center = [0.9 * c + 0.1 * m for c, m in zip(center, mean)]
    np.testing.assert_allclose(loss_fn.center[0].numpy(), center, rtol=1e-6, atol=1e-7)
    assert "center" in loss_fn.state_dict()


def ref_sinkhorn(logits, temp, iters=3):
    q = np.exp(np.asarray(logits, dtype=np.float64) / temp).T  # K x N
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for c in range(n):
            q[:, c] = q[:, c] / q[:, c].sum() / n
    return (q * n).T


def test_sinkhorn_matches_reference_and_balances_prototypes():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 5, generator=g) + torch.tensor([2.0, 0, 0, 0, -1.0])
    probs = sinkhorn_knopp(logits, 0.5)
    np.testing.assert_allclose(probs.numpy(), ref_sinkhorn(logits.numpy(), 0.5),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(12))
    balanced = probs.sum(dim=0) / 12
    plain = torch.softmax(logits / 0.5, dim=-1).sum(dim=0) / 12
    assert (balanced - 0.2).abs().max() < 0.1 * (plain - 0.2).abs().max()
    via_loss = DINOLoss(out_dim=5).teacher_probs(logits.reshape(2, 6, 5), 0.5, "sinkhorn")
    torch.testing.assert_close(via_loss.reshape(12, 5), probs)


def test_sinkhorn_is_stable_at_low_temperature():
    logits = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0], [0.9, 0.8, -1.0]]) * 3
    probs = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))


def test_teacher_probs_rejects_bad_arguments():
    loss_fn = DINOLoss(out_dim=3)
    with pytest.raises(UserError, match="centering.*sinkhorn"):
        loss_fn.teacher_probs(torch.randn(2, 3), 0.04, method="softmax")
    with pytest.raises(UserError, match="--teacher-temp must be positive"):
        loss_fn.teacher_probs(torch.randn(2, 3), 0.0)


def test_entropy():
    k = 16
    assert entropy(torch.full((3, k), 1 / k)).item() == pytest.approx(math.log(k), rel=1e-6)
    assert entropy(torch.eye(k)).item() == 0.0
    probs = torch.softmax(torch.randn(4, k, dtype=torch.float64), -1)
    ref = sum(-sum(p * math.log(p) for p in row) for row in probs.tolist()) / 4
    assert entropy(probs).item() == pytest.approx(ref, rel=1e-6)
    s = torch.randn(4, k)
    torch.testing.assert_close(DINOLoss(k, student_temp=0.2).student_probs(s),
                               torch.softmax(s / 0.2, -1))


def test_prototypes_in_use_counts_what_the_batch_targets_spread_over():
    k = 16
    every_sample_on_one = torch.zeros(2, 5, k)
    every_sample_on_one[..., 3] = 1.0
    assert prototypes_in_use(every_sample_on_one).item() == pytest.approx(1.0)
    assert prototypes_in_use(torch.eye(k)).item() == pytest.approx(k)        # one each, all used
    assert prototypes_in_use(torch.full((3, k), 1 / k)).item() == pytest.approx(k)   # soft, balanced
    # 3 samples on prototype 0, 1 on prototype 1: mean (3/4, 1/4), exp(H) by hand
    skewed = torch.zeros(4, k)
    skewed[:3, 0] = 1.0
    skewed[3, 1] = 1.0
    assert prototypes_in_use(skewed).item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


# ---------------------------------------------------------------- KoLeo


def ref_koleo(x, eps=1e-8):
    rows = [np.asarray(r, dtype=np.float64) for r in x]
    rows = [r / max(np.linalg.norm(r), eps) for r in rows]
    total = 0.0
    for i, a in enumerate(rows):
        d = min(np.linalg.norm(a - b) for j, b in enumerate(rows) if j != i)
        total += -math.log(d + eps)
    return total / len(rows)


def test_koleo_matches_reference():
    x = torch.randn(9, 5, dtype=torch.float64)
    assert KoLeoLoss()(x).item() == pytest.approx(ref_koleo(x.tolist()), rel=1e-6)
    x32 = torch.randn(16, 8)
    assert KoLeoLoss()(x32).item() == pytest.approx(ref_koleo(x32.tolist()), rel=1e-5)


def test_koleo_spreads_points_and_survives_duplicates():
    x = torch.randn(6, 4)
    x[1] = x[0]
    x.requires_grad_()
    loss = KoLeoLoss()(x)
    assert loss.item() == pytest.approx(ref_koleo(x.tolist()), rel=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    spread = torch.randn(6, 4)
    assert KoLeoLoss()(spread) < loss
    assert KoLeoLoss()(torch.randn(1, 4, requires_grad=True)).item() == 0.0


# ---------------------------------------------------------------- Gram


def ref_gram_loss(student, teacher, remove_negative=False):
    total = 0.0
    for s_img, t_img in zip(student, teacher):
        s = [np.asarray(r) / np.linalg.norm(r) for r in s_img]
        t = [np.asarray(r) / np.linalg.norm(r) for r in t_img]
        n = len(s)
        sq = 0.0
        for a in range(n):
            for b in range(n):
                gs, gt = float(s[a] @ s[b]), float(t[a] @ t[b])
                if remove_negative:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                sq += (gs - gt) ** 2
        total += sq / (n * n)
    return total / len(student)


@pytest.mark.parametrize("remove_negative", [False, True])
def test_gram_matches_reference(remove_negative):
    student = torch.randn(3, 10, 6, dtype=torch.float64)
    teacher = torch.randn(3, 10, 12, dtype=torch.float64)
    loss = gram_anchoring_loss(student, teacher, remove_negative=remove_negative)
    expected = ref_gram_loss(student.tolist(), teacher.tolist(), remove_negative)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gram_gradient_reaches_only_the_student():
    torch.manual_seed(0)
    student_proj = torch.nn.Linear(5, 8)
    teacher_proj = torch.nn.Linear(5, 8)
    x = torch.randn(2, 7, 5)
    loss = gram_anchoring_loss(student_proj(x), teacher_proj(x))
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher_proj.parameters())
    assert student_proj.weight.grad is not None and student_proj.weight.grad.abs().sum() > 0
    same = gram_anchoring_loss(teacher_proj(x), teacher_proj(x) * 3.0)
    assert same.item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="same \\(B, N\\)"):
        gram_anchoring_loss(torch.randn(2, 7, 4), torch.randn(2, 6, 4))


def test_high_resolution_gram_grid_is_resized_bicubically():
    """The Gram teacher's enlarged feature map comes back with `resample_token_grid`. A 4x4
    map of two row blocks [a, a, b, b] (constant along the columns) -> 2x2: bicubic (Keys,
    A = -0.75) at half-pixel centres weighs the taps -0.09375, 0.59375, 0.59375, -0.09375
    (the border tap repeats the edge), so a row of the result is 1.09375 a - 0.09375 b and
    the other 1.09375 b - 0.09375 a, in every channel and every image of the batch."""
    a, b = 1.0, 3.0
    rows = torch.tensor([a, a, b, b], dtype=torch.float64)
    maps = torch.stack([rows[:, None].expand(4, 4), 2 * rows[:, None].expand(4, 4)])   # two channels
    patches = maps.reshape(2, 16).T[None].repeat(3, 1, 1)                              # (3, 16, 2)
    out = resample_token_grid(patches, (4, 4), (2, 2))
    assert out.shape == (3, 4, 2) and out.dtype == patches.dtype
    top, bottom = 1.09375 * a - 0.09375 * b, 1.09375 * b - 0.09375 * a
    expected = torch.tensor([top, top, bottom, bottom], dtype=torch.float64)
    for image in out:
        assert torch.allclose(image[:, 0], expected, atol=1e-6)
        assert torch.allclose(image[:, 1], 2 * expected, atol=1e-6)
    same = torch.randn(2, 9, 5)
    assert torch.allclose(resample_token_grid(same, (3, 3), (3, 3)), same, atol=1e-6)
    with pytest.raises(ValueError, match="3x3 grid"):
        resample_token_grid(torch.randn(1, 12, 3), (3, 3), (2, 2))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan")])
def test_gram_weight_cannot_be_disabled(bad):
    with pytest.raises(UserError) as err:
        validate_gram_weight(bad)
    message = str(err.value)
    assert "cannot be disabled" in message and "lung tissue" in message
    assert "positive --gram-weight" in message and "\n" not in message
    validate_gram_weight(0.5)


def test_centre_moves_once_per_step_whatever_the_accumulation():
    """Accumulation 4 x batch 64 and accumulation 1 x batch 256 give the same centre: the
    centre moves once per optimizer step from the mean over all the step's micro-batches."""
    from dinox.losses.dino import DINOLoss

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(256, 32, generator=g) for _ in range(3)]
    accumulated, whole = DINOLoss(32, center_momentum=0.9), DINOLoss(32, center_momentum=0.9)
    for logits in steps:
        for chunk in logits.chunk(4):
            accumulated.accumulate_center(chunk)
        accumulated.apply_center_update()
        whole.update_center(logits)
    assert torch.allclose(accumulated.center, whole.center, atol=1e-6)
    per_micro_batch = DINOLoss(32, center_momentum=0.9)  # the old behaviour: 4 updates a step
    for logits in steps:
        for chunk in logits.chunk(4):
            per_micro_batch.update_center(chunk)
    assert not torch.allclose(per_micro_batch.center, whole.center, atol=1e-3)
