"""DINO self-distillation loss (Caron et al. 2021) with the DINOv2 Sinkhorn option.

The student is trained to match the teacher's output distribution across views:

    L = 1/|P| sum_{(i, j) in P} 1/B sum_b H(t_j[b], s_i[b]),
    H(t, s) = -sum_k t_k log softmax(s / tau_s)_k

where t_j are teacher probabilities of global view j and s_i student logits of view i.
P holds the cross-view pairs only: every student view i against every teacher global
view j, except i == j (a global view is never its own target); local crops, which the
teacher never sees, pair with all teacher globals.

Collapse is avoided on the teacher side (Caron et al. 2021, section 3.1):
- centring + sharpening: t = softmax((g_t - c) / tau_t), with the centre c an EMA of the
  teacher's batch-mean logits, c <- m c + (1 - m) mean_b g_t[b] (the mean all-reduced over
  ranks). Centring stops one prototype dominating; the low tau_t stops the uniform
  solution that centring alone would favour.
- or Sinkhorn-Knopp (Caron et al. 2020 SwAV; Oquab et al. 2024 DINOv2): 3 alternating
  normalisations of the (K prototypes x N samples) matrix Q = exp(g_t / tau_t), rows to
  equal prototype mass 1/K, columns to one distribution per sample.

Everything runs in float32 with autocast off: softmax over 65536 prototypes at
tau = 0.04 is not something to do in bfloat16.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinox.errors import UserError
from dinox.run.distributed import all_reduce_, world_size

METHODS = ("centering", "sinkhorn")


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy in nats of the distributions along the last dim
    (ln(out_dim) for uniform outputs, 0 for one-hot); 0 log 0 = 0."""
    p = probs.detach().float()
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()


