"""The self-supervised method of one micro-batch: student, EMA teacher, Gram teacher, losses.

    total = L_DINO + w_koleo * L_KoLeo + w_ibot * L_iBOT + w_dense * L_dense + w_gram(t) * L_Gram

- L_DINO (Caron et al. 2021): the student's views (global and local) predict the teacher's
  centred, sharpened distribution of the other global views (`dinox.losses.dino`).
- L_KoLeo (Sablayrolles et al. 2019; DINOv2): spreads the student's class tokens of each
  global view over the sphere, summed over the global views as in DINOv2
  (`dinox.losses.koleo`).
- L_iBOT (Zhou et al. 2022; DINOv2): at block-masked patch positions of the student's
  global views, the student's iBOT head predicts the teacher's (unmasked) patch
  distribution (`dinox.losses.ibot`, masks from `dinox.data.masking`). The masked student
  views also feed the DINO, KoLeo and Gram terms, as in the official recipe.
- L_dense (off unless `dense_weight` > 0): every student patch token of one global view
  picks out the teacher's token at the same anatomical point of the other view among those
  of the whole batch (InfoNCE over geometric correspondences; `dinox.losses.dense`, the
  points from `dinox.data.augment.token_correspondence`). At `dense_teacher_scale` > 1 the
  keys are sampled from the teacher's tokens of the views enlarged, a finer map.
- L_Gram (DINOv3, Simeoni et al. 2025): keeps the student's patch-similarity (Gram) matrix
  of the global views close to that of the Gram teacher (`dinox.losses.gram`). Always on.
  The Gram teacher follows the EMA teacher step by step until `gram_start_step`, while the
  weight ramps linearly in; from then on it is a frozen snapshot of the EMA teacher,
  refreshed every `gram_refresh_every` steps. `gram_start_step` = 0 anchors from step 0
  to snapshots only; `gram_refresh_every` = 1 keeps the Gram teacher equal to the EMA
  teacher throughout (the tiny recipe), so its forward is never run. At `gram_teacher_scale` > 1 the Gram teacher sees the global views
  enlarged and its patch grid is resized back to the student's (DINOv3's high-resolution
  Gram teacher).

The teacher is an exponential moving average of the student (`update_teacher`); it never
receives gradients. Under FSDP2 (`shard`) the three networks are sharded alike, so the EMA
and the Gram snapshot work on each rank's shards alone. Nothing here knows about
checkpoints or logging: the loop wraps `student_call` for DDP and owns the cadence.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from dinox.config import RunConfig
from dinox.data.augment import Views, token_correspondence
from dinox.data.masking import batch_masks
from dinox.eval.rank import normalized_std
from dinox.losses.dense import dense_correspondence_loss
from dinox.losses.dino import DINOLoss, entropy, prototypes_in_use
from dinox.losses.gram import gram_anchoring_loss
from dinox.losses.ibot import IBOTLoss, chunk_rows
from dinox.losses.koleo import KoLeoLoss
from dinox.model.dino_model import DINOModel, build_dino_model
from dinox.model.vit import resample_token_grid
from dinox.run.distributed import fully_shard_units, local

log = logging.getLogger("dinox.train")

# The per-micro-batch figures `forward_backward` returns, in this order.
METRIC_NAMES = ("loss", "loss_dino", "loss_koleo", "loss_ibot", "loss_dense", "loss_gram", "gram_weight",
                "Entropy_Teacher", "Entropy_Student", "Prototypes_Used", "embedding_std")


def enlarged_views(views: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, S, S) views resized to S * scale bicubically, as the high-resolution teachers
    (the Gram teacher's, the dense keys') see them."""
    size = views.shape[-1] * scale
    return F.interpolate(views, size=(size, size), mode="bicubic", align_corners=False)


