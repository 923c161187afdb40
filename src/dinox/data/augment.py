"""Batched multi-view CT augmentation on the training device.

Each sample, a (3, H, W) stack of raw Hounsfield units (slices z-g, z, z+g, the neighbours
``--context-mm`` away: ``dinox.data.dataset``), becomes two
global views and ``n_local`` local views (DINO multi-crop, Caron et al. 2021; DINOv2,
Oquab et al. 2023). Per view and sample:

1. **Random resized crop** (Szegedy et al. 2015, sampled as torchvision's
   ``RandomResizedCrop``): area fraction ``s ~ U(scale)``, aspect ratio ``r`` (crop width
   over height in pixels) log-uniform in ``ratio``; up to ``crop_attempts`` candidates,
   the first that fits inside the image wins, else the whole image with its aspect
   clamped into ``ratio``. Positions are continuous (sub-pixel), not integer.
2. **Horizontal flip** with probability ``flip_p``.
3. Crop + resize + flip are one bilinear ``F.grid_sample`` over the whole batch with
   per-sample affine grids (``crop_grid``), applied to the raw HU. Resampling HU first and windowing the
   small output second is how a scanner would reconstruct at another pixel size, and it
   touches V*B*3*G*G pixels instead of V*B*3*H*W.
4. **Random HU window** (the intensity augmentation): a family (centre L, width W) is drawn
   uniformly from ``window_families`` (default lung L-600/W1500, mediastinal L50/W350,
   bone L300/W2000, broad L0/W2500), then jittered: ``c = L + W * U(-j, j)`` with
   ``j = center_jitter`` and ``w = W * exp(U(log a, log b))`` for ``width_jitter = (a, b)``.
   ``y = clamp((hu - (c - w/2)) / w, 0, 1)`` and the view is ``(y - norm_mean) / norm_std``
   (default 0.5/0.5: values in [-1, 1]). The two global views of a sample always come from
   two different families (``distinct_global_windows``), so they never share a window;
   local views draw their families independently.
5. Optional, off by default: Gaussian blur with probability ``blur_p`` and sigma
   ``~ U(blur_sigma)`` output pixels (DINO uses blur; on CT the window already changes
   contrast strongly, so it is opt-in), and additive Gaussian noise of std ``noise_std``
   in normalised units.

The user guide's finding motivates the defaults: windowing alone (intensity only) let the
model memorise positions (retrieval ratio ~1); random resized crops at scale (0.5, 1) and
flips are what made features learn.

Anti-aliasing: bilinear sampling has no low-pass filter and aliases (moire on CT noise and
fine vessels) when it shrinks by more than 2x. With ``antialias=True`` the batch is first
resized once per view group with ``F.interpolate(antialias=True)`` to the smallest size at
which the largest possible crop is shrunk at most 2x by the sampler (mip-map style); this
is skipped when the sampler would shrink by at most 2.5x anyway (e.g. 512 px -> 224 px
global views), where the extra pass costs more than the little aliasing it removes.

Determinism: every random parameter is drawn on the CPU from the given generator in a
fixed order (global windows, then per global view crop/flip/blur, the noise seed, then the
same for local views), then moved to the input's device, so a seed gives the same parameters
on every device. The global views do not depend on ``n_local``. The one exception is the per-pixel
noise field (``noise_std > 0``): it is drawn on the device from a generator seeded from the
CPU generator, so it is deterministic per device but not bitwise equal across devices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from dinox.errors import UserError

WINDOW_FAMILY_NAMES = ("lung", "mediastinal", "bone", "broad")
BILINEAR_MAX_SHRINK = 2.0
PRESCALE_TRIGGER = 2.5


@dataclass
class AugmentConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 0
    global_scale: tuple[float, float] = (0.5, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.5)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    crop_attempts: int = 10
    window_families: tuple[tuple[float, float], ...] = (
        (-600.0, 1500.0),
        (50.0, 350.0),
        (300.0, 2000.0),
        (0.0, 2500.0),
    )
    center_jitter: float = 0.15
    width_jitter: tuple[float, float] = (0.75, 1.33)
    distinct_global_windows: bool = True
    norm_mean: float = 0.5
    norm_std: float = 0.5
    antialias: bool = True
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_std: float = 0.0
    standardize: bool = False

    def __post_init__(self) -> None:
        pairs = ("global_scale", "local_scale", "ratio", "width_jitter", "blur_sigma")
        try:
            for name in pairs:
                value = tuple(float(v) for v in getattr(self, name))
                if len(value) != 2:
                    raise ValueError(name)
                setattr(self, name, value)
            self.window_families = tuple((float(c), float(w)) for c, w in self.window_families)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"augmentation: {', '.join(pairs)} must be (lo, hi) pairs and window_families "
                f"(center, width) pairs ({exc})"
            ) from None
        self.validate()

    def validate(self) -> None:
        """Raise UserError for settings that cannot produce valid views."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"augmentation: {msg}")

        need(self.global_size >= 1 and self.local_size >= 1, "view sizes must be >= 1 pixel")
        need(self.n_local >= 0, "n_local must be >= 0")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            need(0 < lo <= hi <= 1, f"{name} must be (lo, hi) with 0 < lo <= hi <= 1")
        for name in ("ratio", "width_jitter", "blur_sigma"):
            lo, hi = getattr(self, name)
            need(0 < lo <= hi, f"{name} must be (lo, hi) with 0 < lo <= hi")
        need(0 <= self.flip_p <= 1 and 0 <= self.blur_p <= 1, "probabilities must lie in [0, 1]")
        need(self.crop_attempts >= 1, "crop_attempts must be >= 1")
        need(len(self.window_families) >= 1, "give at least one HU window family")
        need(all(w > 0 for _, w in self.window_families), "HU window widths must be > 0")
        need(self.center_jitter >= 0 and self.noise_std >= 0, "jitter and noise must be >= 0")
        need(self.norm_std > 0, "norm_std must be > 0")
        fams = self.window_families
        distinct = self.distinct_global_windows and len(set(fams)) == len(fams) >= 2
        jitter_free = self.center_jitter == 0 and self.width_jitter[0] == self.width_jitter[1]
        need(distinct or not jitter_free,
             "the two global views could share one HU window; add a window family or enable jitter")


