"""Backbone + DINO head as one module, so DDP sees a single forward per micro-batch."""
from __future__ import annotations

import torch
from torch import nn

from dinox.model.head import DINOHead
from dinox.model.vit import ViTArch, VisionTransformer


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


def arch_from_config(cfg) -> ViTArch:
    return ViTArch(
        patch_size=cfg.vit_patch,
        embed_dim=cfg.vit_dim,
        depth=cfg.vit_depth,
        num_heads=cfg.vit_heads,
        mlp_hidden_dim=cfg.vit_mlp,
        swiglu=cfg.swiglu,
        num_registers=cfg.registers,
        layerscale_init=cfg.layerscale if cfg.layerscale > 0 else None,
    )


def build_dino_model(cfg, drop_path: float | None = None) -> DINOModel:
    """Build on the current default device (use `with torch.device("meta")` to plan)."""
    backbone = VisionTransformer(
        arch_from_config(cfg),
        img_size=cfg.img_size,
        drop_path_rate=cfg.drop_path if drop_path is None else drop_path,
        grad_checkpoint=cfg.grad_checkpoint,
    )
    head = DINOHead(
        cfg.vit_dim,
        cfg.out_dim,
        hidden_dim=cfg.head_hidden,
        bottleneck_dim=cfg.head_bottleneck,
        nlayers=cfg.head_layers,
        use_bn=getattr(cfg, "head_bn", False),
    )
    return DINOModel(backbone, head)
