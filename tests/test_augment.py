from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinox.data.augment import (
    AugmentConfig,
    CTAugment,
    Views,
    apply_window,
    crop_grid,
    crop_resize,
    eval_views,
    gaussian_blur,
)
from dinox.errors import UserError


def hu_batch(b=4, h=64, w=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 2000 - 1024).to(torch.int16)


def run(cfg: AugmentConfig, x: torch.Tensor, seed: int = 0) -> Views:
    return CTAugment(cfg)(x, torch.Generator().manual_seed(seed))


def test_shapes_dtypes_and_params():
    cfg = AugmentConfig(global_size=32, local_size=16, n_local=3)
    views = run(cfg, hu_batch(5))
    assert len(views.global_views) == 2 and len(views.local_views) == 3
    for v in views.global_views:
        assert v.shape == (5, 3, 32, 32) and v.dtype == torch.float32
    for v in views.local_views:
        assert v.shape == (5, 3, 16, 16) and v.dtype == torch.float32
    for v in views.all_views:
        assert v.min() >= -1 and v.max() <= 1
    p = views.params
    for key in ("window_center", "window_width", "crop_scale", "crop_ratio", "flip", "blur_sigma", "window_family"):
        assert p[key].shape == (5, 5), key
    assert p["crop_box"].shape == (5, 5, 4)
    assert p["flip"].dtype == torch.bool
    assert torch.all(p["blur_sigma"] == 0)


def test_global_views_differ_in_window_and_crop():
    views = run(AugmentConfig(global_size=16), hu_batch(64))
    p = views.params
    assert torch.all(p["window_family"][0] != p["window_family"][1])
    assert torch.all(p["window_center"][0] != p["window_center"][1])
    assert torch.all((p["crop_box"][0] - p["crop_box"][1]).abs().amax(-1) > 0)
    assert not torch.allclose(views.global_views[0], views.global_views[1])


def test_window_jitter_stays_around_families():
    cfg = AugmentConfig(global_size=8, n_local=2, local_size=8)
    p = run(cfg, hu_batch(256, 16, 16)).params
    families = torch.tensor(cfg.window_families)
    base = families[p["window_family"]]
    assert torch.all((p["window_center"] - base[..., 0]).abs() <= cfg.center_jitter * base[..., 1] + 1e-3)
    factor = p["window_width"] / base[..., 1]
    assert torch.all((factor >= 0.75 - 1e-6) & (factor <= 1.33 + 1e-6))
    assert set(p["window_family"].flatten().tolist()) == set(range(len(families)))


def test_crop_scales_in_range():
    cfg = AugmentConfig(global_size=8, local_size=8, n_local=4)
    p = run(cfg, hu_batch(200, 32, 48)).params
    g_scale, l_scale = p["crop_scale"][:2], p["crop_scale"][2:]
    assert g_scale.min() >= 0.5 - 1e-6 and g_scale.max() <= 1.0 + 1e-6
    assert l_scale.min() >= 0.1 - 1e-6 and l_scale.max() <= 0.5 + 1e-6
    box = p["crop_box"]
    assert box.min() >= 0 and box.max() <= 1 + 1e-6
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    torch.testing.assert_close(area, p["crop_scale"], rtol=1e-5, atol=1e-6)
    ratio = p["crop_ratio"]
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    pixel_ratio = (box[..., 2] - box[..., 0]) * 48 / ((box[..., 3] - box[..., 1]) * 32)
    torch.testing.assert_close(pixel_ratio, ratio, rtol=1e-5, atol=1e-6)


def test_flip_probability():
    flips = run(AugmentConfig(global_size=4), hu_batch(2000, 8, 8)).params["flip"].double().mean()
    assert 0.45 < float(flips) < 0.55
    never = run(AugmentConfig(global_size=4, flip_p=0.0), hu_batch(50, 8, 8)).params["flip"]
    assert not never.any()


