"""iBOT masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online
Tokenizer"), wired as in DINOv2 / DINOv3.

The student sees its global views with a fraction of the patch tokens replaced by a learned
mask token; at every masked position it predicts, through its iBOT head, the teacher's
distribution for the same patch of the unmasked view:

    L_iBOT = -1/G sum_{images g} 1/m_g sum_{masked patches j of g} sum_k t_gj,k log softmax(s_gj / tau_s)_k

with G the number of global-view images in the batch (masked or not) and m_g the number of
masked patches of image g, so every masked image weighs the same whatever its mask size.
The teacher targets t are centred and sharpened like the class-token targets (their own
EMA centre, or Sinkhorn-Knopp over all masked patches): `teacher_probs`, `accumulate_center`
and `apply_center_update` are those of `DINOLoss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinox.losses.dino import DINOLoss

# Rows of (rows x out_dim) logits per chunk: 2^24 elements (64 MB in fp32) at a time.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(out_dim: int) -> int:
    return max(1, CHUNK_ELEMENTS // out_dim)


class IBOTLoss(DINOLoss):
    """Cross-entropy between teacher and student patch distributions at masked positions."""

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor,  # type: ignore[override]
                masks: torch.Tensor) -> torch.Tensor:
        """student_logits, teacher_probs: (M, K) for the M masked patches in the row-major
        order of `masks` (G, N) bool; returns the loss above (0 when nothing is masked)."""
        if student_logits.shape != teacher_probs.shape or student_logits.shape[0] != int(masks.sum()):
            raise ValueError(f"need (M, K) student logits and teacher targets for the M = {int(masks.sum())} "
                             f"masked patches, got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
        return self.from_rows(self.row_cross_entropy(student_logits, teacher_probs), masks)

    def row_cross_entropy(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """-sum_k t_k log softmax(s / tau_s)_k per row: (M,)."""
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            return -(teacher_probs.detach().float() * log_p).sum(dim=-1)

    def from_rows(self, per_patch: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The loss from the per-patch cross-entropies in the row-major order of `masks`."""
        if per_patch.shape[0] != int(masks.sum()):
            raise ValueError(f"need one value per masked patch ({int(masks.sum())}), got {per_patch.shape[0]}")
        with torch.autocast(device_type=per_patch.device.type, enabled=False):
            per_image = masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
            weights = (1.0 / per_image).expand_as(masks)[masks]
            return (per_patch.float() * weights).sum() / masks.shape[0]

    @torch.no_grad()
    def chunked_targets(self, head, tokens: torch.Tensor, teacher_temp: float, autocast) -> torch.Tensor:
        """Teacher targets softmax((logits - centre) / tau_t) for the masked patch `tokens`,
        `chunk_rows` at a time through the teacher's iBOT `head`, each chunk's logits also
        added to the step's pending centre update: only the (M, K) fp32 targets stay."""
        step = chunk_rows(self.out_dim)
        out = torch.empty(tokens.shape[0], self.out_dim, device=tokens.device)
        for i in range(0, tokens.shape[0], step):
            with autocast():
                logits = head(tokens[i:i + step])
            logits = logits.float()
            self.accumulate_center(logits)
            out[i:i + step] = self.teacher_probs(logits, teacher_temp)
        if tokens.shape[0] == 0:
            self.accumulate_center(out)
        return out
