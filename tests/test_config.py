"""dinox.config: the precedence of resolve(), resume rules, validation, the flat form."""
from __future__ import annotations

import math

import pytest

from dinox.config import (BASE_RECIPE, RECIPES, SHAPE_FIELDS, RunConfig, check_checkpoint_format,
                          config_from_checkpoint, prototypes_for_batch, resolve)
from dinox.errors import UserError
from dinox.run.device import HARDWARE_PRESETS


def tiny(**given):
    return resolve({"config": "vit-tiny", **given}, hardware_preset="cpu", device_kind="cpu")


def test_recipe_overrides_defaults():
    assert RunConfig().optim.lr == 5e-4
    cfg = tiny().cfg
    assert cfg.optim.lr == RECIPES["vit-tiny"]["lr"] == 1e-3
    assert cfg.model.head_bn is True and cfg.views.img_size == 64
    big = resolve({"config": "vit-large"}, hardware_preset="cpu").cfg
    assert big.model.vit_dim == 1024 and big.model.layerscale == BASE_RECIPE["layerscale"]


@pytest.mark.parametrize("batch, expected", [(1, 1024), (32, 1024), (33, 2048), (256, 8192), (2048, 65536),
                                             (4096, 65536)])
def test_prototypes_for_batch(batch, expected):
    """32 per image, a power of two, floored at 1024 and capped by the recipe."""
    assert prototypes_for_batch(batch, 65536) == expected
    assert prototypes_for_batch(batch, 4096) == min(expected, 4096)


def test_prototypes_follow_the_global_batch_unless_given_and_survive_a_resume():
    # the seeds' ViT-Large validation run on a 24 GB card: 64 x 4 = 256 images per step
    card = resolve({"config": "vit-large"}, hardware_preset="rtx4090")
    assert card.cfg.effective_batch == 256 and card.cfg.model.out_dim == 8192
    assert any("prototypes: 8192 for a global batch of 256" in n for n in card.notices)
    # eight such processes under torchrun share a step: 2048 images, the recipe's cap
    cluster = resolve({"config": "vit-large"}, hardware_preset="rtx4090", world_size=8)
    assert cluster.cfg.model.out_dim == BASE_RECIPE["out_dim"]
    assert not any("prototypes" in n for n in cluster.notices)
    given = resolve({"config": "vit-large", "out_dim": 65536}, hardware_preset="rtx4090")
    assert given.cfg.model.out_dim == 65536 and not any("prototypes" in n for n in given.notices)
    # a resume on another machine, with or without --config, keeps the checkpoint's head
    saved = card.cfg.to_flat()
    for flags in ({}, {"config": "vit-large"}):
        moved = resolve(flags, hardware_preset="h100", device_kind="cuda", saved=saved, world_size=8)
        assert moved.cfg.model.out_dim == 8192


def test_resume_keeps_the_shape_an_earlier_recipe_gave_the_checkpoint():
    """The seeds requeue with `--config vit-large --resume auto`: a checkpoint written under
    DINOv2's recipe values (before the big recipe changed) resumes with its own model."""
    old = {**resolve({"config": "vit-large"}, hardware_preset="rtx4090").cfg.to_flat(),
           "layerscale": 1e-5, "head_bn": False, "out_dim": 65536, "img_size": 512, "vit_patch": 16}
    resumed = resolve({"config": "vit-large", "vit_patch": 16}, hardware_preset="rtx4090", saved=old).cfg
    assert (resumed.model.layerscale, resumed.model.head_bn, resumed.model.out_dim, resumed.views.img_size) == (
        1e-5, False, 65536, 512)
    # a shape flag given on the resume is still checked against the checkpoint
    with pytest.raises(UserError, match="layerscale: checkpoint 1e-05, requested 0.1"):
        resolve({"config": "vit-large", "vit_patch": 16, "layerscale": 0.1}, hardware_preset="rtx4090", saved=old)