@dataclass
class Views:
    """Augmented views, float32 on the input's device, and the parameters that made them.

    ``params`` holds, per view V (globals first, then locals) and sample B, on the CPU:
    ``window_family`` (V,B) int64 index into ``window_families``, ``window_center`` and
    ``window_width`` (V,B) in HU, ``crop_box`` (V,B,4) = (x0, y0, x1, y1) in [0, 1] image
    coordinates before flipping, ``crop_scale`` (V,B) area fraction, ``crop_ratio`` (V,B)
    crop width / height in pixels, ``flip`` (V,B) bool, ``blur_sigma`` (V,B) in output
    pixels (0 = not blurred); all floats are float32.
    """

    global_views: list[torch.Tensor]
    local_views: list[torch.Tensor]
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def all_views(self) -> list[torch.Tensor]:
        return [*self.global_views, *self.local_views]


def apply_window(
    hu: torch.Tensor,
    center: torch.Tensor,
    width: torch.Tensor,
    mean: float = 0.5,
    std: float = 0.5,
) -> torch.Tensor:
    """(clamp((hu - (c - w/2)) / w, 0, 1) - mean) / std with per-sample c, w of shape (B,).

    Computed as one affine map clamped to the normalised range (two passes over memory).
    """
    center = center.to(torch.float64)
    width = width.to(torch.float64)
    scale = 1.0 / (width * std)
    shift = -((center - width / 2) / width + mean) / std
    view = (-1, *([1] * (hu.dim() - 1)))
    out = torch.addcmul(shift.to(hu).view(view), hu, scale.to(hu).view(view))
    return out.clamp_(-mean / std, (1 - mean) / std)


