"""The dense correspondence term: view geometry (data/augment.py), the loss (losses/dense.py)
and its place in the objective (train/ssl.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinox.config import resolve
from dinox.data.augment import CTAugment, crop_resize, token_correspondence
from dinox.errors import UserError
from dinox.losses.dense import dense_correspondence_loss, sample_token_map
from dinox.train.optim import autocast
from dinox.train.ssl import DINOSSL


def _boxes(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(2, batch, 2, generator=g) * 0.4
    size = 0.5 + torch.rand(2, batch, 2, generator=g) * 0.1
    return {"crop_box": torch.cat([lo, lo + size], -1), "flip": torch.tensor([[True, False, True, False],
                                                                             [False, False, True, True]])}


def test_token_correspondence_finds_the_same_image_point_in_the_other_view():
    # an image linear in x and y: bilinear resampling is exact, so the value a view shows at
    # a token centre must equal the other view's value at the corresponding point
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    image = (3 * xs + 7 * ys)[None, None].repeat(4, 1, 1, 1)
    params = _boxes(4, 0)
    grid = 8
    for a, b in ((0, 1), (1, 0)):
        view_a = crop_resize(image, params["crop_box"][a], params["flip"][a], grid)    # values at token centres
        view_b = crop_resize(image, params["crop_box"][b], params["flip"][b], 64)
        coords, inside = token_correspondence(params, a, b, grid)
        seen = F.grid_sample(view_b, coords, mode="bilinear", align_corners=False)
        # away from view b's border (where grid_sample pads) the values agree exactly
        core = (coords.abs() <= 0.95).all(-1).flatten(1)
        assert core.sum() > 20
        assert torch.allclose(seen.flatten(1)[core], view_a.flatten(1)[core], atol=1e-4)
        # inside: exactly the points within view b's crop
        assert torch.equal(inside, (coords.abs() <= 1).all(-1).flatten(1))
        assert 0 < inside.float().mean() < 1


def test_identical_views_map_every_token_centre_onto_itself():
    params = {"crop_box": torch.tensor([[[0.1, 0.2, 0.7, 0.9]], [[0.1, 0.2, 0.7, 0.9]]]),
              "flip": torch.tensor([[True], [True]])}
    coords, inside = token_correspondence(params, 0, 1, 4)
    centres = (torch.arange(4) * 2 + 1) / 4 - 1
    assert inside.all()
    assert torch.allclose(coords[0, :, :, 0], centres.expand(4, 4), atol=1e-6)
    assert torch.allclose(coords[0, :, :, 1], centres[:, None].expand(4, 4), atol=1e-6)
    tokens = torch.randn(1, 16, 5)
    assert torch.allclose(sample_token_map(tokens, 4, coords), tokens, atol=1e-6)


def test_loss_is_infonce_over_every_matched_token_of_the_batch():
    torch.manual_seed(0)
    b, grid, d, tau = 2, 3, 4, 0.5
    student, teacher = torch.randn(b, grid * grid, d), torch.randn(b, grid * grid, d)
    centres = (torch.arange(grid) * 2 + 1) / grid - 1
    coords = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).expand(b, grid, grid, 2)
    valid = torch.ones(b, grid * grid, dtype=torch.bool)
    valid[0, 4] = valid[1, 0] = False
    got = dense_correspondence_loss(student, teacher, coords, valid, grid, tau)
    # by hand: normalise, score every kept query against every kept key, -log of its own share
    q = [student[i, j] / student[i, j].norm() for i in range(b) for j in range(grid * grid) if valid[i, j]]
    k = [teacher[i, j] / teacher[i, j].norm() for i in range(b) for j in range(grid * grid) if valid[i, j]]
    terms = []
    for n, qn in enumerate(q):
        scores = [float(qn @ km) / tau for km in k]
        terms.append(-(scores[n] - math.log(sum(math.exp(s) for s in scores))))
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # matched features score far lower than shuffled ones
    assert float(dense_correspondence_loss(teacher, teacher, coords, valid, grid, 0.1)) < float(got)


def test_no_matched_token_gives_zero_with_a_gradient_path():
    student = torch.randn(2, 4, 3, requires_grad=True)
    coords = torch.zeros(2, 2, 2, 2)
    loss = dense_correspondence_loss(student, torch.randn(2, 4, 3), coords, torch.zeros(2, 4, dtype=torch.bool), 2, 0.2)
    loss.backward()
    assert float(loss.detach()) == 0.0 and student.grad is not None


def _tiny(**flags):
    return resolve({"config": "vit-tiny", "vit_depth": 1, "vit_dim": 32, "vit_heads": 2, "vit_mlp": 64,
                    "img_size": 16, "local_crops": 0, "out_dim": 16, "head_hidden": 16, "head_bottleneck": 8,
                    **flags}, hardware_preset="cpu", device_kind="cpu").cfg


@pytest.mark.parametrize("ibot", [0.0, 1.0])
def test_dense_term_enters_the_total_at_its_weight_and_trains_the_backbone(ibot):
    cfg = _tiny(dense_weight=2.0, ibot_weight=ibot, ibot_mask_probability=1.0)
    torch.manual_seed(0)
    ssl = DINOSSL(cfg, torch.device("cpu"))
    stacks = torch.randint(-1000, 1000, (6, 3, 24, 24), generator=torch.Generator().manual_seed(1))
    views = CTAugment(cfg.views.to_augment())(stacks.to(torch.int16), torch.Generator().manual_seed(2))
    masks = ssl.draw_masks(12, torch.Generator().manual_seed(3), torch.device("cpu")) if ibot else None
    seen = {}

    def backward(loss):
        seen["loss"] = loss
        loss.backward()

    values = ssl.forward_backward(views, {"teacher_temp": 0.04}, autocast=lambda: autocast(torch.device("cpu"), None),
                                  backward=backward, masks=masks)
    assert float(values["loss_dense"]) > 0
    expected = (values["loss_dino"] + cfg.ssl.koleo_weight * values["loss_koleo"]
                + cfg.ssl.ibot_weight * values["loss_ibot"] + 2.0 * values["loss_dense"]
                + values["gram_weight"] * values["loss_gram"])
    assert float(seen["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert ssl.student.backbone.patch_embed.weight.grad.abs().sum() > 0


def test_dense_term_off_contributes_nothing():
    cfg = _tiny(dense_weight=0.0)
    torch.manual_seed(0)
    ssl = DINOSSL(cfg, torch.device("cpu"))
    stacks = torch.randint(-1000, 1000, (4, 3, 24, 24), generator=torch.Generator().manual_seed(1))
    views = CTAugment(cfg.views.to_augment())(stacks.to(torch.int16), torch.Generator().manual_seed(2))
    values = ssl.forward_backward(views, {"teacher_temp": 0.04}, autocast=lambda: autocast(torch.device("cpu"), None),
                                  backward=lambda loss: None)
    assert float(values["loss_dense"]) == 0.0


@pytest.mark.parametrize("flags, match", [({"dense_weight": -1.0}, "--dense-weight"),
                                          ({"dense_weight": float("nan")}, "--dense-weight"),
                                          ({"dense_temp": 0.0}, "--dense-temp"),
                                          ({"dense_teacher_scale": 0}, "--dense-teacher-scale"),
                                          ({"dense_weight": 0.0, "dense_teacher_scale": 2}, "--dense-weight 0")])
def test_bad_dense_settings_are_refused(flags, match):
    with pytest.raises(UserError, match=match):
        _tiny(**flags)


def test_a_finer_teacher_map_is_sampled_at_the_same_points():
    """On a map of twice the grid, the centre of a coarse token lies on the corner of four
    fine tokens, so its bilinear key is their mean."""
    fine = torch.randn(2, 8 * 8, 5, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([0.1, 0.2, 0.7, 0.9]).expand(2, 2, 4)
    coords, inside = token_correspondence({"crop_box": box, "flip": torch.zeros(2, 2, dtype=torch.bool)}, 0, 1, 4)
    keys = sample_token_map(fine, 8, coords)
    blocks = fine.reshape(2, 4, 2, 4, 2, 5).mean((2, 4)).reshape(2, 16, 5)
    assert inside.all() and torch.allclose(keys, blocks, atol=1e-6)


def test_dense_keys_come_from_the_teacher_on_the_enlarged_views():
    """--dense-teacher-scale 2: the EMA teacher runs once more on the global views at twice
    their size, and the term is the InfoNCE against keys sampled from that finer map."""
    cfg = _tiny(dense_weight=1.0, dense_teacher_scale=2)
    torch.manual_seed(0)
    ssl = DINOSSL(cfg, torch.device("cpu"))
    seen = []
    ssl.teacher.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    stacks = torch.randint(-1000, 1000, (4, 3, 24, 24), generator=torch.Generator().manual_seed(1))
    views = CTAugment(cfg.views.to_augment())(stacks.to(torch.int16), torch.Generator().manual_seed(2))
    values = ssl.forward_backward(views, {"teacher_temp": 0.04}, autocast=lambda: autocast(torch.device("cpu"), None),
                                  backward=lambda loss: loss.backward())
    size = cfg.views.img_size
    assert seen == [size, 2 * size]
    assert torch.isfinite(values["loss_dense"]) and float(values["loss_dense"]) > 0


def test_a_gram_teacher_at_the_dense_keys_scale_reuses_their_forward():
    """With both teachers at 2x and the Gram teacher a copy of the EMA teacher, the Gram
    targets come from the dense keys' forward (the same computation on the same input): the
    Gram teacher does not run, and the Gram term is what its own forward gives."""
    losses = {}
    for dense_scale in (1, 2):
        cfg = _tiny(dense_weight=1.0, dense_teacher_scale=dense_scale, gram_teacher_scale=2)
        torch.manual_seed(0)
        ssl = DINOSSL(cfg, torch.device("cpu"))
        gram_calls = []
        ssl.gram_teacher.register_forward_hook(lambda module, args, out: gram_calls.append(args[0].shape[-1]))
        stacks = torch.randint(-1000, 1000, (4, 3, 24, 24), generator=torch.Generator().manual_seed(1))
        views = CTAugment(cfg.views.to_augment())(stacks.to(torch.int16), torch.Generator().manual_seed(2))
        assert ssl.gram_is_teacher
        values = ssl.forward_backward(views, {"teacher_temp": 0.04},
                                      autocast=lambda: autocast(torch.device("cpu"), None), backward=lambda loss: None)
        assert gram_calls == ([2 * cfg.views.img_size] if dense_scale == 1 else [])
        losses[dense_scale] = values["loss_gram"]
    assert torch.allclose(losses[1], losses[2], rtol=1e-5, atol=1e-7)
