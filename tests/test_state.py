"""train/state.py: the checkpoint schema packs and unpacks every stateful component."""
from __future__ import annotations

import pytest
import torch

from dinox.config import resolve
from dinox.data.augment import CTAugment
from dinox.errors import UserError
from dinox.losses.gram import gram_anchoring_loss
from dinox.observe.anomaly import AnomalyGuard
from dinox.run import checkpoint as store
from dinox.train.optim import autocast, build_optimizer, build_scaler
from dinox.train.ssl import DINOSSL
from dinox.train.state import Components, Placement, Progress, pack, unpack

DEVICE = torch.device("cpu")


def small_config(**flags):
    return resolve({"config": "vit-tiny", "vit_depth": 1, "vit_dim": 32, "vit_heads": 2, "vit_mlp": 64,
                    "img_size": 16, "local_crops": 0, "out_dim": 16, "head_hidden": 16, "head_bottleneck": 8,
                    "max_steps": 10, **flags}, hardware_preset="cpu", device_kind="cpu").cfg


def components(cfg, seed: int) -> Components:
    torch.manual_seed(seed)
    ssl = DINOSSL(cfg, DEVICE)
    optimizer = build_optimizer(ssl.student)
    return Components(Progress(), ssl, optimizer, build_scaler(DEVICE, None),
                      torch.Generator().manual_seed(seed), AnomalyGuard())


def train_one_step(c: Components, cfg) -> None:
    stacks = torch.randint(-1000, 1000, (4, 3, 24, 24), generator=torch.Generator().manual_seed(1)).to(torch.int16)
    views = CTAugment(cfg.views.to_augment())(stacks, c.aug_generator)
    sched = {"teacher_temp": 0.04}
    c.ssl.forward_backward(views, sched, autocast=lambda: autocast(DEVICE, None), backward=lambda loss: loss.backward())
    c.optimizer.step()
    c.optimizer.zero_grad()
    c.ssl.finish_step(0.9)
    c.ssl.maybe_refresh_gram_teacher(c.ssl.ssl.gram_refresh_every)
    c.progress.step, c.progress.consumed = 1, 4
    for step, loss in enumerate((3.0, 2.9, 2.8)):
        c.guard.check(step, loss, emb_std=0.2)


def leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


@pytest.mark.parametrize("centering", ["centering", "sinkhorn"])
def test_every_component_round_trips_through_a_checkpoint_file(tmp_path, centering):
    cfg = small_config(centering=centering)
    where = Placement(rank=0, world_size=1, device=DEVICE, samples=40)
    trained = components(cfg, seed=0)
    train_one_step(trained, cfg)
    torch.manual_seed(1234)
    state = pack(trained, cfg, where, provenance={"git_commit": "abc"}, hardware={"kind": "cpu"})
    for section in ("student", "teacher", "gram_teacher", "gram_snapshot_step", "dino_loss", "optimizer", "scaler",
                    "schedules", "rng", "aug_generator", "data", "anomaly", "config", "model", "provenance"):
        assert section in state, section
    assert state["optimizer"]["state"], "AdamW moments exist after a step"
    # the EMA centre moves with every step; Sinkhorn-Knopp (the tiny recipe's) leaves it unused
    assert (float(state["dino_loss"]["center"].abs().sum()) > 0) == (centering == "centering")
    assert state["gram_snapshot_step"] == cfg.ssl.gram_refresh_every

    path = store.checkpoint_path(tmp_path, 1)
    store.save_checkpoint(path, state)
    loaded = store.load_checkpoint(path)

    fresh = components(cfg, seed=99)  # other weights, other generator, empty optimizer
    torch.manual_seed(5)
    unpack(loaded, fresh, cfg, where)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    repacked = pack(fresh, cfg, where, provenance={"git_commit": "abc"}, hardware={"kind": "cpu"})
    a, b = dict(leaves(state)), dict(leaves(repacked))
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), key


def test_unpack_refuses_other_formats():
    cfg = small_config()
    where = Placement(0, 1, DEVICE, 40)
    c = components(cfg, seed=0)
    state = pack(c, cfg, where, provenance={}, hardware={})
    state["format_version"] = 2
    with pytest.raises(UserError, match="newer than this dinox reads"):
        unpack(state, c, cfg, where)