LUNG_WINDOW = (-600.0, 1500.0)  # (level, width) in HU: the display window of the monitor


def window_unit(hu: torch.Tensor, level: float, width: float) -> torch.Tensor:
    """HU -> [0, 1] under the window (level, width), for display."""
    return ((hu.float() - (level - width / 2)) / width).clamp(0.0, 1.0)


def fixed_window_input(hu: torch.Tensor, cfg: AugmentConfig | None = None,
                       window: tuple[float, float] = LUNG_WINDOW) -> torch.Tensor:
    """The training preprocessing of `cfg` (its normalisation, and per-image
    standardisation when it trains with it) at one fixed window instead of a random one:
    the input that shows what the model sees during training, without the randomness."""
    cfg = cfg or AugmentConfig()
    hu = hu.float()
    batch = hu.shape[0]
    center = torch.full((batch,), float(window[0]), device=hu.device)
    width = torch.full((batch,), float(window[1]), device=hu.device)
    out = apply_window(hu, center, width, cfg.norm_mean, cfg.norm_std)
    return standardize_images(out) if cfg.standardize else out


def crop_grid(boxes: torch.Tensor, flip: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Sampling grid (B, h, w, 2) for ``grid_sample`` mapping each output onto its crop box.

    Equal to ``F.affine_grid(theta, align_corners=False)`` with the per-sample affine
    theta = [[(x1 - x0) * s, 0, x0 + x1 - 1], [0, y1 - y0, y0 + y1 - 1]], s = -1 when
    flipped, else 1. Crop, resize and flip never rotate, so theta is axis-aligned and the
    grid is an outer "sum" of one x row and one y column per sample: built by broadcasting
    it costs a quarter of ``affine_grid``'s batched matmul over a (B, h, w, 3) base grid.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = boxes.unbind(-1)
    sign = 1.0 - 2.0 * flip.to(boxes)

    def axis(n: int, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        base = (torch.arange(n, dtype=boxes.dtype, device=boxes.device) * 2 + 1) / n - 1
        return (hi - lo).mul(scale).unsqueeze(-1) * base + (lo + hi - 1).unsqueeze(-1)

    gx = axis(out_w, x0, x1, sign)
    gy = axis(out_h, y0, y1, torch.ones_like(sign))
    b = boxes.shape[0]
    return torch.stack([gx.unsqueeze(1).expand(b, out_h, out_w), gy.unsqueeze(2).expand(b, out_h, out_w)], -1)


def token_correspondence(params: dict[str, torch.Tensor], a: int, b: int,
                         grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the patch-token centres of view ``a`` lie in view ``b`` of the same images.

    Returns ``(coords, inside)``: coords (B, grid, grid, 2) in view b's ``grid_sample``
    coordinates (x, y in [-1, 1] across the view, align_corners=False), inside (B, grid *
    grid) bool, True where the point falls within view b's crop. Inverts ``crop_grid``:
    a view's normalised output coordinate u maps to the image coordinate
    X = (x1 - x0) s u + (x0 + x1 - 1), so u = (X - (x0 + x1 - 1)) / ((x1 - x0) s).
    """
    boxes, flips = params["crop_box"], params["flip"]
    points = crop_grid(boxes[a], flips[a], grid)                      # image coordinates
    x0, y0, x1, y1 = (c[:, None, None] for c in boxes[b].unbind(-1))
    sign = (1.0 - 2.0 * flips[b].to(boxes))[:, None, None]
    u = (points[..., 0] - (x0 + x1 - 1)) / ((x1 - x0) * sign)
    v = (points[..., 1] - (y0 + y1 - 1)) / (y1 - y0)
    inside = ((u.abs() <= 1) & (v.abs() <= 1)).flatten(1)
    return torch.stack([u, v], -1), inside


def standardize_images(images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit std per image (over channels and pixels): removes the global
    brightness/contrast a window imposes, keeping the structure it shows."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True)
    return (images - mean) / (std + eps)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int | tuple[int, int]
) -> torch.Tensor:
    """Crop boxes (B,4) = (x0, y0, x1, y1) in [0, 1], resize to ``size``, flip where set.

    One bilinear ``grid_sample`` over the batch (align_corners=False, border padding) with
    per-sample affine grids (``crop_grid``). For a box on pixel edges that shrinks by an
    integer factor this equals slicing followed by ``F.interpolate(mode="bilinear")``.
    """
    grid = crop_grid(boxes.to(images), flip.to(images.device), size)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur_matrices(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size, size) matrices M with (M @ x) = 1-D convolution of x with each kernel row,
    reflect padding ("reflect": index -1 reads 1) folded in."""
    n, taps = kernel.shape
    radius = taps // 2
    idx = torch.arange(size, device=kernel.device).view(-1, 1) + torch.arange(-radius, radius + 1, device=kernel.device)
    idx = idx.abs()
    idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)
    mat = torch.zeros(n, size, size, dtype=kernel.dtype, device=kernel.device)
    return mat.scatter_add_(2, idx.expand(n, size, taps), kernel.unsqueeze(1).expand(n, size, taps))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma (B,) in pixels; sigma 0 leaves a sample as is.

    Only samples with sigma > 0 are touched. Each axis is a batched matmul with a per-sample
    banded matrix (reflect padding folded in): grouped convolutions with one group per
    sample and channel are several times slower on CPU, and matmuls are cheap on GPUs.
    """
    b, c, h, w = images.shape
    sigma = sigma.detach().to("cpu", torch.float64)
    chosen = torch.nonzero(sigma > 0).flatten()
    radius = min(math.ceil(3 * float(sigma.max())), h - 1, w - 1) if len(chosen) else 0
    if radius <= 0:
        return images
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma[chosen].view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images)
    rows = _blur_matrices(kernel, h).unsqueeze(1)
    cols = rows if w == h else _blur_matrices(kernel, w).unsqueeze(1)
    chosen = chosen.to(images.device)
    blurred = rows @ images.index_select(0, chosen) @ cols.transpose(-1, -2)
    return images.index_copy(0, chosen, blurred)


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _log_uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return torch.exp(_uniform(g, shape, math.log(lo), math.log(hi)))


def draw_crops(
    g: torch.Generator,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> dict[str, torch.Tensor]:
    """RandomResizedCrop geometry for ``batch`` samples, vectorised over candidates.

    With image aspect a = W/H, a crop of area fraction s and pixel aspect r has normalised
    width sqrt(s r / a) and height sqrt(s a / r); the first of ``attempts`` candidates with
    both <= 1 is kept, else the whole image with its aspect clamped into ``ratio``.
    """
    aspect = width / height
    s = _uniform(g, (batch, attempts), *scale)
    r = _log_uniform(g, (batch, attempts), *ratio)
    cw = torch.sqrt(s * r / aspect)
    ch = torch.sqrt(s * aspect / r)
    fits = (cw <= 1) & (ch <= 1)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    cw = cw.gather(1, first)[:, 0]
    ch = ch.gather(1, first)[:, 0]
    if aspect < ratio[0]:
        fallback = (1.0, aspect / ratio[0])
    elif aspect > ratio[1]:
        fallback = (ratio[1] / aspect, 1.0)
    else:
        fallback = (1.0, 1.0)
    found = fits.any(1)
    cw = torch.where(found, cw, torch.full_like(cw, fallback[0]))
    ch = torch.where(found, ch, torch.full_like(ch, fallback[1]))
    pos = torch.rand((batch, 2), generator=g, dtype=torch.float64)
    x0 = pos[:, 0] * (1 - cw)
    y0 = pos[:, 1] * (1 - ch)
    return {
        "crop_box": torch.stack([x0, y0, x0 + cw, y0 + ch], -1),
        "crop_scale": cw * ch,
        "crop_ratio": cw / ch * aspect,
    }


def draw_windows(
    g: torch.Generator, n_views: int, batch: int, cfg: AugmentConfig, distinct_pair: bool
) -> dict[str, torch.Tensor]:
    """Window family and jittered (centre, width) in HU for (n_views, batch).

    With ``distinct_pair`` view 1 takes a family different from view 0 (uniform over the
    others, so its marginal stays uniform).
    """
    families = torch.tensor(cfg.window_families, dtype=torch.float64)
    n_fam = len(families)
    idx = torch.randint(n_fam, (n_views, batch), generator=g)
    if distinct_pair and n_views >= 2 and n_fam > 1:
        shift = 1 + torch.randint(n_fam - 1, (batch,), generator=g)
        idx[1] = (idx[0] + shift) % n_fam
    base_c, base_w = families[idx, 0], families[idx, 1]
    offset = _uniform(g, (n_views, batch), -cfg.center_jitter, cfg.center_jitter)
    factor = _log_uniform(g, (n_views, batch), *cfg.width_jitter)
    return {"window_family": idx, "window_center": base_c + offset * base_w, "window_width": base_w * factor}


def _prescale_shape(h: int, w: int, size: int, scale_hi: float, ratio: tuple[float, float]) -> tuple[int, int]:
    """Per axis: keep the input size unless the largest crop would be shrunk more than
    PRESCALE_TRIGGER x by the sampler; then the size at which it is shrunk BILINEAR_MAX_SHRINK x."""
    aspect = w / h
    frac_w = min(1.0, math.sqrt(scale_hi * ratio[1] / aspect))
    frac_h = min(1.0, math.sqrt(scale_hi * aspect / ratio[0]))

    def axis(n: int, frac: float) -> int:
        if frac * n <= PRESCALE_TRIGGER * size:
            return n
        return min(n, math.ceil(BILINEAR_MAX_SHRINK * size / frac))

    return axis(h, frac_h), axis(w, frac_w)


def _empty_view_params(batch: int) -> dict[str, torch.Tensor]:
    f64 = torch.float64
    return {
        "crop_box": torch.empty(0, batch, 4, dtype=f64),
        "crop_scale": torch.empty(0, batch, dtype=f64),
        "crop_ratio": torch.empty(0, batch, dtype=f64),
        "flip": torch.empty(0, batch, dtype=torch.bool),
        "blur_sigma": torch.empty(0, batch, dtype=f64),
    }


class CTAugment:
    """Two global (+ n_local local) randomly windowed, cropped, flipped views per CT stack."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()
        self.cfg.validate()

    def draw_params(
        self, g: torch.Generator, batch: int, height: int, width: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int | None]:
        """All random parameters for the global and local view groups, on the CPU, and the
        noise fields' seed (None without noise), drawn between the two groups so that the
        global views, noise included, do not depend on the number of local views."""
        cfg = self.cfg
        groups, noise_seed = [], None
        for n_views, scale, distinct in (
            (2, cfg.global_scale, cfg.distinct_global_windows),
            (cfg.n_local, cfg.local_scale, False),
        ):
            params = draw_windows(g, n_views, batch, cfg, distinct)
            per_view: dict[str, list[torch.Tensor]] = {}
            for _ in range(n_views):
                view = draw_crops(g, batch, height, width, scale, cfg.ratio, cfg.crop_attempts)
                view["flip"] = torch.rand(batch, generator=g) < cfg.flip_p
                blurred = torch.rand(batch, generator=g) < cfg.blur_p
                view["blur_sigma"] = _uniform(g, (batch,), *cfg.blur_sigma) * blurred
                for key, val in view.items():
                    per_view.setdefault(key, []).append(val)
            for key, val in _empty_view_params(batch).items():
                params[key] = torch.stack(per_view[key]) if n_views else val
            groups.append(params)
            if len(groups) == 1 and cfg.noise_std > 0:
                noise_seed = int(torch.randint(2**62, (1,), generator=g))
        return groups[0], groups[1], noise_seed

    def __call__(self, stacks: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        if stacks.dim() != 4:
            raise ValueError(f"expected stacks of shape (B, C, H, W), got {tuple(stacks.shape)}")
        g = generator if generator is not None else torch.default_generator
        if g.device.type != "cpu":
            raise ValueError("CTAugment draws its parameters from a CPU torch.Generator")
        cfg = self.cfg
        b, _, h, w = stacks.shape
        global_p, local_p, noise_seed = self.draw_params(g, b, h, w)

        hu = stacks if stacks.dtype == torch.float32 else stacks.to(torch.float32)
        buffers = [hu]
        global_views = self._render(hu, buffers, global_p, cfg.global_size, cfg.global_scale, noise_seed)
        local_views = self._render(
            hu, buffers, local_p, cfg.local_size, cfg.local_scale,
            None if noise_seed is None else noise_seed + 1,
        )
        params = {
            key: torch.cat([global_p[key], local_p[key]]).to(
                torch.float32 if global_p[key].is_floating_point() else global_p[key].dtype
            )
            for key in global_p
        }
        return Views(global_views, local_views, params)

    def _source(self, hu: torch.Tensor, buffers: list[torch.Tensor], size: int, scale_hi: float) -> torch.Tensor:
        """The input, or an anti-aliased downsized copy of it (cached in ``buffers``)."""
        h, w = hu.shape[-2:]
        if not self.cfg.antialias:
            return hu
        shape = _prescale_shape(h, w, size, scale_hi, self.cfg.ratio)
        if shape == (h, w):
            return hu
        for buf in buffers:
            if tuple(buf.shape[-2:]) == shape:
                return buf
        src = min(
            (buf for buf in buffers if buf.shape[-2] >= shape[0] and buf.shape[-1] >= shape[1]),
            key=lambda buf: buf.shape[-2] * buf.shape[-1],
        )
        out = F.interpolate(src, size=shape, mode="bilinear", align_corners=False, antialias=True)
        buffers.append(out)
        return out

    def _render(
        self,
        hu: torch.Tensor,
        buffers: list[torch.Tensor],
        params: dict[str, torch.Tensor],
        size: int,
        scale: tuple[float, float],
        noise_seed: int | None,
    ) -> list[torch.Tensor]:
        n_views = params["crop_box"].shape[0]
        if n_views == 0:
            return []
        cfg = self.cfg
        src = self._source(hu, buffers, size, scale[1])
        packed = torch.cat(
            [
                params["crop_box"],
                params["flip"].to(torch.float64).unsqueeze(-1),
                params["window_center"].unsqueeze(-1),
                params["window_width"].unsqueeze(-1),
            ],
            -1,
        ).to(device=hu.device, dtype=torch.float32)
        noise_gen = None
        if noise_seed is not None:
            noise_gen = torch.Generator(device=hu.device)
            noise_gen.manual_seed(noise_seed)
        views = []
        for v in range(n_views):
            box, flip, center, width = packed[v, :, :4], packed[v, :, 4], packed[v, :, 5], packed[v, :, 6]
            out = crop_resize(src, box, flip, size)
            out = apply_window(out, center, width, cfg.norm_mean, cfg.norm_std)
            if cfg.standardize:
                out = standardize_images(out)
            sigma = params["blur_sigma"][v]
            if bool((sigma > 0).any()):
                out = gaussian_blur(out, sigma)
            if noise_gen is not None:
                noise = torch.randn(out.shape, generator=noise_gen, device=out.device, dtype=out.dtype)
                out.add_(noise, alpha=cfg.noise_std)
            views.append(out)
        return views


def eval_views(
    stacks: torch.Tensor,
    generator: torch.Generator | None,
    size: int = 224,
    cfg: AugmentConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly two global views with the training augmentation (no local crops), for evaluation."""
    cfg = replace(cfg or AugmentConfig(), global_size=size, n_local=0)
    views = CTAugment(cfg)(stacks, generator)
    return views.global_views[0], views.global_views[1]
