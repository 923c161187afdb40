"""ViT backbone and DINO head against float64 references written out in full."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinox.errors import UserError
from dinox.model.head import DINOHead
from dinox.model.vit import (DropPath, LayerScale, ViTArch, VisionTransformer,
                             swiglu_hidden_dim)

SMALL = ViTArch(patch_size=8, embed_dim=32, depth=2, num_heads=4, num_registers=3,
                layerscale_init=0.5)


def build(arch=SMALL, img_size=32, seed=0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(arch, img_size=img_size, **kw)


# ---------------------------------------------------------------- references (float64)

def ref_layernorm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_attention_probs(x, qkv_w, qkv_b, heads):
    b, t, d = x.shape
    hd = d // heads
    qkv = x @ qkv_w.T + qkv_b
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    probs = torch.zeros(b, heads, t, t, dtype=x.dtype)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            logits = q[bi, :, sl] @ k[bi, :, sl].T / math.sqrt(hd)
            e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            probs[bi, h] = e / e.sum(dim=1, keepdim=True)
    return probs, v


def ref_attention(x, attn, heads):
    b, t, d = x.shape
    hd = d // heads
    probs, v = ref_attention_probs(x, attn.qkv.weight, attn.qkv.bias, heads)
    out = torch.zeros_like(x)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        out[..., sl] = probs[:, h] @ v[..., sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def ref_mlp(x, mlp, swiglu):
    if swiglu:
        h = x @ mlp.w12.weight.T + mlp.w12.bias
        half = h.shape[-1] // 2
        x1, x2 = h[..., :half], h[..., half:]
        return (x1 * torch.sigmoid(x1) * x2) @ mlp.w3.weight.T + mlp.w3.bias
    h = ref_gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias)
    return h @ mlp.fc2.weight.T + mlp.fc2.bias


def ref_tokens(model, img):
    """Patches cut out by slicing, flattened (c, i, j) like the Conv2d kernel."""
    p = model.patch_size
    b, c, h, w = img.shape
    w_flat = model.patch_embed.weight.reshape(model.embed_dim, -1)
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            patch = img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
            rows.append(patch @ w_flat.T + model.patch_embed.bias)
    return torch.stack(rows, dim=1)


def ref_forward(model, img, pos):
    """Full forward, eval mode; returns final-normed tokens and last attention probs."""
    arch = model.arch
    b = img.shape[0]
    x = ref_tokens(model, img) + pos
    x = torch.cat([model.cls_token.expand(b, -1, -1),
                   model.register_tokens.expand(b, -1, -1), x], dim=1)
    probs = None
    for blk in model.blocks:
        g1 = blk.ls1.gamma if arch.layerscale_init is not None else 1.0
        g2 = blk.ls2.gamma if arch.layerscale_init is not None else 1.0
        h = ref_layernorm(x, blk.norm1.weight, blk.norm1.bias)
        probs, _ = ref_attention_probs(h, blk.attn.qkv.weight, blk.attn.qkv.bias, arch.num_heads)
        x = x + g1 * ref_attention(h, blk.attn, arch.num_heads)
        h = ref_layernorm(x, blk.norm2.weight, blk.norm2.bias)
        x = x + g2 * ref_mlp(h, blk.mlp, arch.swiglu)
    return ref_layernorm(x, model.norm.weight, model.norm.bias), probs


def cubic_weights(t, a=-0.75):
    """Keys' cubic convolution kernel at offsets 1+t, t, 1-t, 2-t (PyTorch's bicubic)."""
    def k(s):
        s = abs(s)
        if s <= 1:
            return (a + 2) * s ** 3 - (a + 3) * s ** 2 + 1
        if s < 2:
            return a * s ** 3 - 5 * a * s ** 2 + 8 * a * s - 4 * a
        return 0.0
    return [k(1 + t), k(t), k(1 - t), k(2 - t)]


def ref_bicubic(grid, out_h, out_w):
    """(H, W, D) -> (out_h, out_w, D); half-pixel centres, borders clamped."""
    h, w, d = grid.shape
    out = torch.zeros(out_h, out_w, d, dtype=torch.float64)
    for oi in range(out_h):
        si = (oi + 0.5) * h / out_h - 0.5
        i0 = math.floor(si)
        wi = cubic_weights(si - i0)
        for oj in range(out_w):
            sj = (oj + 0.5) * w / out_w - 0.5
            j0 = math.floor(sj)
            wj = cubic_weights(sj - j0)
            for a in range(4):
                ii = min(max(i0 - 1 + a, 0), h - 1)
                for c in range(4):
                    jj = min(max(j0 - 1 + c, 0), w - 1)
                    out[oi, oj] += wi[a] * wj[c] * grid[ii, jj].double()
    return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("swiglu", [False, True])
def test_forward_matches_reference(swiglu):
    arch = ViTArch(**{**SMALL.__dict__, "swiglu": swiglu})
    model = build(arch).double().eval()
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(img)
    with torch.no_grad():
        ref, probs = ref_forward(model, img, model.pos_embed)
        att = model.last_attention(img)
    r = arch.num_registers
    assert out["cls"].shape == (2, 32)
    assert out["registers"].shape == (2, r, 32)
    assert out["patches"].shape == (2, 16, 32)
    torch.testing.assert_close(out["cls"], ref[:, 0])
    torch.testing.assert_close(out["registers"], ref[:, 1:1 + r])
    torch.testing.assert_close(out["patches"], ref[:, 1 + r:])
    assert att.shape == (2, arch.num_heads, 1 + r + 16, 1 + r + 16)
    torch.testing.assert_close(att.double(), probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))


def test_swiglu_width_follows_dinov2():
    assert swiglu_hidden_dim(4096) == 2736
    assert swiglu_hidden_dim(128) == 88
    model = build(ViTArch(**{**SMALL.__dict__, "swiglu": True}))
    assert model.blocks[0].mlp.w12.out_features == 2 * 88
    assert model.blocks[0].mlp.w3.in_features == 88


def test_position_embedding_interpolated_bicubically():
    model = build().double().eval()
    img = torch.randn(1, 3, 48, 24, dtype=torch.float64)
    g = model.grid_size
    with torch.no_grad():
        pos = ref_bicubic(model.pos_embed[0].reshape(g, g, -1), 6, 3).reshape(1, 18, -1)
        torch.testing.assert_close(model._position_embedding(6, 3), pos)
        ref, _ = ref_forward(model, img, pos)
        out = model(img)
    assert out["patches"].shape == (1, 18, 32)
    torch.testing.assert_close(out["patches"], ref[:, 1 + SMALL.num_registers:])


def test_no_registers_and_no_layerscale():
    arch = ViTArch(patch_size=8, embed_dim=16, depth=1, num_heads=2, num_registers=0,
                   layerscale_init=None)
    model = build(arch, img_size=16).double().eval()
    assert isinstance(model.blocks[0].ls1, nn.Identity)
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = model(img)
    ref, _ = ref_forward(model, img, model.pos_embed)
    assert out["registers"].shape == (2, 0, 16)
    torch.testing.assert_close(out["patches"], ref[:, 1:])


def _count_block_calls(model):
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_grad_checkpoint_same_output_and_gradients():
    img = torch.randn(3, 3, 32, 32)
    results = []
    for use_ckpt in (False, True):
        model = build(drop_path_rate=0.3, grad_checkpoint=use_ckpt).train()
        calls = _count_block_calls(model)
        torch.manual_seed(123)
        out = model(img)
        loss = out["cls"].square().sum() + out["patches"].sin().sum()
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        # with checkpointing, the block runs again during backward (recompute)
        assert len(calls) == (2 if use_ckpt else 1)
    (out_a, grads_a), (out_b, grads_b) = results
    for key in out_a:
        torch.testing.assert_close(out_a[key], out_b[key])
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_grad_checkpoint_skipped_in_eval_and_no_grad():
    model = build(grad_checkpoint=True)
    calls = _count_block_calls(model)
    with torch.no_grad():
        model.train()(torch.randn(1, 3, 32, 32))
    model.eval()(torch.randn(1, 3, 32, 32))["cls"].sum().backward()
    assert len(calls) == 2


def test_drop_path_rates_increase_linearly_and_vanish_in_eval():
    arch = ViTArch(patch_size=8, embed_dim=16, depth=5, num_heads=2)
    model = build(arch, img_size=16, drop_path_rate=0.4)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    reference = build(arch, img_size=16, drop_path_rate=0.0).eval()
    reference.load_state_dict(model.state_dict())
    model.eval()
    img = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model(img)["cls"], reference(img)["cls"])


def test_drop_path_is_per_sample():
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    y = drop(torch.ones(4000, 3, 5))
    per_sample = y.reshape(4000, -1)
    kept = per_sample[:, 0] > 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert torch.all(per_sample[~kept] == 0)
    assert 0.72 < kept.float().mean().item() < 0.78
    drop.eval()
    x = torch.randn(4, 3)
    assert torch.equal(drop(x), x)


def test_init():
    model = build(ViTArch(patch_size=8, embed_dim=256, depth=2, num_heads=4), img_size=64)
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.all(qkv.bias == 0)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.15)
    ls = model.blocks[1].ls2
    assert isinstance(ls, LayerScale) and torch.all(ls.gamma == 1e-5)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


def test_meta_device_allocates_nothing():
    arch = ViTArch(patch_size=14, embed_dim=1024, depth=24, num_heads=16)
    model = VisionTransformer(arch, device="meta")
    assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"):
        model = VisionTransformer(arch)
        head = DINOHead(1024, 65536)
    assert all(p.is_meta for p in [*model.parameters(), *head.parameters()])


def test_bad_input_sizes_raise_user_error():
    model = build()
    with pytest.raises(UserError, match=r"30x32 px .* multiples of --vit-patch 8 \(e.g. 24 or 32"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(UserError, match="--img-size 36 is not a multiple of --vit-patch 8"):
        VisionTransformer(SMALL, img_size=36)


# ---------------------------------------------------------------- DINO head


def test_head_matches_reference_and_is_cosine():
    torch.manual_seed(0)
    head = DINOHead(16, 50, hidden_dim=24, bottleneck_dim=8, nlayers=3).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    lin = [m for m in head.mlp if isinstance(m, nn.Linear)]
    h = ref_gelu(x @ lin[0].weight.T + lin[0].bias)
    h = ref_gelu(h @ lin[1].weight.T + lin[1].bias)
    h = h @ lin[2].weight.T + lin[2].bias
    h = h / h.norm(dim=1, keepdim=True)
    v = head.last_layer.parametrizations.weight.original1
    expected = h @ (v / v.norm(dim=1, keepdim=True)).T
    out = head(x)
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 1 + 1e-12


def test_head_weight_norm_magnitude_fixed():
    torch.manual_seed(0)
    head = DINOHead(8, 20, hidden_dim=16, bottleneck_dim=4)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(6, 8)).logsumexp(-1).sum().backward()
        opt.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))
    head(torch.randn(6, 8)).sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    head.cancel_last_layer_grads()
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())


def test_head_prototype_norms_learned_and_free():
    """learned (DINOv2): weight norm with g trained from 1, so the prototype norms move;
    free (DINOv3): a plain Linear initialised like the MLP. Both logits equal h @ W.T."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64)
    for mode in ("learned", "free"):
        head = DINOHead(8, 20, hidden_dim=16, bottleneck_dim=4, prototype_norm=mode).double()
        if mode == "learned":
            g = head.last_layer.parametrizations.weight.original0
            assert g.requires_grad and torch.all(g == 1)
        else:
            assert list(dict(head.last_layer.named_parameters())) == ["weight"]
            assert 0.005 < head.last_layer.weight.std().item() < 0.03  # trunc_normal(0.02)
        h = torch.nn.functional.normalize(head.mlp(x), dim=-1)
        torch.testing.assert_close(head(x), h @ head.last_layer.weight.T)
        before = head.last_layer.weight.norm(dim=1).detach().clone()
        opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            (-head(x).max(dim=1).values.sum()).backward()  # wants longer prototypes
            opt.step()
        assert torch.all(head.last_layer.weight.norm(dim=1) >= before - 1e-12)
        assert (head.last_layer.weight.norm(dim=1) - before).max() > 1e-3
        head(x).sum().backward()
        head.cancel_last_layer_grads()
        assert all(p.grad is None for p in head.last_layer.parameters())
    with pytest.raises(ValueError, match="prototype_norm"):
        DINOHead(8, 20, prototype_norm="cosine")


