"""DINO projection head (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", section 3.1 and appendix).

``x -> MLP (Linear-GELU x (nlayers-1), Linear to bottleneck) -> L2-normalise ->
Linear(bottleneck, out_dim, bias=False)`` onto ``out_dim`` prototypes. The prototypes'
norms (``prototype_norm``) are where the official heads differ:

- ``fixed``: weight-normalised with the magnitude g fixed to 1 (DINO's
  ``norm_last_layer=True``): each logit is the cosine between the bottleneck feature and a
  prototype direction, in [-1, 1], and the temperatures alone set the sharpness;
- ``learned``: weight-normalised with g trained from 1 (DINOv2's head; DINO's
  ``norm_last_layer=False``): each prototype learns its own scale, so the head can sharpen
  the targets where it separates the images;
- ``free``: a plain Linear, trunc_normal(0.02) like the MLP (DINOv3's head): the same
  function class as ``learned``, with norms that start small (~0.02 sqrt(bottleneck)).

Output dimension (number of prototypes): DINO and DINOv2 use 65536 for ViT-S and larger at
batches of 1024+ (more prototypes keep helping up to this size at ImageNet scale). The
trainer fits the count to the run's global batch (``dinox.config.prototypes_for_batch``: 32
per image, 1024 to 65536): with a batch of 32 most of 65536 prototypes are never selected,
the teacher's targets stay uniform, the (256 x out_dim) last layer would outweigh a small
backbone, and the softmax over 65536 dominates CPU time. Note the DINO loss of a uniform student
starts near ln(out_dim) (9.01 for 8192, 11.09 for 65536): the "entropy wall".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.checkpoint import checkpoint

INIT_STD = 0.02
PROTOTYPE_NORMS = ("fixed", "learned", "free")


class DINOHead(nn.Module):
    """Projection head; ``last_layer`` is exposed so the trainer can drop its gradients
    while it is frozen during the first iterations (``cancel_last_layer_grads``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, use_bn: bool = False,
                 prototype_norm: str = "fixed"):
        super().__init__()
        if prototype_norm not in PROTOTYPE_NORMS:
            raise ValueError(f"prototype_norm {prototype_norm!r}: one of {PROTOTYPE_NORMS}")
        self.prototype_norm = prototype_norm
        nlayers = max(nlayers, 1)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if use_bn:
                # batch statistics always (train and eval): the teacher runs in eval mode
                # and is an EMA of parameters only, so running stats would never be updated
                layers.append(nn.BatchNorm1d(b, track_running_stats=False))
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if prototype_norm != "free":
            self.last_layer = weight_norm(self.last_layer)
            self.last_layer.parametrizations.weight.original0.requires_grad_(prototype_norm == "learned")
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc_normal(0.02) Linear weights, zero biases; weight-normalised prototypes start
        at norm g = 1."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()
        if self.prototype_norm == "free":
            nn.init.trunc_normal_(self.last_layer.weight, std=INIT_STD)
            return
        weight = self.last_layer.parametrizations.weight
        nn.init.trunc_normal_(weight.original1, std=INIT_STD)
        weight.original0.fill_(1.0)

    def cancel_last_layer_grads(self) -> None:
        """Drop the last layer's gradients (DINO freezes it for the first epoch)."""
        for p in self.last_layer.parameters():
            p.grad = None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, row_loss=None,
                chunk_rows: int | None = None) -> torch.Tensor:
        """The logits (rows, out_dim); with `targets` (rows, out_dim) and `row_loss(logits,
        targets) -> (rows,)`, that per-row loss instead, computed `chunk_rows` rows at a time
        with the logits recomputed in backward (torch.utils.checkpoint): a chunk's logits are
        the only (rows x out_dim) activations alive, where thousands of masked patches times
        65536 prototypes would otherwise hold gigabytes. Inside this module's own forward so
        that FSDP gathers its parameters once and DDP sees one use."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        if targets is None:
            return self.last_layer(x)
        step = chunk_rows or x.shape[0] or 1
        if x.shape[0] <= step:
            return row_loss(self.last_layer(x), targets)
        def chunk_loss(z, t):
            return row_loss(self.last_layer(z), t)
        return torch.cat([checkpoint(chunk_loss, x[i:i + step], targets[i:i + step], use_reentrant=False)
                          for i in range(0, x.shape[0], step)])
