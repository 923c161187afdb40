"""Backbone + DINO head as one module, so DDP sees a single forward per micro-batch."""
from __future__ import annotations

import torch
from torch import nn

from dinox.model.head import DINOHead
from dinox.model.vit import VisionTransformer


class DINOModel(nn.Module):
    """Runs the global views (and the local views, if any) through backbone and head.

    Views of one size are concatenated along the batch and go through in one pass.
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None) -> dict:
        out = self.backbone(global_views)
        result = {
            "cls": out["cls"],
            "patches": out["patches"],
            "logits": self.head(out["cls"]),
        }
        if local_views is not None:
            local = self.backbone(local_views)
            result["local_logits"] = self.head(local["cls"])
        return result


def build_dino_model(model, *, img_size: int, grad_checkpoint: bool = False,
                     drop_path: float | None = None) -> DINOModel:
    """Backbone + head from the run's model section (`dinox.config.ModelConfig`: its
    `arch()` and head fields), on the current default device (`with torch.device("meta")`
    to plan). `drop_path` overrides the section's rate (the teacher uses 0)."""
    backbone = VisionTransformer(
        model.arch(),
        img_size=img_size,
        drop_path_rate=model.drop_path if drop_path is None else drop_path,
        grad_checkpoint=grad_checkpoint,
    )
    head = DINOHead(
        model.vit_dim,
        model.out_dim,
        hidden_dim=model.head_hidden,
        bottleneck_dim=model.head_bottleneck,
        nlayers=model.head_layers,
        use_bn=model.head_bn,
    )
    return DINOModel(backbone, head)
