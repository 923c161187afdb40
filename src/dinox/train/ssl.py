"""The self-supervised method of one micro-batch: student, EMA teacher, Gram teacher, losses.

    total = L_DINO + w_koleo * L_KoLeo + w_gram * L_Gram

- L_DINO (Caron et al. 2021): the student's views (global and local) predict the teacher's
  centred, sharpened distribution of the other global views (`dinox.losses.dino`).
- L_KoLeo (Sablayrolles et al. 2019; DINOv2): spreads the student's class tokens of each
  global view over the sphere (`dinox.losses.koleo`).
- L_Gram (DINOv3, Simeoni et al. 2025): keeps the student's patch-similarity (Gram) matrix
  of the global views close to that of the Gram teacher, a frozen snapshot of the EMA
  teacher refreshed every `gram_refresh_every` steps (`dinox.losses.gram`). Always on.

The teacher is an exponential moving average of the student (`update_teacher`); it never
receives gradients. Nothing here knows about processes, checkpoints or logging: the loop
wraps `student_call` for DDP and owns the cadence.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dinox.config import RunConfig
from dinox.data.augment import Views
from dinox.eval.rank import normalized_std
from dinox.losses.dino import DINOLoss, entropy
from dinox.losses.gram import gram_anchoring_loss
from dinox.losses.koleo import KoLeoLoss
from dinox.model.dino_model import DINOModel, build_dino_model

# The per-micro-batch figures `forward_backward` returns, in this order.
METRIC_NAMES = ("loss", "loss_dino", "loss_koleo", "loss_gram", "Entropy_Teacher", "Entropy_Student",
                "embedding_std")


class DINOSSL:
    """Owns the three networks and the losses of a DINOv3-style run."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        model, views, ssl = cfg.model, cfg.views, cfg.ssl
        self.ssl = ssl
        grad_ckpt = cfg.runtime.grad_checkpoint
        self.student: DINOModel = build_dino_model(model, img_size=views.img_size, grad_checkpoint=grad_ckpt)
        self.teacher: DINOModel = build_dino_model(model, img_size=views.img_size, grad_checkpoint=grad_ckpt,
                                                   drop_path=0.0)
        self.student.to(device)
        self.teacher.to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.gram_teacher: nn.Module = copy.deepcopy(self.teacher.backbone)
        for module in (self.teacher, self.gram_teacher):
            module.requires_grad_(False)
            module.eval()
        self.gram_snapshot_step = 0
        self.dino_loss = DINOLoss(model.out_dim, student_temp=ssl.student_temp,
                                  center_momentum=ssl.center_momentum).to(device)
        self.koleo = KoLeoLoss()
        self.student_call: nn.Module = self.student  # the loop replaces it by its DDP wrapper

    def forward_backward(self, views: Views, sched: dict[str, float], *, autocast, backward) -> dict:
        """Losses of one micro-batch; calls `backward(loss)` and returns detached 0-d metric
        tensors named as METRIC_NAMES (no host synchronisation: the caller checks finiteness
        once per step). The step's teacher logits are added to the pending centre update."""
        ssl = self.ssl
        n_global = len(views.global_views)
        global_batch = torch.cat(views.global_views)
        local_batch = torch.cat(views.local_views) if views.local_views else None

        with torch.no_grad(), autocast():
            teacher_out = self.teacher(global_batch)
            gram_patches = self.gram_teacher(global_batch)["patches"]
        teacher_logits = teacher_out["logits"].float()
        teacher_probs = self.dino_loss.teacher_probs(teacher_logits, sched["teacher_temp"], method=ssl.centering)

        with autocast():
            student_out = self.student_call(global_batch, local_batch)
        student_logits = list(student_out["logits"].float().chunk(n_global))
        if local_batch is not None:
            student_logits += list(student_out["local_logits"].float().chunk(len(views.local_views)))
        loss_dino = self.dino_loss(student_logits, list(teacher_probs.chunk(n_global)))
        student_cls = student_out["cls"].float().chunk(n_global)
        loss_koleo = sum(self.koleo(c) for c in student_cls) / n_global
        loss_gram = gram_anchoring_loss(student_out["patches"].float(), gram_patches.float())
        loss = loss_dino + ssl.koleo_weight * loss_koleo + ssl.gram_weight * loss_gram
        backward(loss)
        if ssl.centering == "centering":
            self.dino_loss.accumulate_center(teacher_logits)

        with torch.no_grad():
            values = (loss, loss_dino, loss_koleo, loss_gram, entropy(teacher_probs),
                      entropy(self.dino_loss.student_probs(student_logits[0])),
                      normalized_std(teacher_out["cls"].float()))
        return {name: v.detach() for name, v in zip(METRIC_NAMES, values)}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student (Caron et al. 2021, eq. 2)."""
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    def finish_step(self, momentum: float) -> None:
        """After the optimizer step: the teacher EMA and the step's centre update."""
        self.update_teacher(momentum)
        self.dino_loss.apply_center_update()

    def abandon_step(self) -> None:
        """A step that is not applied (non-finite) leaves no trace in the centre."""
        self.dino_loss.discard_center_update()

    def maybe_refresh_gram_teacher(self, step: int) -> None:
        """Gram teacher = frozen snapshot of the EMA teacher, refreshed every K steps (DINOv3)."""
        if step - self.gram_snapshot_step >= self.ssl.gram_refresh_every:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self.gram_snapshot_step = step

    def parameter_counts(self) -> tuple[int, int]:
        """(backbone, head) parameters of the student."""
        return (sum(p.numel() for p in self.student.backbone.parameters()),
                sum(p.numel() for p in self.student.head.parameters()))