class DINOSSL:
    """Owns the three networks and the losses of a DINOv3-style run."""

    def __init__(self, cfg: RunConfig, device: torch.device, *, initialise: bool = True):
        """`initialise`: load --init-from weights into the backbone (not when the weights
        come from a checkpoint next)."""
        model, views, ssl = cfg.model, cfg.views, cfg.ssl
        self.ssl = ssl
        grad_ckpt = cfg.runtime.grad_checkpoint
        self.student: DINOModel = build_dino_model(model, img_size=views.img_size, grad_checkpoint=grad_ckpt)
        self.init_report: dict | None = None
        if initialise and cfg.io.init_from:
            from dinox.model.weights import init_backbone_from

            self.init_report = init_backbone_from(cfg.io.init_from, self.student.backbone)
            r = self.init_report
            log.info("backbone initialised from %s (%s, %s; %d tensors; position embedding %s)", r["path"],
                     r["kind"], r["arch"], r["tensors"], r["position_embedding"])
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
        # True while the Gram teacher holds exactly the EMA teacher's current weights (a copy
        # taken since the last EMA update): its patch features are then the teacher's own.
        self.gram_is_teacher = True
        self.dino_loss = DINOLoss(model.out_dim, student_temp=ssl.student_temp,
                                  center_momentum=ssl.center_momentum).to(device)
        self.koleo = KoLeoLoss()
        self.ibot_loss = (IBOTLoss(model.out_dim, student_temp=ssl.student_temp, center_momentum=ssl.center_momentum)
                          .to(device) if self.student.has_ibot else None)
        self.masking = ssl.masking()
        self.student_call: nn.Module = self.student  # the loop replaces it by its DDP wrapper
        self.model_cfg, self.img_size, self.sharded = model, views.img_size, False

    def shard(self, param_dtype: torch.dtype | None) -> list[str]:
        """FSDP2 over the process group: every transformer block and each head is a unit,
        the rest (patch embedding, tokens, final norm) the root's, for the student, the EMA
        teacher and the Gram teacher alike. Returns the plan, for the log."""
        for net in (self.student, self.teacher):
            fully_shard_units(net, self._units(net), param_dtype=param_dtype)
        fully_shard_units(self.gram_teacher, list(self.gram_teacher.blocks), param_dtype=param_dtype)
        self.sharded = True
        units, blocks = len(self._units(self.student)), len(self.student.backbone.blocks)
        nets = (self.student, self.teacher, self.gram_teacher)
        held = sum(local(p).numel() for net in nets for p in net.parameters())
        total = sum(p.numel() for net in nets for p in net.parameters())
        trained = sum(local(p).numel() for p in self.student.parameters())
        return [f"{units} units ({blocks} blocks, {units - blocks} heads) + the root per network, student, EMA "
                f"teacher and Gram teacher sharded alike along each parameter's first dimension"
                + (f"; parameters gathered in {str(param_dtype).replace('torch.', '')}, gradients reduced in "
                   f"float32" if param_dtype else ""),
                f"rank 0 holds {held / 1e6:.2f}M of the {total / 1e6:.2f}M network parameters "
                f"({4 * held / 1e9:.2f} GB fp32) and gradients and AdamW moments for its {trained / 1e6:.2f}M "
                f"student shard ({12 * trained / 1e9:.2f} GB); a unit is whole only while it runs"]

    @staticmethod
    def _units(net: DINOModel) -> list[nn.Module]:
        return [*net.backbone.blocks, net.head] + ([net.ibot_head] if net.has_ibot else [])

    def inference_backbone(self, on_this_rank: bool) -> nn.Module | None:
        """The EMA teacher's backbone for evaluation and monitoring on one rank. Sharded, a
        whole copy is gathered (a collective: every rank calls this; the copy exists only
        where `on_this_rank`); otherwise the live module itself."""
        if not self.sharded:
            return self.teacher.backbone
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not on_this_rank:
            return None
        device = self.dino_loss.center.device
        # its initialisation must not draw from the run's RNG (drop path would shift)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            copy_ = build_dino_model(self.model_cfg, img_size=self.img_size, drop_path=0.0)
        copy_.load_state_dict(full)
        return copy_.backbone.to(device).eval().requires_grad_(False)

    def gram_weight(self, step: int) -> float:
        """The Gram weight at `step`: ramped in linearly until the first frozen snapshot."""
        start = self.ssl.gram_start_step
        return self.ssl.gram_weight * (min(1.0, (step + 1) / start) if start > 0 else 1.0)

    def draw_masks(self, n_images: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
        """iBOT masks for the student's global views (None without iBOT)."""
        if self.ibot_loss is None:
            return None
        grid = self.student.backbone.grid_size
        return batch_masks(n_images, grid, grid, generator, self.masking).to(device, non_blocking=True)

    def forward_backward(self, views: Views, sched: dict[str, float], *, autocast, backward,
                         masks: torch.Tensor | None = None, step: int = 0) -> dict:
        """Losses of one micro-batch; calls `backward(loss)` and returns detached 0-d metric
        tensors named as METRIC_NAMES (no host synchronisation: the caller checks finiteness
        once per step). The teacher logits are added to the step's pending centre updates."""
        ssl = self.ssl
        n_global = len(views.global_views)
        global_batch = torch.cat(views.global_views)
        local_batch = torch.cat(views.local_views) if views.local_views else None
        zero = global_batch.new_zeros(())

        with torch.no_grad(), autocast():
            teacher_out = self.teacher(global_batch)
            dense_keys = self._dense_keys(global_batch, teacher_out["patches"]) if ssl.dense_weight > 0 else None
            gram_patches = self._gram_targets(global_batch, teacher_out["patches"], dense_keys)
        teacher_logits = teacher_out["logits"].float()
        teacher_probs = self.dino_loss.teacher_probs(teacher_logits, sched["teacher_temp"], method=ssl.centering)
        ibot = {}
        if masks is not None:
            ibot = {"ibot_targets": self._ibot_targets(teacher_out["patches"][masks], sched, autocast),
                    "row_loss": self.ibot_loss.row_cross_entropy, "chunk_rows": chunk_rows(self.ibot_loss.out_dim)}

        with autocast():
            student_out = self.student_call(global_batch, local_batch, masks=masks, **ibot)
        student_logits = list(student_out["logits"].float().chunk(n_global))
        if local_batch is not None:
            student_logits += list(student_out["local_logits"].float().chunk(len(views.local_views)))
        loss_dino = self.dino_loss(student_logits, list(teacher_probs.chunk(n_global)),
                                   local_weight=ssl.dino_local_weight)
        loss_koleo = sum(self.koleo(c) for c in student_out["cls"].float().chunk(n_global))
        loss_ibot = zero
        if masks is not None:
            loss_ibot = self.ibot_loss.from_rows(student_out["ibot_rows"], masks)
        loss_gram = gram_anchoring_loss(student_out["patches"].float(), gram_patches.float())
        loss_dense = zero
        if ssl.dense_weight > 0:
            loss_dense = self._dense_loss(views, student_out["patches"].float(), dense_keys.float(), masks)
        gram_weight = self.gram_weight(step)
        loss = (loss_dino + ssl.koleo_weight * loss_koleo + ssl.ibot_weight * loss_ibot
                + ssl.dense_weight * loss_dense + gram_weight * loss_gram)
        backward(loss)
        if ssl.centering == "centering":
            self.dino_loss.accumulate_center(teacher_logits)

        with torch.no_grad():
            values = (loss, loss_dino, loss_koleo, loss_ibot, loss_dense, loss_gram, zero + gram_weight,
                      entropy(teacher_probs), entropy(self.dino_loss.student_probs(student_logits[0])),
                      prototypes_in_use(teacher_probs), normalized_std(teacher_out["cls"].float()))
        return {name: v.detach() for name, v in zip(METRIC_NAMES, values)}

    def _dense_keys(self, global_batch: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        """The teacher's patch tokens the dense term samples its keys from (called without
        grad, under the teacher's autocast, before the student's forward, as the memory plan
        counts it): its own at `dense_teacher_scale` 1; else its tokens of the global views
        enlarged (bicubic), a finer map in which a few-pixel structure fills more of a token."""
        scale = self.ssl.dense_teacher_scale
        if scale == 1:
            return teacher_patches
        return self.teacher(enlarged_views(global_batch, scale))["patches"]

    def _dense_loss(self, views: Views, student: torch.Tensor, teacher: torch.Tensor,
                    masks: torch.Tensor | None) -> torch.Tensor:
        """L_dense over the two global views, both directions averaged: the student's tokens
        of one view (iBOT-masked ones left out: they hold the mask token, not the image)
        against the teacher's map of the other."""
        grid = self.student.backbone.grid_size
        teacher_grid = grid * self.ssl.dense_teacher_scale
        batch = student.shape[0] // 2
        total = student.new_zeros(())
        for a, b in ((0, 1), (1, 0)):
            coords, inside = token_correspondence(views.params, a, b, grid)
            inside = inside.to(student.device)
            if masks is not None:
                inside = inside & ~masks[a * batch:(a + 1) * batch]
            total = total + dense_correspondence_loss(
                student[a * batch:(a + 1) * batch], teacher[b * batch:(b + 1) * batch],
                coords.to(student.device), inside, grid, self.ssl.dense_temp, teacher_grid)
        return total / 2

    def _gram_targets(self, global_batch: torch.Tensor, teacher_patches: torch.Tensor,
                      dense_keys: torch.Tensor | None = None) -> torch.Tensor:
        """The Gram teacher's patch features of the global views on the student's grid; at
        `gram_teacher_scale` > 1 it sees the views enlarged (bicubic) and its grid is brought
        back (DINOv3's high-resolution Gram teacher). While the Gram teacher is a copy of
        the EMA teacher's current weights (every step of the warm-up, and each refresh
        step) its features are the EMA teacher's on the same input, so its forward is
        skipped: `teacher_patches` at scale 1, and at the dense keys' scale `dense_keys`
        (the teacher's tokens of the views enlarged as much)."""
        scale = self.ssl.gram_teacher_scale
        if scale == 1:
            if self.gram_is_teacher:
                return teacher_patches
            return self.gram_teacher(global_batch)["patches"]
        if self.gram_is_teacher and dense_keys is not None and self.ssl.dense_teacher_scale == scale:
            fine = dense_keys
        else:
            fine = self.gram_teacher(enlarged_views(global_batch, scale))["patches"]
        grid = self.student.backbone.grid_size
        # DINOv3 (section 4.3) brings the enlarged feature map back bicubically, no antialias
        return resample_token_grid(fine, (grid * scale,) * 2, (grid,) * 2)

    @torch.no_grad()
    def _ibot_targets(self, tokens: torch.Tensor, sched: dict, autocast) -> torch.Tensor:
        """The teacher's iBOT targets at the masked patches: with the EMA centre in chunks
        (which also feed the centre's update), with Sinkhorn-Knopp over all of them at once."""
        if self.ssl.centering == "centering":
            return self.ibot_loss.chunked_targets(self.teacher.ibot_head, tokens, sched["teacher_temp"], autocast)
        with autocast():
            logits = self.teacher.ibot_head(tokens)
        return self.ibot_loss.teacher_probs(logits.float(), sched["teacher_temp"], method="sinkhorn")

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student (Caron et al. 2021, eq. 2)."""
        teacher = [local(p) for p in self.teacher.parameters()]
        student = [local(p.detach()) for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
        self.gram_is_teacher = False

    def _centres(self) -> list[DINOLoss]:
        return [self.dino_loss] + ([self.ibot_loss] if self.ibot_loss is not None else [])

    def finish_step(self, momentum: float) -> None:
        """After the optimizer step: the teacher EMA and the step's centre updates."""
        self.update_teacher(momentum)
        for loss in self._centres():
            loss.apply_center_update()

    def abandon_step(self) -> None:
        """A step that is not applied (non-finite) leaves no trace in the centres."""
        for loss in self._centres():
            loss.discard_center_update()

    def maybe_refresh_gram_teacher(self, step: int) -> None:
        """Before `gram_start_step` the Gram teacher is the current EMA teacher; from then on
        a frozen snapshot of it, refreshed every `gram_refresh_every` steps (DINOv3)."""
        following = step < self.ssl.gram_start_step
        due = step - self.gram_snapshot_step >= self.ssl.gram_refresh_every or step == self.ssl.gram_start_step
        if following or (due and step != self.gram_snapshot_step):
            with torch.no_grad():
                for target, source in zip([*self.gram_teacher.parameters(), *self.gram_teacher.buffers()],
                                          [*self.teacher.backbone.parameters(), *self.teacher.backbone.buffers()]):
                    local(target).copy_(local(source))
            self.gram_snapshot_step = step
            self.gram_is_teacher = True

    def freeze_backbone_grads(self) -> None:
        """Warm start: the backbone's gradients are dropped, so AdamW leaves it untouched
        (no update, no weight decay, no moments) while the new heads learn."""
        for p in self.student.backbone.parameters():
            p.grad = None

    def cancel_last_layer_grads(self) -> None:
        """The heads' prototype layers stay frozen for the first steps (DINO)."""
        self.student.head.cancel_last_layer_grads()
        if self.student.has_ibot:
            self.student.ibot_head.cancel_last_layer_grads()

    def parameter_counts(self) -> tuple[int, int]:
        """(backbone, head) parameters of the student."""
        return (sum(p.numel() for p in self.student.backbone.parameters()),
                sum(p.numel() for p in self.student.head.parameters()))