def test_exported_head_metadata_rebuilds_each_prototype_layout():
    from dinox.commands.export import head_metadata

    for mode in ("fixed", "learned", "free"):
        head = DINOHead(8, 20, hidden_dim=16, bottleneck_dim=4, nlayers=3, use_bn=True, prototype_norm=mode)
        if mode == "learned":
            with torch.no_grad():
                head.last_layer.parametrizations.weight.original0.mul_(1.5)
        meta = head_metadata({k: v.detach() for k, v in head.state_dict().items()})
        assert meta["prototype_norm"] == mode and meta["out_dim"] == "20" and meta["use_bn"] == "True"
        rebuilt = DINOHead(int(meta["in_dim"]), int(meta["out_dim"]), hidden_dim=int(meta["hidden_dim"]),
                           bottleneck_dim=int(meta["bottleneck_dim"]), nlayers=int(meta["nlayers"]),
                           use_bn=meta["use_bn"] == "True", prototype_norm=meta["prototype_norm"])
        rebuilt.load_state_dict(head.state_dict())
        x = torch.randn(4, 8)
        torch.testing.assert_close(rebuilt(x), head(x))


def test_head_batchnorm_and_single_layer():
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, nlayers=3, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 2
    assert head(torch.randn(4, 8)).shape == (4, 10)
    one = DINOHead(8, 10, bottleneck_dim=4, nlayers=1)
    assert [type(m) for m in one.mlp] == [nn.Linear]


