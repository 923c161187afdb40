from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinox.train.plan import (
    GIB,
    block_activation_bytes_per_token,
    dino_head_param_count,
    estimate_training_memory,
    fits,
    format_estimate,
    fsdp_world_that_fits,
    suggestions,
    vit_param_count,
)

RTX4090_BYTES = int(23.6 * GIB)
ARCHS = {
    "vit-tiny": dict(patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_hidden_dim=768),
    "vit-large": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096),
    "vit-giant": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_hidden_dim=6144),
}


def estimate(arch, batch, size, *, amp, ckpt, out_dim=8192, **extra):
    a = ARCHS[arch]
    backbone = vit_param_count(patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=a["depth"],
                               mlp_hidden_dim=a["mlp_hidden_dim"], num_registers=4, img_size=size)
    return estimate_training_memory(
        params_backbone=backbone, params_head=dino_head_param_count(a["embed_dim"], out_dim),
        num_registers=4, batch_size=batch, global_size=size, amp=amp, grad_checkpoint=ckpt,
        out_dim=out_dim, **a, **extra)


class RefBlock(nn.Module):
    """Pre-norm ViT block with LayerScale (DINOv2 layout), SDPA attention, GELU or SwiGLU."""

    def __init__(self, dim, heads, hidden, swiglu=False):
        super().__init__()
        self.heads, self.swiglu = heads, swiglu
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls1 = nn.Parameter(torch.full((dim,), 1e-5))
        self.ls2 = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.ls1 * self.proj(attn)
        h = self.fc1(self.norm2(x))
        if self.swiglu:
            x1, x2 = h.chunk(2, dim=-1)
            h = F.silu(x1) * x2
        else:
            h = F.gelu(h)
        return x + self.ls2 * self.fc2(h)