def test_hardware_preset_overrides_defaults_and_recipe_and_flags_override_it():
    h100 = HARDWARE_PRESETS["h100"]
    cfg = resolve({"config": "vit-large"}, hardware_preset="h100").cfg
    assert (cfg.optim.batch_size, cfg.optim.accumulation_steps) == (h100["batch_size"], h100["accumulation_steps"])
    assert cfg.runtime.hardware_preset == "h100" and cfg.runtime.custom_values == []
    resolved = resolve({"config": "vit-large", "batch_size": 16}, hardware_preset="h100")
    assert resolved.cfg.optim.batch_size == 16 and resolved.cfg.runtime.custom_values == ["batch_size"]
    assert any("custom optimizations active: batch_size=16" in line for line in resolved.preset_lines)


def test_explicit_flags_override_the_recipe():
    cfg = tiny(lr=2e-3, local_crops=0, head_bn=False).cfg
    assert (cfg.optim.lr, cfg.views.local_crops, cfg.model.head_bn) == (2e-3, 0, False)


def test_auto_device_becomes_the_detected_kind():
    assert tiny().cfg.runtime.device == "cpu"
    assert tiny(device="cuda").cfg.runtime.device == "cuda"


def test_checkpoint_overrides_recipe_and_flags_override_checkpoint():
    saved = tiny(lr=2e-3, koleo_weight=0.3, max_steps=100).cfg.to_flat()
    resumed = resolve({}, hardware_preset="cpu", saved=saved)
    assert resumed.cfg.optim.lr == 2e-3 and resumed.cfg.ssl.koleo_weight == 0.3
    assert resumed.changes == [] or all("resume" not in c for c in resumed.changes)
    flagged = resolve({"lr": 3e-3, "max_steps": 100}, hardware_preset="cpu", saved=saved)
    assert flagged.cfg.optim.lr == 3e-3
    assert "lr: 0.002 -> 0.003" in flagged.changes


def test_the_dense_term_is_the_tiny_recipes_and_a_checkpoint_without_it_resumes_without_it():
    assert tiny().cfg.ssl.dense_weight == 1.0 and tiny().cfg.ssl.dense_temp == 0.2
    assert resolve({"config": "vit-large"}, hardware_preset="rtx4090").cfg.ssl.dense_weight == 0.0
    saved = tiny(max_steps=100).cfg.to_flat()
    assert resolve({}, hardware_preset="cpu", saved=saved).cfg.ssl.dense_weight == 1.0
    del saved["dense_weight"]                 # written before the term existed: trained without it
    assert resolve({}, hardware_preset="cpu", saved=saved).cfg.ssl.dense_weight == 0.0
    assert resolve({"dense_weight": 0.5}, hardware_preset="cpu", saved=saved).cfg.ssl.dense_weight == 0.5


def test_the_2_5d_context_is_10_mm_and_a_checkpoint_without_it_keeps_the_adjacent_slices():
    assert tiny().cfg.views.context_mm == 10.0
    assert resolve({"config": "vit-large"}, hardware_preset="rtx4090").cfg.views.context_mm == 10.0
    assert tiny(context_mm=0.0).cfg.views.context_mm == 0.0
    saved = tiny(max_steps=100).cfg.to_flat()
    assert resolve({}, hardware_preset="cpu", saved=saved).cfg.views.context_mm == 10.0
    del saved["context_mm"]                   # written before the setting existed: trained on z-1, z, z+1
    assert resolve({}, hardware_preset="cpu", saved=saved).cfg.views.context_mm == 0.0
    assert resolve({"context_mm": 3.0}, hardware_preset="cpu", saved=saved).cfg.views.context_mm == 3.0
    for bad in (-1.0, float("nan"), 500.0):
        with pytest.raises(UserError, match="--context-mm"):
            tiny(context_mm=bad)


def test_resume_takes_this_machines_hardware_values():
    saved = resolve({"config": "vit-large"}, hardware_preset="rtx4090").cfg.to_flat()
    assert (saved["batch_size"], saved["accumulation_steps"], saved["num_workers"]) == (64, 4, 8)
    moved = resolve({}, hardware_preset="h100", device_kind="cuda", saved=saved).cfg
    assert (moved.optim.batch_size, moved.optim.accumulation_steps) == (128, 2)
    assert moved.runtime.hardware_preset == "h100"
    assert moved.effective_batch == 256 == saved["batch_size"] * saved["accumulation_steps"]


