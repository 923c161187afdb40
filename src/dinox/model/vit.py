"""Vision Transformer backbone (Dosovitskiy et al. 2021) in the DINOv2/DINOv3 flavour.

Input is a (B, 3, H, W) float tensor: for CT the three channels are the slices z-1, z, z+1
(2.5D), so the usual 3-channel Conv2d patch embedding applies unchanged.

Token layout, kept fixed everywhere (heatmaps index into it):
``[cls, reg_1 .. reg_R, patch_1 .. patch_N]`` with patches in row-major order.

Position embeddings: one learned vector per patch of the grid at the construction
``img_size``; for any other grid they are bicubically interpolated (DINOv2 does the same).
The class token and the register tokens (Darcet et al. 2024, "Vision Transformers Need
Registers") get no position embedding: they are learned vectors already, and a learned
offset added to a learned vector is redundant.

Blocks are pre-norm (LayerNorm eps 1e-6): ``x + drop_path(ls1(attn(norm1(x))))`` then
``x + drop_path(ls2(mlp(norm2(x))))``, with LayerScale (Touvron et al. 2021, CaiT) and
stochastic depth (Huang et al. 2016) whose rate rises linearly from 0 to ``drop_path_rate``
over depth. Attention runs through ``F.scaled_dot_product_attention`` so PyTorch picks
the flash / memory-efficient kernel for the device.

SwiGLU (Shazeer 2020): following DINOv2, ``mlp_hidden_dim`` is the width a GELU MLP
would have; the SwiGLU hidden width is 2/3 of it rounded up to a multiple of 8, which
keeps the parameter count close to the GELU MLP's (three matrices instead of two).

RoPE (``ViTArch.rope``, the DINOv3 layout; Su et al. 2021, axial 2-D variant of Heo et al.
2024): no learned position embedding; in every attention layer the queries and keys of the
patch tokens are rotated by angles ``2 pi * coord / period``, where the patch-centre
coordinates are ``(i + 0.5) / H * 2 - 1`` (rows) and ``(j + 0.5) / W * 2 - 1`` (columns), each
in [-1, 1] whatever the grid, and the ``head_dim / 4`` periods are
``base ** (2 k / (head_dim / 2))`` (base 100). Each head's channels are laid out as
``[rows: head_dim/4 | cols: head_dim/4]`` twice and rotated "half against half"
(``x * cos + rotate_half(x) * sin``). The class and register tokens are not rotated.
DINOv3 also masks the key part of the qkv bias to zero (``mask_k_bias``): with RoPE a key
bias is rotated with its position and no longer cancels in the softmax. Facts from the
DINOv3 code (dinov3/layers/rope_position_encoding.py, dinov3/layers/attention.py).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dinox.errors import UserError

LN_EPS = 1e-6
INIT_STD = 0.02


@dataclass(frozen=True)
class ViTArch:
    """Architecture of the backbone; everything needed to rebuild it from a checkpoint."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int | None = None
    swiglu: bool = False
    num_registers: int = 4
    layerscale_init: float | None = 1e-5
    qkv_bias: bool = True
    # DINOv3 layout: rotary position encoding instead of a learned position embedding
    rope: bool = False
    rope_base: float = 100.0
    # DINOv3 layout: the key third of the qkv bias is multiplied by zero
    mask_k_bias: bool = False
    # LayerNorm epsilon: DINOv2 uses 1e-6, DINOv3 1e-5 (its "layernormbf16")
    ln_eps: float = LN_EPS

    @property
    def mlp_dim(self) -> int:
        """GELU-equivalent MLP hidden width (``4 * embed_dim`` unless set)."""
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else 4 * self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """DINOv2's SwiGLU width: 2/3 of the GELU width, rounded up to a multiple of 8."""
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


def _nearest_divisor(size: int, patch: int) -> int | None:
    """The patch size closest to ``patch`` (within a factor 2) that divides ``size`` into
    a grid of at least 4 x 4."""
    for delta in range(1, patch + 1):
        for cand in (patch + delta, patch - delta):
            if patch / 2 <= cand <= 2 * patch and cand > 1 and size % cand == 0 \
                    and size // cand >= 4:
                return cand
    return None


