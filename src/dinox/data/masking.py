"""Block masks of patch tokens for iBOT (Zhou et al. 2022; DINOv2, Oquab et al. 2024).

Per batch of G global-view images with N = gh x gw patches each:

- a fraction `sample_probability` of the images (int(G * p), at least one when p > 0) is
  masked, the others are not;
- the masked images get mask ratios spread over `ratio_range`: with edges
  r_0 < ... < r_m linearly spaced over the range, image i draws its ratio uniformly in
  [r_i, r_(i+1)], so one batch covers the whole range (as DINOv2's collate does);
- an image's mask is grown from random rectangles (area >= `min_patches` patches, aspect
  ratio log-uniform in [0.3, 1/0.3], at most half the grid per rectangle) until it holds
  round(N * ratio) patches or no rectangle adds any;
- the order of the images is shuffled.

Everything is drawn from the given CPU `torch.Generator`, so masks are deterministic and
follow the run's augmentation generator through a checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskingConfig:
    ratio_range: tuple[float, float] = (0.1, 0.5)
    sample_probability: float = 0.5
    min_patches: int = 4
    min_aspect: float = 0.3
    attempts: int = 10

    def validate(self) -> None:
        lo, hi = self.ratio_range
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"mask ratio range must satisfy 0 <= lo <= hi < 1, got {self.ratio_range}")
        if not 0.0 <= self.sample_probability <= 1.0:
            raise ValueError(f"masked-sample probability must lie in [0, 1], got {self.sample_probability}")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def block_mask(gh: int, gw: int, n_masked: int, g: torch.Generator, cfg: MaskingConfig = MaskingConfig()
               ) -> torch.Tensor:
    """(gh, gw) bool mask with about `n_masked` patches in rectangular blocks."""
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    max_block = max(1, (gh * gw) // 2)
    log_aspect = (math.log(cfg.min_aspect), math.log(1.0 / cfg.min_aspect))
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_block)
        added = 0
        for _ in range(cfg.attempts):
            area = _uniform(g, min(cfg.min_patches, budget), budget)
            aspect = math.exp(_uniform(g, *log_aspect))
            h = max(1, int(round(math.sqrt(area * aspect))))
            w = max(1, int(round(math.sqrt(area / aspect))))
            if h > gh or w > gw:
                continue
            top, left = _randint(g, 0, gh - h), _randint(g, 0, gw - w)
            block = mask[top:top + h, left:left + w]
            new = int((~block).sum())
            if 0 < new <= budget:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def batch_masks(n_images: int, gh: int, gw: int, g: torch.Generator, cfg: MaskingConfig = MaskingConfig()
                ) -> torch.Tensor:
    """(n_images, gh * gw) bool masks for one batch of global views (see module doc)."""
    cfg.validate()
    n = gh * gw
    n_masked_images = int(n_images * cfg.sample_probability)
    if cfg.sample_probability > 0 and n_images > 0:
        n_masked_images = max(1, n_masked_images)
    lo, hi = cfg.ratio_range
    edges = torch.linspace(lo, hi, n_masked_images + 1).tolist()
    masks = []
    for i in range(n_masked_images):
        target = max(2, int(round(n * _uniform(g, edges[i], edges[i + 1]))))
        masks.append(block_mask(gh, gw, min(target, n - 1), g, cfg).flatten())
    if masks and int(sum(m.sum() for m in masks)) < 2:
        masks[0][:2] = True  # the iBOT head (with batch norm) needs two masked patches a batch
    masks += [torch.zeros(n, dtype=torch.bool)] * (n_images - n_masked_images)
    order = torch.randperm(n_images, generator=g)
    return torch.stack(masks)[order] if masks else torch.zeros(0, n, dtype=torch.bool)