def test_resume_keeps_the_checkpoints_shape():
    saved = resolve({"config": "vit-small", "img_size": 98}, hardware_preset="cpu").cfg.to_flat()
    # No --config on resume: the checkpoint's model, not vit-tiny's.
    resumed = resolve({}, hardware_preset="cpu", saved=saved).cfg
    assert resumed.shape() == {k: saved[k] for k in SHAPE_FIELDS}
    assert resumed.model.preset == "vit-small"
    # A shape flag that disagrees names the field and the flags that would match.
    with pytest.raises(UserError) as err:
        resolve({"vit_dim": 64}, hardware_preset="cpu", saved=saved)
    assert "vit_dim: checkpoint 384, requested 64" in str(err.value)
    assert "--config vit-small" in str(err.value) and "--img-size 98" in str(err.value)
    with pytest.raises(UserError):
        resolve({"config": "vit-tiny"}, hardware_preset="cpu", saved=saved)


def test_prototype_norm_is_part_of_the_shape_and_older_checkpoints_are_fixed():
    free = tiny(prototype_norm="free").cfg
    assert free.model.prototype_norm == "free"
    assert resolve({}, hardware_preset="cpu", saved=free.to_flat()).cfg.model.prototype_norm == "free"
    with pytest.raises(UserError, match="prototype_norm: checkpoint 'free', requested 'learned'"):
        resolve({"prototype_norm": "learned"}, hardware_preset="cpu", saved=free.to_flat())
    older = {k: v for k, v in tiny().cfg.to_flat().items() if k != "prototype_norm"}  # before the flag existed
    assert resolve({}, hardware_preset="cpu", saved=older).cfg.model.prototype_norm == "fixed"


def test_resume_announces_a_new_run_length():
    saved = tiny(max_steps=100).cfg.to_flat()
    resumed = resolve({"max_steps": 200}, hardware_preset="cpu", saved=saved)
    assert resumed.cfg.optim.max_steps == 200
    assert any("--max-steps 200 differs" in n for n in resumed.notices)


def test_short_runs_shorten_recipe_warmups_but_never_given_values():
    resolved = tiny(max_steps=10)
    assert resolved.cfg.optim.warmup_steps == 1  # 20 > 10 steps: 10% of the run
    assert any("warm-up 20 steps is longer" in n for n in resolved.notices)
    kept = tiny(max_steps=10, warmup_steps=15)
    assert kept.cfg.optim.warmup_steps == 15


def test_ema_final_weights_against_a_hand_computed_and_a_simulated_teacher():
    import torch

    from dinox.run.schedules import cosine, ema_final_weights

    # two steps at m = 0.5: teacher = 0.25 init + 0.25 student_1 + 0.5 student_2
    mix = ema_final_weights(lambda t: 0.5, 2)
    assert mix.untrained == pytest.approx(0.25)
    assert mix.lag == pytest.approx(1 - (0.25 * 1 + 0.5 * 2) / 2)
    # against the EMA itself: a teacher over one-hot "students" holds each one's weight
    steps = 37
    schedule = [cosine(t, 0.9, 1.0, steps) for t in range(steps)]
    teacher = torch.zeros(steps + 1, dtype=torch.float64)
    teacher[0] = 1.0  # the untrained network
    for t, m in enumerate(schedule):
        student = torch.zeros_like(teacher)
        student[t + 1] = 1.0
        teacher.lerp_(student, 1.0 - m)
    mix = ema_final_weights(lambda t: schedule[t], steps)
    assert mix.untrained == pytest.approx(teacher[0].item())
    centre = (teacher * torch.arange(steps + 1)).sum().item() / steps
    assert mix.lag == pytest.approx(1 - centre)