def check_patch_multiple(size: int, patch: int, flag: str = "--img-size") -> None:
    """UserError unless ``size`` (the value of ``flag``) tiles into ``patch``-px patches;
    the message names a patch size that fits and the nearest image sizes that do."""
    if size % patch == 0:
        return
    lo, hi = size // patch * patch, (size // patch + 1) * patch
    sizes = f"{flag} {lo} or {hi}" if lo > 0 else f"{flag} {hi}"
    alt = _nearest_divisor(size, patch)
    fix = f"--vit-patch {alt} ({size} = {size // alt} x {alt}) or {sizes}" if alt else sizes
    raise UserError(f"{flag} {size} is not a multiple of --vit-patch {patch}; use {fix}")


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements, trainable or not (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def rope_periods(head_dim: int, base: float, device=None) -> torch.Tensor:
    """The ``head_dim // 4`` RoPE periods ``base ** (2 k / (head_dim // 2))``, float32,
    computed as DINOv3 does (its ``rope_embed.periods`` buffer holds the same numbers)."""
    k = torch.arange(head_dim // 4, device=device, dtype=torch.float32)
    return base ** (2 * k / (head_dim // 2))


def rope_tables(gh: int, gw: int, head_dim: int, base: float,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (gh * gw, head_dim) float32, for a gh x gw patch grid (row-major)."""
    ch = torch.arange(0.5, gh, device=device, dtype=torch.float32) / gh
    cw = torch.arange(0.5, gw, device=device, dtype=torch.float32) / gw
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0  # [0, 1] -> [-1, 1]
    periods = rope_periods(head_dim, base, device)
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1, 2)  # (N, head_dim / 2)
    angles = angles.tile(2)
    return angles.cos(), angles.sin()


def apply_rope(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the last ``N`` tokens of ``t`` (B, heads, T, head_dim), N = rows of the tables;
    the leading class / register tokens pass unchanged. Computed in float32, returned in
    ``t``'s dtype (as DINOv3 does under mixed precision)."""
    cos, sin = rope
    prefix = t.shape[-2] - cos.shape[0]
    head, tail = t[..., :prefix, :], t[..., prefix:, :].float()
    t1, t2 = tail.chunk(2, dim=-1)
    rotated = tail * cos + torch.cat([-t2, t1], dim=-1) * sin
    return torch.cat([head, rotated.to(t.dtype)], dim=-2)


def resample_token_grid(tokens: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int], *,
                        offset: float = 0.0, antialias: bool = False) -> torch.Tensor:
    """(B, gh*gw, D) tokens on ``grid`` -> (B, nh*nw, D) on ``new_grid``, bicubic (PyTorch's,
    half-pixel centres), computed in float32, returned in ``tokens``' dtype. Patch position
    embeddings (B = 1) when a model runs at another grid; patch features when DINOv3's
    high-resolution Gram teacher brings its feature map back to the student's grid.

    For position embeddings the conventions differ between the models that learned such
    grids, and a model's outputs at a new grid only match its source when the source's
    convention is used:

    - dinox, transformers ``Dinov2Model``: target size, no antialiasing;
    - transformers ``Dinov2WithRegistersModel``, torch-hub DINOv2 ``_reg`` models: target
      size, ``antialias=True`` (PyTorch's antialiased bicubic also uses a = -0.5, not -0.75,
      so it differs even when upsampling);
    - torch-hub DINOv2 without registers: ``interpolate_offset=0.1``, i.e. the scale factor
      ``(n + 0.1) / g`` is given instead of the size, which shifts the sampling positions
      slightly (a work-around inherited from DINO; dinov2/models/vision_transformer.py).
    """
    (gh, gw), (nh, nw) = grid, new_grid
    b, n, d = tokens.shape
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not form the {gh}x{gw} grid")
    x = tokens.float().reshape(b, gh, gw, d).permute(0, 3, 1, 2)
    if offset:
        x = F.interpolate(x, scale_factor=((nh + offset) / gh, (nw + offset) / gw),
                          mode="bicubic", antialias=antialias)
    else:
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=antialias)
    if tuple(x.shape[-2:]) != (nh, nw):  # the offset form rounds down the scaled size
        raise ValueError(f"resampling {grid} -> {new_grid} gave {tuple(x.shape[-2:])}")
    return x.permute(0, 2, 3, 1).reshape(b, nh * nw, d).to(tokens.dtype)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch, initialised small (CaiT)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a residual branch for a random subset of the batch
    and rescale the rest by 1/keep_prob; identity in eval mode or at rate 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) of rope_tables, or no RoPE


class Attention(nn.Module):
    """Multi-head self-attention; ``forward`` uses SDPA, ``attention_probs`` is explicit.
    ``rope`` (the (cos, sin) tables of ``rope_tables``) rotates the patch queries and keys."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, mask_k_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mask_k_bias = mask_k_bias and qkv_bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, rope: Rope = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        if self.mask_k_bias:
            # the key third gets no gradient through the mask: it keeps its (ineffective) value
            bias = self.qkv.bias
            bias = torch.cat([bias[:d], torch.zeros_like(bias[d:2 * d]), bias[2 * d:]])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._qkv(x, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def attention_probs(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d_head)) as (B, heads, T, T), computed in float32."""
        q, k, _ = self._qkv(x, rope)
        logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
        return logits.softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUMlp(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(x W1) * (x W2))`` with W1, W2 fused in ``w12``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, arch: ViTArch, drop_path: float = 0.0):
        super().__init__()
        dim = arch.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=arch.ln_eps)
        self.attn = Attention(dim, arch.num_heads, qkv_bias=arch.qkv_bias,
                              mask_k_bias=arch.mask_k_bias)
        self.norm2 = nn.LayerNorm(dim, eps=arch.ln_eps)
        if arch.swiglu:
            self.mlp = SwiGLUMlp(dim, swiglu_hidden_dim(arch.mlp_dim))
        else:
            self.mlp = Mlp(dim, arch.mlp_dim)
        if arch.layerscale_init is None:
            self.ls1: nn.Module = nn.Identity()
            self.ls2: nn.Module = nn.Identity()
        else:
            self.ls1 = LayerScale(dim, arch.layerscale_init)
            self.ls2 = LayerScale(dim, arch.layerscale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT backbone returning the final-normed class, register and patch tokens.

    ``device`` (optional) builds the parameters there directly; ``device="meta"`` allocates
    nothing, e.g. to count parameters or to materialise later with ``to_empty`` +
    ``init_weights`` (FSDP2 style).
    """

    def __init__(self, arch: ViTArch, img_size: int = 224, in_chans: int = 3,
                 drop_path_rate: float = 0.0, grad_checkpoint: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        check_patch_multiple(img_size, arch.patch_size)
        if arch.rope and arch.head_dim % 4:
            raise UserError(f"RoPE needs a head width divisible by 4 (--vit-dim / --vit-heads = "
                            f"{arch.embed_dim}/{arch.num_heads}); pick heads of 64 channels")
        self.arch = arch
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dim = arch.embed_dim
        self.patch_size = arch.patch_size
        self.num_registers = arch.num_registers
        self.grad_checkpoint = grad_checkpoint
        self.grid_size = img_size // arch.patch_size
        with torch.device(device) if device is not None else nullcontext():
            d = arch.embed_dim
            self.patch_embed = nn.Conv2d(in_chans, d, kernel_size=arch.patch_size,
                                         stride=arch.patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_registers, d))
            if arch.num_registers == 0:
                # Nothing to learn, and FSDP2 cannot reduce-scatter an empty gradient. It stays a
                # parameter (the optimizer state of earlier checkpoints counts it) but takes none.
                self.register_tokens.requires_grad_(False)
            if arch.rope:
                # no state: the rotation tables are a function of the grid (rope_tables)
                self.register_parameter("pos_embed", None)
            else:
                self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, d))
            rates = torch.linspace(0, drop_path_rate, arch.depth, device="cpu").tolist()
            self.blocks = nn.ModuleList(Block(arch, r) for r in rates)
            self.norm = nn.LayerNorm(d, eps=arch.ln_eps)
        # How a learned position grid is resampled to another grid: dinox's own convention
        # (bicubic to the target size, no antialiasing) unless a model loaded for inference
        # keeps its source's (dinox.model.weights.load_exported; see resample_token_grid).
        # Not state: a training run always uses dinox's.
        self.pos_interp_offset = 0.0
        self.pos_interp_antialias = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc_normal(std 0.02) for Linear weights, position, class and register tokens;
        zero biases; LayerNorm to identity; LayerScale to its init value; the patch
        Conv2d keeps PyTorch's default (as in DINOv2)."""
        self.patch_embed.reset_parameters()
        for p in (self.cls_token, self.register_tokens, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    def _position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.pos_embed
        if (gh, gw) == (self.grid_size, self.grid_size):
            return pos
        return resample_token_grid(pos, (self.grid_size, self.grid_size), (gh, gw),
                                   offset=self.pos_interp_offset,
                                   antialias=self.pos_interp_antialias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise UserError(f"the model expects images of shape (B, {self.in_chans}, H, W), "
                            f"got {tuple(x.shape)}; feed 3-slice stacks")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            bad = h if h % p else w
            lo, hi = bad // p * p, (bad // p + 1) * p
            sizes = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise UserError(f"input of {h}x{w} px does not tile into {p}-px patches; crop or "
                            f"resize to multiples of --vit-patch {p} (e.g. {sizes} px)")

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embed, add position embeddings (unless RoPE), prepend class and register
        tokens."""
        return self._tokens(x)[0]

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        self._check_input(x)
        x = self.patch_embed(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        rope = None
        if self.arch.rope:
            rope = rope_tables(gh, gw, self.arch.head_dim, self.arch.rope_base, x.device)
        else:
            x = x + self._position_embedding(gh, gw)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1),
                       self.register_tokens.expand(b, -1, -1), x], dim=1)
        return x, rope

    def _run_block(self, block: Block, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x, rope = self._tokens(x)
        for block in self.blocks:
            x = self._run_block(block, x, rope)
        x = self.norm(x)
        r = self.num_registers
        return {"cls": x[:, 0], "registers": x[:, 1:1 + r], "patches": x[:, 1 + r:]}

    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, (B, heads, T, T), token order
        ``[cls, registers, patches]``; row 0 restricted to the patch columns is the usual
        class-token attention heatmap."""
        x, rope = self._tokens(x)
        for block in self.blocks[:-1]:
            x = self._run_block(block, x, rope)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(x), rope)