class RefViT(nn.Module):
    def __init__(self, patch, dim, depth, heads, hidden, registers, img, swiglu=False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.registers = nn.Parameter(torch.zeros(1, registers, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2, dim))
        self.blocks = nn.ModuleList(RefBlock(dim, heads, hidden, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


def saved_bytes(block, x, amp):
    """Distinct storage bytes autograd saves for backward during one forward."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            block(x)
    return sum(storages.values())


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("swiglu", [False, True])
def test_block_activation_coefficients_match_autograd(amp, swiglu):
    torch.manual_seed(0)
    dim, heads, hidden, tokens = 64, 4, 256, 16
    block = RefBlock(dim, heads, hidden, swiglu)
    small = saved_bytes(block, torch.randn(2, tokens, dim, requires_grad=True), amp)
    large = saved_bytes(block, torch.randn(6, tokens, dim, requires_grad=True), amp)
    measured_per_token = (large - small) / (4 * tokens)
    predicted = block_activation_bytes_per_token(embed_dim=dim, num_heads=heads, mlp_hidden_dim=hidden,
                                                 amp=amp, swiglu=swiglu)
    assert measured_per_token == pytest.approx(predicted, rel=0.03)


@pytest.mark.parametrize("swiglu", [False, True])
def test_vit_param_count_matches_modules(swiglu):
    model = RefViT(patch=8, dim=48, depth=3, heads=4, hidden=96, registers=4, img=64, swiglu=swiglu)
    expected = sum(p.numel() for p in model.parameters())
    assert vit_param_count(patch_size=8, embed_dim=48, depth=3, mlp_hidden_dim=96, num_registers=4,
                           img_size=64, swiglu=swiglu) == expected


def test_dino_head_param_count_matches_modules():
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32))
    last = nn.utils.parametrizations.weight_norm(nn.Linear(32, 500, bias=False))
    expected = sum(p.numel() for p in mlp.parameters()) + sum(p.numel() for p in last.parameters())
    assert dino_head_param_count(64, 500, hidden_dim=128, bottleneck_dim=32) == expected


def test_standard_sizes():
    large = vit_param_count(patch_size=14, embed_dim=1024, depth=24, mlp_hidden_dim=4096, num_registers=4, img_size=224)
    giant = vit_param_count(patch_size=14, embed_dim=1408, depth=40, mlp_hidden_dim=6144, num_registers=4, img_size=224)
    assert 300e6 < large < 308e6
    assert 1.0e9 < giant < 1.03e9


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_vit_giant_batch_128_refused_on_24gb(amp, ckpt):
    e = estimate("vit-giant", 128, 224, amp=amp, ckpt=ckpt)
    assert not fits(e, RTX4090_BYTES)


def test_vit_giant_with_checkpointing_fits_strix_halo_but_not_without():
    unified = 120 * GIB
    assert fits(estimate("vit-giant", 128, 224, amp=True, ckpt=True), unified)
    assert not fits(estimate("vit-giant", 128, 224, amp=True, ckpt=False), unified)


def test_vit_large_batch_64_fits_24gb_only_with_checkpointing():
    with_ckpt = estimate("vit-large", 64, 224, amp=True, ckpt=True)
    without = estimate("vit-large", 64, 224, amp=True, ckpt=False)
    assert fits(with_ckpt, RTX4090_BYTES)
    assert not fits(without, RTX4090_BYTES)
    assert with_ckpt.activations < 0.4 * without.activations


def test_estimate_grows_with_batch_views_and_precision():
    base = estimate("vit-tiny", 32, 64, amp=False, ckpt=False)
    assert estimate("vit-tiny", 64, 64, amp=False, ckpt=False).total > base.total
    assert estimate("vit-tiny", 32, 64, amp=False, ckpt=False, n_local=4, local_size=32).total > base.total
    assert estimate("vit-tiny", 32, 64, amp=True, ckpt=False).activations < base.activations
    assert base.total == (base.weights + base.gradients + base.optimizer
                          + max(base.teacher_transient, base.activations + base.head_logits) + base.overhead)


def test_states_follow_parameter_counts():
    e = estimate_training_memory(params_backbone=1000, params_head=100, embed_dim=8, depth=1, num_heads=2,
                                 mlp_hidden_dim=32, patch_size=4, num_registers=0, batch_size=1,
                                 global_size=8, amp=False, grad_checkpoint=False, out_dim=16)
    assert e.weights == 4 * (2 * 1100 + 1000)
    assert e.gradients == 4 * 1100
    assert e.optimizer == 8 * 1100


def test_fits_respects_headroom_and_unknown_memory():
    e = estimate("vit-tiny", 32, 64, amp=False, ckpt=False)
    assert fits(e, e.total) is False
    assert fits(e, e.total, headroom=1.0) is True
    assert fits(e, None) is True


def test_suggestions_for_vit_large_without_checkpointing():
    e = estimate("vit-large", 64, 224, amp=True, ckpt=False)
    tips = suggestions(e, RTX4090_BYTES, accumulation_steps=4)
    assert tips and tips[0].startswith("enable --grad-checkpoint") and "(fits)" in tips[0]
    batch_tip = next(t for t in tips if "--accumulation-steps" in t)
    assert "effective batch 256, was 256" in batch_tip
    small = int(batch_tip.split("--batch-size ")[1].split()[0])
    assert small < 64
    assert fits(estimate("vit-large", small, 224, amp=True, ckpt=False), RTX4090_BYTES)
    assert not fits(estimate("vit-large", small * 2, 224, amp=True, ckpt=False), RTX4090_BYTES)


def test_suggestions_for_vit_giant_on_24gb_say_nothing_fits():
    e = estimate("vit-giant", 128, 224, amp=False, ckpt=False)
    tips = suggestions(e, RTX4090_BYTES, accumulation_steps=2)
    text = "\n".join(tips)
    assert "--grad-checkpoint" in text and "--accumulation-steps" in text and "--amp" in text
    assert "no batch size fits" in tips[-1]


def test_a_batch_that_fits_no_world_size_gets_a_sharded_batch_that_does():
    """ViT-Giant at batch 128 on 24 GB: no world size holds batch 128 per rank (activations),
    so the way out is FSDP2 over the fewest devices at a per-rank batch that fits, with the
    accumulation that keeps the effective batch; one device alone stays refused."""
    a = ARCHS["vit-giant"]
    block = vit_param_count(patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=1,
                            mlp_hidden_dim=a["mlp_hidden_dim"], num_registers=4, img_size=224) - vit_param_count(
        patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=0, mlp_hidden_dim=a["mlp_hidden_dim"],
        num_registers=4, img_size=224)

    def giant(batch, world=1):
        return estimate("vit-giant", batch, 224, amp=True, ckpt=True, shard_world=world, largest_unit_params=block)

    e = giant(128)
    assert fsdp_world_that_fits(e, RTX4090_BYTES) is None
    tips = suggestions(e, RTX4090_BYTES, accumulation_steps=1)
    sharded = tips[0]
    assert sharded.startswith("shard with FSDP2 over ") and "--parallel fsdp" in sharded
    world = int(sharded.split("FSDP2 over ")[1].split()[0])
    small = int(sharded.split("--batch-size ")[1].split()[0])
    accumulation = int(sharded.split("--accumulation-steps ")[1].split()[0])
    assert f"effective batch {small * accumulation * world}, was 128" in sharded
    assert small * accumulation * world >= 128 > small * (accumulation - 1) * world
    assert fits(giant(small, world), RTX4090_BYTES) and not fits(giant(small * 2, world), RTX4090_BYTES)
    if world > 2:   # the fewest devices: half of them hold no batch at all
        assert not fits(giant(1, world // 2), RTX4090_BYTES)
    assert "no batch size fits" in tips[-1]
    # planned for 2 data-parallel ranks, the proposal keeps the batch over both
    over_two = suggestions(e, RTX4090_BYTES, accumulation_steps=1, ranks=2)[0]
    assert f"--accumulation-steps {2 * accumulation} " in over_two and "was 256" in over_two


def test_suggestions_mention_local_crops_and_are_empty_when_fitting():
    e = estimate("vit-large", 64, 224, amp=True, ckpt=True, n_local=8, local_size=98)
    assert any("local crops" in t for t in suggestions(e, 16 * GIB, accumulation_steps=4))
    assert suggestions(e, 128 * GIB) == []


def test_format_estimate_lists_components():
    text = format_estimate(estimate("vit-large", 64, 224, amp=True, ckpt=True))
    assert "batch 64" in text and "grad checkpoint on" in text
    for label in ("weights", "gradients", "AdamW", "activations", "total"):
        assert label in text
    assert text.splitlines()[-1].strip().startswith("total") and text.endswith("GiB")


def test_as_dict_has_byte_fields_only():
    e = estimate("vit-tiny", 32, 64, amp=False, ckpt=False)
    d = e.as_dict()
    assert "inputs" not in d and d["total"] == e.total and all(isinstance(v, int) for v in d.values())


def test_high_resolution_gram_teacher_counts_its_enlarged_forward():
    """--gram-teacher-scale 2: the Gram teacher's no-grad forward runs on 4x the patches; its
    transient is the teacher's per-token cost on those tokens plus the enlarged image."""
    base = estimate("vit-large", 64, 224, amp=True, ckpt=True)
    hr = estimate("vit-large", 64, 224, amp=True, ckpt=True, gram_teacher_scale=2)
    a = ARCHS["vit-large"]
    per_token = base.teacher_transient // (64 * 2 * ((224 // a["patch_size"]) ** 2 + 1 + 4))
    tokens = 64 * 2 * ((448 // a["patch_size"]) ** 2 + 1 + 4)
    assert hr.teacher_transient == tokens * per_token + 64 * 2 * 3 * 448 ** 2 * 4
    assert hr.teacher_transient > 3.5 * base.teacher_transient
    assert (hr.activations, hr.head_logits, hr.weights) == (base.activations, base.head_logits, base.weights)


def test_dense_term_adds_its_batch_wide_score_matrices():
    """--dense-weight > 0: per direction the (batch x patches)^2 fp32 logits, softmax and its
    gradient, and the sampled keys; nothing else changes."""
    base = estimate("vit-large", 64, 224, amp=True, ckpt=True)
    dense = estimate("vit-large", 64, 224, amp=True, ckpt=True, dense=True)
    points = 64 * (224 // ARCHS["vit-large"]["patch_size"]) ** 2
    assert dense.head_logits - base.head_logits == 2 * (3 * points ** 2 * 4 + 2 * points * 1024 * 4)
    assert (dense.activations, dense.teacher_transient, dense.weights) == (
        base.activations, base.teacher_transient, base.weights)


def test_dense_keys_at_a_larger_scale_count_the_teacher_s_enlarged_forward():
    """--dense-teacher-scale 2 costs what the high-resolution Gram teacher costs (one no-grad
    forward at 4x the patches, run after the teacher's); both at 2 cost it once."""
    dense = estimate("vit-large", 64, 224, amp=True, ckpt=True, dense=True)
    keys2 = estimate("vit-large", 64, 224, amp=True, ckpt=True, dense=True, dense_teacher_scale=2)
    gram2 = estimate("vit-large", 64, 224, amp=True, ckpt=True, dense=True, gram_teacher_scale=2)
    both = estimate("vit-large", 64, 224, amp=True, ckpt=True, dense=True, gram_teacher_scale=2,
                    dense_teacher_scale=2)
    off = estimate("vit-large", 64, 224, amp=True, ckpt=True, dense_teacher_scale=2)
    assert keys2.teacher_transient == gram2.teacher_transient == both.teacher_transient > dense.teacher_transient
    assert off.teacher_transient == estimate("vit-large", 64, 224, amp=True, ckpt=True).teacher_transient


def test_a_batch_one_device_holds_is_not_answered_with_more_devices():
    """The seed guide's `--config vit-large --batch-size 128 --grad-checkpoint` on a 4090: a
    smaller batch with more accumulation fits the one card, so the ways out stay on it; FSDP2
    at a smaller per-rank batch (a second GPU for the same batch) was listed first."""
    block = (vit_param_count(patch_size=14, embed_dim=1024, depth=1, mlp_hidden_dim=4096, num_registers=4,
                             img_size=224)
             - vit_param_count(patch_size=14, embed_dim=1024, depth=0, mlp_hidden_dim=4096, num_registers=4,
                               img_size=224))
    e = estimate("vit-large", 128, 224, amp=False, ckpt=True, largest_unit_params=block, n_local=2, local_size=98)
    assert not fits(e, RTX4090_BYTES)
    tips = suggestions(e, RTX4090_BYTES, accumulation_steps=1)
    assert not any("FSDP2" in t for t in tips), tips
    batch_tip = next(t for t in tips if t.startswith("--batch-size"))
    small = int(batch_tip.split("--batch-size ")[1].split()[0])
    assert fits(estimate("vit-large", small, 224, amp=False, ckpt=True, largest_unit_params=block, n_local=2,
                         local_size=98), RTX4090_BYTES)