def test_short_runs_hold_the_teacher_momentum_flat_but_never_given_values():
    from dinox.run.schedules import MAX_TEACHER_LAG, UNLIMITED_MOMENTUM_END, ema_final_weights
    from dinox.train.optim import Schedules

    def momenta(resolved, steps):
        sched = Schedules.from_config(resolved.cfg)
        return [sched.at(t)["teacher_momentum"] for t in range(steps)]

    demo = tiny(max_steps=220)
    assert set(momenta(demo, 220)) == {RECIPES["vit-tiny"]["momentum"]}
    from dinox.commands.demo import DEMO_STEPS
    assert set(momenta(tiny(max_steps=DEMO_STEPS), DEMO_STEPS)) == {RECIPES["vit-tiny"]["momentum"]}
    assert any("11% untrained and 62% of the run behind" in n for n in demo.notices)
    # the recipe's values stay the run's settings, so a longer resume can refit them
    assert (demo.cfg.ssl.momentum, demo.cfg.ssl.momentum_end) == (0.98, 1.0) and demo.cfg.ssl.fit_momentum
    # the seeds' ViT-Large validation run: a flat momentum low enough for the bound
    big = resolve({"config": "vit-large", "max_steps": 384}, hardware_preset="cpu")
    flat = set(momenta(big, 384))
    assert len(flat) == 1
    fitted = flat.pop()
    assert fitted < BASE_RECIPE["momentum"]
    lag = ema_final_weights(lambda t: fitted, 384).lag
    assert MAX_TEACHER_LAG - 0.01 < lag <= MAX_TEACHER_LAG
    # a long run keeps the official schedule; an unlimited one ends it short of a frozen teacher
    long = resolve({"config": "vit-large", "max_steps": 100_000}, hardware_preset="cpu")
    sched = Schedules.from_config(long.cfg)
    assert (sched.momentum, sched.momentum_end) == (BASE_RECIPE["momentum"], BASE_RECIPE["momentum_end"])
    assert not any("teacher momentum" in n for n in long.notices)
    endless = Schedules.from_config(resolve({"config": "vit-large"}, hardware_preset="cpu").cfg)
    assert (endless.momentum, endless.momentum_end) == (BASE_RECIPE["momentum"], UNLIMITED_MOMENTUM_END)
    # a given momentum is never changed, and the choice survives a resume
    for given in ({"momentum_end": 1.0}, {"momentum": 0.98}):
        kept = tiny(max_steps=220, **given)
        assert momenta(kept, 220)[-1] > 0.9999 and not kept.cfg.ssl.fit_momentum
        assert not any("teacher momentum" in n for n in kept.notices)
        resumed = resolve({"resume": "x.pth", "max_steps": 220}, hardware_preset="cpu", device_kind="cpu",
                          saved=kept.cfg.to_flat())
        assert momenta(resumed, 220)[-1] > 0.9999
    # a 384-step run resumed for the long production run returns to the recipe's schedule
    resumed = resolve({"resume": "x.pth", "max_steps": 100_000}, hardware_preset="cpu", device_kind="cpu",
                      saved=big.cfg.to_flat())
    sched = Schedules.from_config(resumed.cfg)
    assert (sched.momentum, sched.momentum_end) == (BASE_RECIPE["momentum"], BASE_RECIPE["momentum_end"])


@pytest.mark.parametrize("name,value", [
    ("lr", math.nan), ("lr", math.inf), ("teacher_temp", math.nan), ("weight_decay", -0.1),
    ("clip_grad", -1.0), ("drop_path", 2.0), ("lr", 0.0), ("gram_weight", 0.0), ("center_momentum", 1.5),
    ("dino_local_weight", -0.5), ("dino_local_weight", math.nan),
    # no masked image with iBOT on: the first step failed on an empty max() (measured)
    ("ibot_mask_probability", 0.0),
])
def test_invalid_settings_are_one_line_errors(name, value):
    with pytest.raises(UserError) as err:
        tiny(**{name: value})
    assert "\n" not in str(err.value) and "--" in str(err.value)


def test_flat_form_round_trips_and_keeps_format_1_names():
    cfg = tiny(lr=7e-4, eval_every=5).cfg
    flat = cfg.to_flat()
    assert flat["config"] == "vit-tiny" and flat["lr"] == 7e-4 and flat["eval_every"] == 5
    assert RunConfig.from_flat(flat) == cfg
    # A format-1 checkpoint's config (flat, with a key this version does not know) loads.
    state = {"format": "dinox-checkpoint", "format_version": 1, "config": {**flat, "retired_setting": 1}}
    assert config_from_checkpoint(state) == cfg


def test_checkpoint_format_is_checked():
    with pytest.raises(UserError, match="newer"):
        check_checkpoint_format({"format": "dinox-checkpoint", "format_version": 99})
    with pytest.raises(UserError, match="not a dinox checkpoint"):
        check_checkpoint_format({"format": "something-else", "format_version": 1})
    with pytest.raises(UserError, match=r"^other\.pth is not a dinox checkpoint"):
        check_checkpoint_format({"format": None}, "other.pth")