# ---------------------------------------------------------------- RoPE (DINOv3 layout)

ROPE = ViTArch(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_registers=3, layerscale_init=0.5,
               rope=True, mask_k_bias=True, ln_eps=1e-5)


def test_default_layout_keeps_its_state_dict_keys():
    model = build()
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias", "ls1.gamma", "ls2.gamma"]
    expected = ["cls_token", "register_tokens", "pos_embed", "patch_embed.weight", "patch_embed.bias",
                *(f"blocks.{i}.{k}" for i in range(2) for k in block), "norm.weight", "norm.bias"]
    assert sorted(model.state_dict()) == sorted(expected)
    assert all(isinstance(m, nn.LayerNorm) and m.eps == 1e-6 for m in (model.norm, model.blocks[0].norm1))
    rope = build(ROPE)
    assert sorted(rope.state_dict()) == sorted(k for k in expected if k != "pos_embed")
    assert rope.pos_embed is None and rope.norm.eps == 1e-5


def ref_rotate(t, gh, gw, base=100.0):
    """Rotate the patch rows of t (T, head_dim), float64, written out per channel: channel c
    of the first half pairs with c + head_dim/2; the first quarter of each half turns with the
    row coordinate, the second with the column coordinate (DINOv3's axial RoPE)."""
    t = t.clone()
    n, hd = gh * gw, t.shape[-1]
    prefix = t.shape[0] - n
    quarter = hd // 4
    out = t.clone()
    for p in range(n):
        i, j = divmod(p, gw)
        y, x = (i + 0.5) / gh * 2 - 1, (j + 0.5) / gw * 2 - 1
        for c in range(hd // 2):
            coord = y if c < quarter else x
            period = base ** (4 * (c % quarter) / hd)
            a = 2 * math.pi * coord / period
            u, v = t[prefix + p, c], t[prefix + p, c + hd // 2]
            out[prefix + p, c] = u * math.cos(a) - v * math.sin(a)
            out[prefix + p, c + hd // 2] = v * math.cos(a) + u * math.sin(a)
    return out


def ref_rope_forward(model, img):
    arch = model.arch
    b, d, heads = img.shape[0], arch.embed_dim, arch.num_heads
    hd = d // heads
    gh, gw = img.shape[-2] // arch.patch_size, img.shape[-1] // arch.patch_size
    x = torch.cat([model.cls_token.expand(b, -1, -1), model.register_tokens.expand(b, -1, -1),
                   ref_tokens(model, img)], dim=1)
    eps = arch.ln_eps
    for blk in model.blocks:
        h = ref_layernorm(x, blk.norm1.weight, blk.norm1.bias, eps)
        bias = blk.attn.qkv.bias.clone()
        bias[d:2 * d] = 0  # mask_k_bias
        qkv = h @ blk.attn.qkv.weight.T + bias
        att = torch.zeros_like(h)
        for bi in range(b):
            for hh in range(heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                q = ref_rotate(qkv[bi, :, sl], gh, gw)
                k = ref_rotate(qkv[bi, :, d:2 * d][:, sl], gh, gw)
                v = qkv[bi, :, 2 * d:][:, sl]
                logits = q @ k.T / math.sqrt(hd)
                att[bi, :, sl] = logits.softmax(-1) @ v
        x = x + blk.ls1.gamma * (att @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        h = ref_layernorm(x, blk.norm2.weight, blk.norm2.bias, eps)
        x = x + blk.ls2.gamma * ref_mlp(h, blk.mlp, arch.swiglu)
    return ref_layernorm(x, model.norm.weight, model.norm.bias, eps)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_rope_forward_matches_reference(size):
    model = build(ROPE).double().eval()
    with torch.no_grad():
        for blk in model.blocks:  # a key bias the mask must hide
            blk.attn.qkv.bias.normal_()
    img = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        out = model(img)
        ref = ref_rope_forward(model, img)
    r = ROPE.num_registers
    torch.testing.assert_close(out["cls"], ref[:, 0])
    torch.testing.assert_close(out["registers"], ref[:, 1:1 + r])
    torch.testing.assert_close(out["patches"], ref[:, 1 + r:])
    att = model.last_attention(img)
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1], dtype=att.dtype))


def test_key_bias_matters_only_with_rope_and_unmasked():
    img = torch.randn(2, 3, 32, 32)

    def delta(arch):
        model = build(arch).eval()
        with torch.no_grad():
            before = model(img)["patches"]
            for blk in model.blocks:
                blk.attn.qkv.bias[arch.embed_dim:2 * arch.embed_dim] = 1.0
            return (model(img)["patches"] - before).abs().max().item()

    assert delta(ROPE) == 0.0  # masked
    assert delta(ViTArch(**{**ROPE.__dict__, "mask_k_bias": False})) > 1e-3
    assert delta(SMALL) < 1e-5  # without RoPE a key bias shifts a softmax row uniformly


def test_rope_grad_checkpoint_same_gradients():
    img = torch.randn(2, 3, 32, 32)
    grads = []
    for use_ckpt in (False, True):
        model = build(ROPE, grad_checkpoint=use_ckpt).train()
        model(img)["patches"].sin().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    # the masked key bias receives no gradient
    assert torch.all(grads[0]["blocks.0.attn.qkv.bias"][32:64] == 0)


def test_rope_needs_head_width_divisible_by_4():
    with pytest.raises(UserError, match="divisible by 4"):
        VisionTransformer(ViTArch(patch_size=8, embed_dim=30, depth=1, num_heads=5, rope=True), img_size=16)


def test_resample_offset_convention_is_dinov2s():
    from dinox.model.vit import resample_token_grid

    pos = torch.randn(1, 16, 8)
    grid = pos.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    # dinov2: scale_factor = (n + 0.1) / g instead of the size
    ref = F.interpolate(grid, scale_factor=(6.1 / 4, 6.1 / 4), mode="bicubic", antialias=False)
    out = resample_token_grid(pos, (4, 4), (6, 6), offset=0.1)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(1, 36, 8))
    plain = resample_token_grid(pos, (4, 4), (6, 6))
    assert not torch.allclose(out, plain)