def test_world_size_change_keeps_the_global_data_position():
    cfg = small_config()
    c = components(cfg, seed=0)
    c.progress.consumed = 12
    state = pack(c, cfg, Placement(0, 2, DEVICE, 40), provenance={}, hardware={})
    assert state["data"]["consumed_global"] == 24
    other = components(cfg, seed=0)
    unpack(state, other, cfg, Placement(0, 4, DEVICE, 40))
    assert other.progress.consumed == 6


def test_high_resolution_gram_teacher_sees_the_views_enlarged():
    """--gram-teacher-scale 2: the Gram teacher runs on the global views at twice their size
    and its patch grid comes back to the student's, so the Gram term stays defined."""
    from dinox.config import with_values

    cfg = with_values(small_config(), gram_teacher_scale=2)
    c = components(cfg, seed=0)
    seen = []
    c.ssl.gram_teacher.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    stacks = torch.randint(-1000, 1000, (4, 3, 24, 24), generator=torch.Generator().manual_seed(1)).to(torch.int16)
    views = CTAugment(cfg.views.to_augment())(stacks, c.aug_generator)
    values = c.ssl.forward_backward(views, {"teacher_temp": 0.04}, autocast=lambda: autocast(DEVICE, None),
                                    backward=lambda loss: loss.backward())
    assert seen == [2 * cfg.views.img_size]
    assert torch.isfinite(values["loss_gram"]) and values["loss_gram"] > 0
    with pytest.raises(UserError, match="--gram-teacher-scale"):
        resolve({"config": "vit-tiny", "gram_teacher_scale": 0}, hardware_preset="cpu", device_kind="cpu")


@pytest.mark.parametrize("start,every,runs", [
    (3, 2, [False, False, False, False, True, False]),  # following (0-2), snapshot 3, frozen 4, refreshed 5
    (2, 1, [False] * 6),                                 # the tiny recipe: the EMA teacher every step
])
def test_gram_teacher_forward_is_skipped_only_while_it_holds_the_teachers_weights(start, every, runs):
    """While the Gram teacher is a fresh copy of the EMA teacher (the warm-up, each refresh
    step) its features are the teacher's own and its forward is skipped; the Gram loss is
    bitwise the one its own forward gives. After an EMA update it runs again."""
    from dinox.config import with_values

    cfg = with_values(small_config(), gram_start_step=start, gram_refresh_every=every)
    c = components(cfg, seed=0)
    calls = []
    c.ssl.gram_teacher.register_forward_hook(lambda module, args, out: calls.append(1))
    stacks = torch.randint(-1000, 1000, (4, 3, 24, 24), generator=torch.Generator().manual_seed(1)).to(torch.int16)
    augment = CTAugment(cfg.views.to_augment())

    ran = []
    for step in range(6):
        views = augment(stacks, torch.Generator().manual_seed(step))
        c.ssl.maybe_refresh_gram_teacher(step)
        before = len(calls)
        values = c.ssl.forward_backward(views, {"teacher_temp": 0.04}, autocast=lambda: autocast(DEVICE, None),
                                        backward=lambda loss: loss.backward(), step=step)
        ran.append(len(calls) > before)
        with torch.no_grad():  # the Gram term with the Gram teacher's own forward
            globals_ = torch.cat(views.global_views)
            direct = c.ssl.gram_teacher(globals_)["patches"]
            expected = gram_anchoring_loss(c.ssl.student(globals_)["patches"], direct)
            if not ran[-1]:
                assert torch.equal(direct, c.ssl.teacher(globals_)["patches"])
        assert torch.allclose(values["loss_gram"], expected, rtol=1e-6, atol=0)
        c.optimizer.step()
        c.optimizer.zero_grad()
        c.ssl.finish_step(0.9)
    assert ran == runs
    c.ssl.finish_step(0.9)
    assert not c.ssl.gram_is_teacher


def test_tiny_recipe_gram_teacher_is_the_ema_teacher_and_base_snapshots():
    tiny = resolve({"config": "vit-tiny"}, hardware_preset="cpu", device_kind="cpu").cfg.ssl
    base = resolve({"config": "vit-small"}, hardware_preset="cpu", device_kind="cpu").cfg.ssl
    assert (tiny.gram_refresh_every, base.gram_refresh_every) == (1, 1000)
