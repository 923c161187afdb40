"""Backbone + DINO head as one module, so DDP sees a single forward per micro-batch."""
from __future__ import annotations

import torch
from torch import nn

from dinox.model.head import DINOHead
from dinox.model.vit import VisionTransformer


class DINOModel(nn.Module):
    """Runs the global views (and the local views, if any) through backbone and head.

    Views of one size are concatenated along the batch and go through in one pass. With an
    iBOT head, `masks` (G, N) bool replaces the masked patch embeddings of the global views
    by the learned `mask_token` (before the position embedding is added, as in DINOv2) and
    the iBOT head's logits of the masked patch tokens are returned as "ibot_logits", or, given
    the teacher's `ibot_targets` and a `row_loss`, the per-patch loss as "ibot_rows" (computed
    in chunks by the head: see `DINOHead.forward`).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        if ibot_head is not None:
            self.ibot_head = ibot_head
            self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))

    @property
    def has_ibot(self) -> bool:
        return hasattr(self, "ibot_head")

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, ibot_targets: torch.Tensor | None = None,
                row_loss=None, chunk_rows: int | None = None) -> dict:
        out = self.backbone(global_views) if masks is None else self._masked_backbone(global_views, masks)
        result = {
            "cls": out["cls"],
            "patches": out["patches"],
            "logits": self.head(out["cls"]),
        }
        if masks is not None and ibot_targets is not None:
            result["ibot_rows"] = self.ibot_head(out["patches"][masks], ibot_targets, row_loss, chunk_rows)
        elif masks is not None:
            result["ibot_logits"] = self.ibot_head(out["patches"][masks])
        if local_views is not None:
            local = self.backbone(local_views)
            result["local_logits"] = self.head(local["cls"])
        return result

    def _masked_backbone(self, x: torch.Tensor, masks: torch.Tensor) -> dict:
        """The backbone with masked patch embeddings replaced by the mask token (a forward
        hook on the patch embedding keeps the backbone's own token preparation untouched)."""
        def substitute(module, inputs, embedded):
            where = masks.view(embedded.shape[0], 1, *embedded.shape[-2:])
            return torch.where(where, self.mask_token.view(1, -1, 1, 1).to(embedded.dtype), embedded)

        handle = self.backbone.patch_embed.register_forward_hook(substitute)
        try:
            return self.backbone(x)
        finally:
            handle.remove()


def build_dino_model(model, *, img_size: int, grad_checkpoint: bool = False,
                     drop_path: float | None = None) -> DINOModel:
    """Backbone + head (+ iBOT head) from the run's model section (`dinox.config.ModelConfig`:
    its `arch()` and head fields), on the current default device (`with torch.device("meta")`
    to plan). `drop_path` overrides the section's rate (the teacher uses 0)."""
    backbone = VisionTransformer(
        model.arch(),
        img_size=img_size,
        drop_path_rate=model.drop_path if drop_path is None else drop_path,
        grad_checkpoint=grad_checkpoint,
    )
    def head() -> DINOHead:
        return DINOHead(model.vit_dim, model.out_dim, hidden_dim=model.head_hidden,
                        bottleneck_dim=model.head_bottleneck, nlayers=model.head_layers, use_bn=model.head_bn,
                        prototype_norm=model.prototype_norm)

    # A separate iBOT head, as in DINOv3 (DINOv2 can share the DINO head).
    return DINOModel(backbone, head(), head() if model.ibot_head else None)