def test_deterministic_per_seed():
    cfg = AugmentConfig(global_size=24, local_size=12, n_local=2, blur_p=0.5, noise_std=0.05)
    x = hu_batch(3)
    a, b, c = run(cfg, x, 7), run(cfg, x, 7), run(cfg, x, 8)
    for va, vb in zip(a.all_views, b.all_views):
        assert torch.equal(va, vb)
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key])
    assert not torch.equal(a.global_views[0], c.global_views[0])


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_global_views_independent_of_local_count(noise_std):
    x = hu_batch(3)
    a = run(AugmentConfig(global_size=16, n_local=0, noise_std=noise_std), x, 3)
    b = run(AugmentConfig(global_size=16, n_local=4, local_size=8, noise_std=noise_std), x, 3)
    for va, vb in zip(a.global_views, b.global_views):
        assert torch.equal(va, vb)


def test_full_crop_equals_hand_windowed_input():
    """Scale 1, aspect 1, no flip, output size = input size: the view is the windowed input."""
    cfg = AugmentConfig(global_size=16, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    x = hu_batch(3, 16, 16)
    views = run(cfg, x)
    for v in range(2):
        c = views.params["window_center"][v].double()
        w = views.params["window_width"][v].double()
        ref = torch.empty(3, 3, 16, 16, dtype=torch.float64)
        for i in range(3):
            lo = c[i] - w[i] / 2
            ref[i] = ((x[i].double() - lo) / w[i]).clamp(0, 1) * 2 - 1
        torch.testing.assert_close(views.global_views[v].double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(views.params["crop_box"][v], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3))


def test_full_crop_downsample_equals_interpolate_then_window():
    cfg = AugmentConfig(global_size=16, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, antialias=False)
    x = hu_batch(2, 32, 32)
    views = run(cfg, x)
    resized = F.interpolate(x.float(), size=16, mode="bilinear", align_corners=False)
    p = views.params
    ref = apply_window(resized, p["window_center"][1], p["window_width"][1])
    torch.testing.assert_close(views.global_views[1], ref, atol=1e-5, rtol=0)


def test_antialias_prescale_low_passes():
    """A Nyquist checkerboard shrunk 3.2x aliases into a pattern unless anti-aliased first."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = (((yy + xx) % 2) * 400 - 200).to(torch.int16).expand(1, 3, 64, 64)
    base = dict(global_size=20, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                window_families=((0.0, 1000.0), (0.0, 800.0)), center_jitter=0.0, width_jitter=(1.0, 1.0))
    smooth = run(AugmentConfig(**base), board).global_views[0]
    aliased = run(AugmentConfig(**base, antialias=False), board).global_views[0]
    assert float(smooth.std()) < 0.01 < 0.05 < float(aliased.std())


def test_params_reproduce_views():
    """Re-rendering each view from its recorded parameters gives the same pixels."""
    cfg = AugmentConfig(global_size=20, local_size=10, n_local=2, antialias=False)
    x = hu_batch(6, 40, 30)
    views = run(cfg, x)
    p = views.params
    for v, out in enumerate(views.all_views):
        size = 20 if v < 2 else 10
        crop = crop_resize(x.float(), p["crop_box"][v], p["flip"][v], size)
        ref = apply_window(crop, p["window_center"][v], p["window_width"][v])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_crop_resize_matches_slice_and_interpolate():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 64, 48, generator=g)
    x0, y0, x1, y1 = 8, 16, 40, 48
    box = torch.tensor([[x0 / 48, y0 / 64, x1 / 48, y1 / 64]] * 2)
    ref = F.interpolate(img[:, :, y0:y1, x0:x1], size=16, mode="bilinear", align_corners=False)
    out = crop_resize(img, box, torch.tensor([False, True]), 16)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref[1].flip(-1), atol=1e-5, rtol=0)

    up = crop_resize(img, box, torch.tensor([False, False]), 48)
    ref_up = F.interpolate(img[:, :, y0:y1, x0:x1], size=48, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], ref_up[..., 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_crop_grid_equals_affine_grid():
    g = torch.Generator().manual_seed(3)
    lo = torch.rand(5, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.1 + torch.rand(5, 2, generator=g) * 0.4], 1)
    flip = torch.tensor([True, False, True, False, False])
    x0, y0, x1, y1 = boxes.unbind(-1)
    theta = torch.zeros(5, 2, 3)
    theta[:, 0, 0] = (x1 - x0) * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1
    ref = F.affine_grid(theta, [5, 3, 7, 11], align_corners=False)
    torch.testing.assert_close(crop_grid(boxes, flip, (7, 11)), ref, atol=1e-6, rtol=0)


def test_int16_and_float_inputs_agree():
    cfg = AugmentConfig(global_size=16, n_local=1, local_size=8)
    x = hu_batch(2)
    a, b = run(cfg, x), run(cfg, x.double())
    for va, vb in zip(a.all_views, b.all_views):
        torch.testing.assert_close(va, vb)


def test_non_square_and_extreme_aspect_input():
    views = run(AugmentConfig(global_size=8), hu_batch(4, 10, 64))
    p = views.params
    assert torch.all(p["crop_scale"][:2] <= 1 + 1e-6) and views.global_views[0].shape == (4, 3, 8, 8)
    assert torch.all(p["crop_ratio"] <= 4 / 3 + 1e-5)


def test_gaussian_blur_matches_reference_and_identity():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 1, 12, 12, generator=g, dtype=torch.float64)
    out = gaussian_blur(img, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], img[0])
    t = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-0.5 * t**2)
    k = k / k.sum()
    padded = F.pad(img[1:], (3, 3, 3, 3), mode="reflect")[0, 0]
    ref = torch.zeros(12, 12, dtype=torch.float64)
    for i in range(12):
        for j in range(12):
            ref[i, j] = (padded[i : i + 7, j : j + 7] * k[:, None] * k[None, :]).sum()
    torch.testing.assert_close(out[1, 0], ref)


def test_blur_and_noise_flags_change_views():
    x = hu_batch(8)
    plain = run(AugmentConfig(global_size=16), x)
    blurred = run(AugmentConfig(global_size=16, blur_p=1.0), x)
    assert torch.all(blurred.params["blur_sigma"] > 0)
    torch.testing.assert_close(blurred.params["crop_box"], plain.params["crop_box"])
    assert float(blurred.global_views[0].std()) < float(plain.global_views[0].std())
    noisy = run(AugmentConfig(global_size=16, noise_std=0.1), x)
    diff = noisy.global_views[0] - plain.global_views[0]
    assert 0.05 < float(diff.std()) < 0.2


def test_eval_views_two_training_views():
    x = hu_batch(3)
    a, b = eval_views(x, torch.Generator().manual_seed(0), size=32)
    assert a.shape == b.shape == (3, 3, 32, 32)
    ref = run(AugmentConfig(global_size=32), x)
    assert torch.equal(a, ref.global_views[0]) and torch.equal(b, ref.global_views[1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"global_scale": (0.0, 1.0)},
        {"local_scale": (0.6, 0.5)},
        {"flip_p": 1.5},
        {"window_families": ((0.0, -1.0),)},
        {"window_families": ((0.0, 100.0),), "center_jitter": 0.0, "width_jitter": (1.0, 1.0)},
        {"n_local": -1},
        {"ratio": (0.5, 1.0, 2.0)},
    ],
)
def test_bad_config_raises_user_error(kwargs):
    with pytest.raises(UserError):
        AugmentConfig(**kwargs)


def test_config_accepts_lists_from_json():
    cfg = AugmentConfig(global_scale=[0.4, 1.0], window_families=[[-600, 1500], [50, 350]])
    assert cfg.global_scale == (0.4, 1.0) and cfg.window_families == ((-600.0, 1500.0), (50.0, 350.0))
    assert math.isclose(cfg.ratio[0], 0.75)


def test_standardized_views_have_zero_mean_unit_std_per_image():
    from dinox.data.augment import AugmentConfig, CTAugment

    stacks = (torch.rand(4, 3, 48, 48) * 2000 - 1000).to(torch.int16)
    views = CTAugment(AugmentConfig(global_size=32, standardize=True))(stacks, torch.Generator().manual_seed(0))
    for view in views.global_views:
        flat = view.flatten(1)
        assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(flat.std(1), torch.ones(4), atol=1e-3)