def test_warmups_follow_the_official_linspace():
    """DINOv2's warm-up is np.linspace(start, end, W): the last warm-up step runs at the full value."""
    import numpy as np

    from dinox.run.schedules import linear_warmup, warmup_cosine

    lr = [warmup_cosine(t, 1e-3, 1e-6, 20, 100) for t in range(20)]
    assert np.allclose(lr, np.linspace(0.0, 1e-3, 20))
    assert warmup_cosine(20, 1e-3, 1e-6, 20, 100) == 1e-3  # the cosine starts at the peak
    temps = [linear_warmup(t, 0.04, 0.07, 30) for t in range(30)]
    assert np.allclose(temps, np.linspace(0.04, 0.07, 30)) and linear_warmup(30, 0.04, 0.07, 30) == 0.07


def test_flags_made_inert_by_the_run_are_named():
    """A local-crop or iBOT-mask flag given while that part is off changes nothing; the run
    says so instead of looking tuned. With the part on, no notice."""
    off = tiny(local_crops=0, dino_local_weight=0.5, local_size=16, ibot_weight=0.0, ibot_mask_probability=1.0)
    assert "--dino-local-weight, --local-size have no effect: --local-crops is 0" in off.notices
    assert "--ibot-mask-probability has no effect: --ibot-weight is 0" in off.notices
    on = tiny(local_crops=4, dino_local_weight=0.5, ibot_mask_probability=1.0)
    assert not any("no effect" in n for n in on.notices)
    flat = tiny(teacher_temp_start=0.02)
    assert ("--teacher-temp-start has no effect: --teacher-temp-warmup-steps is 0 (the teacher temperature is "
            "flat)") in flat.notices
    assert not any("no effect" in n for n in tiny(teacher_temp_start=0.02, teacher_temp_warmup_steps=5).notices)


def test_a_backbone_frozen_past_the_run_is_named():
    frozen = tiny(max_steps=3, freeze_backbone_steps=10)
    assert ("--freeze-backbone-steps 10 >= --max-steps 3: the backbone stays frozen for the whole run (only the "
            "heads learn)") in frozen.notices
    assert not any("frozen" in n for n in tiny(max_steps=30, freeze_backbone_steps=10).notices)


def test_resume_on_the_same_hardware_keeps_the_runs_own_batch():
    """A batch size the run chose by flag survives a resume on the same hardware preset that
    does not repeat the flag; on other hardware the new preset applies; a flag given wins."""
    saved = tiny(batch_size=4, num_workers=1).cfg.to_flat()
    same = resolve({}, hardware_preset="cpu", device_kind="cpu", saved=saved)
    assert (same.cfg.optim.batch_size, same.cfg.runtime.num_workers) == (4, 1)
    assert same.cfg.runtime.custom_values == ["batch_size", "num_workers"]
    assert not any("batch_size" in c for c in same.changes)
    assert any("the run's own batch_size=4, num_workers=1 kept" in n for n in same.notices)
    given = resolve({"batch_size": 8}, hardware_preset="cpu", device_kind="cpu", saved=saved).cfg
    assert (given.optim.batch_size, given.runtime.num_workers) == (8, 1)
    moved = resolve({}, hardware_preset="h100", device_kind="cuda", saved=saved).cfg
    assert moved.optim.batch_size == 128 and moved.runtime.custom_values == []


@pytest.mark.parametrize("saved, wanted, unwanted", [
    ({"swiglu": False, "ibot_head": True, "ibot_weight": 0.5}, ["--no-swiglu", "--ibot-weight 0.5"], ["--swiglu "]),
    ({"swiglu": True, "ibot_head": False, "ibot_weight": 0.0}, ["--swiglu", "--ibot-weight 0"], ["--no-swiglu"]),
    ({"swiglu": False, "ibot_head": True}, ["--ibot-weight 1.0"], []),
])
def test_matching_flags_rebuild_the_checkpoints_swiglu_and_ibot_head(saved, wanted, unwanted):
    """Following the advice must give the checkpoint's shape: a run without SwiGLU resumed
    with --swiglu needs --no-swiglu, one with an iBOT head resumed with --ibot-weight 0 needs
    a positive weight."""
    from dinox.config import matching_flags

    flags = matching_flags({"config": "vit-tiny", **saved}) + " "
    assert all(w + " " in flags for w in wanted) and not any(u in flags for u in unwanted)