def prototypes_in_use(probs: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the mean of the distributions along the last dim: how many
    prototypes the batch's targets spread over, out_dim where they use every one evenly,
    1 where every sample falls on the same prototype. That is the collapse DINO's centring
    (or Sinkhorn-Knopp) exists to prevent, one output dimension dominating (Caron et al.
    2021, §5.3); the per-sample entropy cannot see it (near 0 for sharp healthy targets too)."""
    return torch.exp(entropy(probs.detach().float().reshape(-1, probs.shape[-1]).mean(dim=0)))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float,
                   n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2) for (N, K) logits; returns (N, K)
    rows that sum to 1, with prototype mass pushed towards uniform over the global batch
    (column sums all-reduced across ranks). Pass all teacher global views concatenated."""
    logits = teacher_logits.detach().float()
    with _no_autocast(logits.device):
        shift = all_reduce_(logits.max().clone(), "max")
        q = torch.exp((logits - shift) / teacher_temp).t()
        # rows over all ranks (iBOT masks a different number of patches on each rank)
        k = q.shape[0]
        n = all_reduce_(q.new_tensor(float(q.shape[1]))) if world_size() > 1 else q.shape[1]
        tiny = torch.finfo(q.dtype).tiny
        q /= all_reduce_(q.sum())
        for _ in range(n_iterations):
            q /= all_reduce_(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
            q /= k
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
            q /= n
        q *= n
        return q.t()


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: torch.Tensor | None = None
        self._pending_rows = 0

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float,
                      method: str = "centering") -> torch.Tensor:
        """Teacher targets for (..., out_dim) logits, same shape, no grad.
        "centering": softmax((logits - center) / teacher_temp);
        "sinkhorn": ``sinkhorn_knopp`` over all rows (pass every global view at once)."""
        if method not in METHODS:
            raise UserError(f"unknown teacher centring method {method!r}; use one of {METHODS}")
        if teacher_temp <= 0:
            raise UserError(f"--teacher-temp must be positive (got {teacher_temp})")
        logits = teacher_logits.detach().float()
        with _no_autocast(logits.device):
            if method == "sinkhorn":
                flat = logits.reshape(-1, logits.shape[-1])
                return sinkhorn_knopp(flat, teacher_temp).reshape(logits.shape)
            return F.softmax((logits - self.center) / teacher_temp, dim=-1)

    def student_probs(self, student_logits: torch.Tensor) -> torch.Tensor:
        """softmax(s / student_temp), detached: for logging the student's entropy."""
        return F.softmax(student_logits.detach().float() / self.student_temp, dim=-1)

    def forward(self, student_logits: list[torch.Tensor],
                teacher_probs: list[torch.Tensor], local_weight: float = 1.0) -> torch.Tensor:
        """student_logits: V views of (B, K), the first ones being the global views in the
        same order as teacher_probs (G views of (B, K)); returns the mean cross-view H over
        the G(G-1) global and (V-G)G local pairs, the local ones weighted by `local_weight`
        (DINOv3's reweight_dino_local_loss; 1 is DINO's plain mean over the pairs). It is a
        weighted mean, so that it stays a cross-entropy comparable with ln(K) (the entropy
        wall); DINOv3 divides by the unweighted count, i.e. the same term times a constant."""
        n_student, n_teacher = len(student_logits), len(teacher_probs)
        if n_teacher == 0 or n_student < n_teacher:
            raise ValueError(f"need the student's views to start with the {n_teacher} teacher "
                             f"global views; got {n_student} student views")
        device = student_logits[0].device
        with _no_autocast(device):
            log_p = torch.stack([F.log_softmax(s.float() / self.student_temp, dim=-1)
                                 for s in student_logits])
            targets = torch.stack([t.detach().float() for t in teacher_probs])
            batch = log_p.shape[1]
            # cross[i, j] = sum_b sum_k t_j[b, k] log_p_i[b, k]: one (V, B*K) x (B*K, G) matmul
            cross = log_p.flatten(1) @ targets.flatten(1).t()
            weight = torch.ones(n_student, n_teacher, device=device)
            weight[:n_teacher].fill_diagonal_(0.0)
            weight[n_teacher:] = local_weight
            n_global_pairs, n_local_pairs = n_teacher * (n_teacher - 1), (n_student - n_teacher) * n_teacher
            if n_global_pairs + n_local_pairs == 0:
                raise ValueError("no cross-view pairs: give at least 2 global views, or locals")
            total = n_global_pairs + local_weight * n_local_pairs
            if total <= 0:
                raise ValueError("the only cross-view pairs are local ones, weighted 0: give a local weight > 0")
            return -(cross * weight).sum() / (total * batch)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean over the (global) batch of teacher logits."""
        self.accumulate_center(teacher_logits)
        self.apply_center_update()

    @torch.no_grad()
    def accumulate_center(self, teacher_logits: torch.Tensor) -> None:
        """Add one micro-batch's teacher logits to the mean of the current optimizer step.

        The centre moves once per optimizer step (as in DINO, where a step is one batch),
        from the mean over all its micro-batches, so its time constant in steps does not
        depend on --accumulation-steps."""
        logits = teacher_logits.detach().float().reshape(-1, self.out_dim)
        total = logits.sum(dim=0, keepdim=True)
        if self._pending is None:
            self._pending, self._pending_rows = total, logits.shape[0]
        else:
            self._pending.add_(total)
            self._pending_rows += logits.shape[0]

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Move the centre towards the step's mean teacher logits (all-reduced over ranks).
        The row count travels with the sums: ranks may hold different numbers of rows (iBOT
        masks a different number of patches on each), and every rank must reach the same
        centre."""
        if self._pending is None:
            return
        packed = torch.cat([self._pending.reshape(-1), self._pending.new_tensor([float(self._pending_rows)])])
        packed = all_reduce_(packed)
        total, count = packed[:-1].reshape_as(self._pending), packed[-1]
        m = self.center_momentum
        self.center.mul_(m).add_(total / count, alpha=1 - m)
        self.discard_center_update()

    def discard_center_update(self) -> None:
        self._pending, self._pending_rows = None, 0