@pytest.mark.parametrize("value, said", [("64", "vit_dim is '64', not an integer"), (None, "vit_dim is None"),
                                         (64.0, "not an integer"), (True, "not an integer")])
def test_a_shape_value_of_another_type_is_named(value, said):
    from dinox.config import shape_value_problem

    assert said in shape_value_problem({"vit_dim": value})
    assert shape_value_problem({"vit_dim": 64, "layerscale": None, "swiglu": False, "ln_eps": 1}) is None
    assert "swiglu is 0, not true or false" == shape_value_problem({"swiglu": 0})


@pytest.mark.parametrize("preset", ["vit-tiny", "vit-small", "vit-base", "vit-large", "vit-giant"])
def test_no_recipe_warns_of_itself(preset):
    for hardware in ("cpu", "rtx4090", "amd395"):
        assert resolve({"config": preset}, hardware_preset=hardware).warnings == []


def test_a_learning_rate_an_order_above_the_recipes_is_warned_not_refused():
    warned = tiny(lr=0.5)
    assert warned.cfg.optim.lr == 0.5
    assert warned.warnings == ["--lr 0.5 is 500x the vit-tiny recipe's 0.001 for a global batch of 32 (DINO scales "
                               "it as base x batch / 256): AdamW on a ViT usually diverges there (the anomaly guard "
                               "stops a run whose loss does)"]
    assert tiny(lr=0.009).warnings == []                     # under 10x the recipe's
    # the bound follows DINO's linear scaling with the global batch: 0.02 at 256 x 4 ranks (5e-4 x 4 x 10)
    large = {"config": "vit-large", "lr": 0.015}
    assert resolve(large, hardware_preset="rtx4090", world_size=4).warnings == []
    assert resolve(large, hardware_preset="rtx4090", world_size=1).warnings[0].startswith("--lr 0.015 is 30x")
    assert resolve({**large, "lr": 0.025}, hardware_preset="rtx4090", world_size=4).warnings[0].startswith(
        "--lr 0.025 is 12x the vit-large recipe's 0.002 for a global batch of 1024")   # against the scaled rate


@pytest.mark.parametrize("given", [{"teacher_temp": 0.1}, {"student_temp": 0.02},
                                   {"teacher_temp_start": 0.2, "teacher_temp_warmup_steps": 10}])
def test_a_teacher_no_sharper_than_its_student_is_warned(given):
    warnings = tiny(**given).warnings
    assert len(warnings) == 1 and warnings[0].startswith("the teacher is no sharper than the student")
    assert "student 0.1" in warnings[0] and "vit-tiny 0.02" in warnings[0]


def test_a_flat_teacher_temperature_ignores_its_unused_start():
    assert tiny(teacher_temp_start=0.5, teacher_temp_warmup_steps=0).warnings == []


def test_a_resume_warns_of_what_it_keeps_past_a_new_length_and_of_a_changed_batch():
    saved = resolve({"config": "vit-large"}, hardware_preset="rtx4090").cfg.to_flat()   # unlimited
    shorter = resolve({"max_steps": 1000}, hardware_preset="rtx4090", saved=saved)
    assert shorter.cfg.optim.warmup_steps == 2500                 # the run's own, kept
    text = " | ".join(shorter.warnings)
    assert "--warmup-steps 2500 (the run's) is at or past --max-steps 1000" in text
    assert "--freeze-last-layer-steps 1250" in text and "--gram-start-step 2500" in text
    assert resolve({}, hardware_preset="rtx4090", saved=saved).warnings == []
    # another preset's batch: 64 x 4 -> the CPU preset's 32 x 1
    moved = resolve({}, hardware_preset="cpu", saved=saved)
    assert any(w.startswith("the effective batch per rank changes on resume: 256 -> 32") and
               "--batch-size 64 --accumulation-steps 4" in w for w in moved.warnings)
    # a checkpoint older than the run-length momentum fit keeps DINO's cosine, and says no change
    old = dict(saved)
    del old["fit_momentum"]
    again = resolve({}, hardware_preset="rtx4090", saved=old)
    assert again.cfg.ssl.fit_momentum is False and not any("fit_momentum" in c for c in again.changes)
