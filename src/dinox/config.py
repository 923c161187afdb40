"""The run configuration: one section per component, the recipes, and ONE `resolve()`.

A run is described by `RunConfig`, whose sections are handed to the component that owns
them (model -> dinox.model, views -> the augmentation, optim -> optimizer and schedules,
ssl -> the losses and the teacher, runtime -> device and processes, io -> data and
checkpoints, watch -> logging, monitoring, anomaly guard).

`resolve()` applies the precedence, lowest first:

    dataclass defaults < model recipe < hardware preset < checkpoint (on resume) < explicit flags

The checkpoint level covers everything that defines the run except what belongs to this
launch (`LAUNCH_KEYS`: the hardware keys, the device, the output root, the step budget),
so a run resumed on another machine takes that machine's batch split and workers.

Checkpoints store the flat form (`RunConfig.to_flat()`: every field under its own name,
the model preset under "config"); that is checkpoint format 1, read by `from_flat`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from dinox.data.augment import AugmentConfig
from dinox.data.layout import root_of_index
from dinox.errors import UserError
from dinox.model.presets import PRESETS, resolve_arch, validate_arch
from dinox.model.vit import ViTArch
from dinox.run.device import PRESET_KEYS, apply_hardware_preset
from dinox.run.schedules import TeacherFit, fit_teacher_momentum, unlimited_momentum_end

MODEL_CHOICES = [*PRESETS, "custom"]
DEVICE_CHOICES = ["auto", "cuda", "rocm", "mps", "cpu"]
CHECKPOINT_FORMAT = "dinox-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """The networks: ViT backbone and DINO head (everything but the input size)."""

    preset: str = "vit-tiny"
    vit_patch: int = PRESETS["vit-tiny"].patch_size
    vit_dim: int = PRESETS["vit-tiny"].embed_dim
    vit_depth: int = PRESETS["vit-tiny"].depth
    vit_heads: int = PRESETS["vit-tiny"].num_heads
    vit_mlp: int = PRESETS["vit-tiny"].mlp_dim
    swiglu: bool = False
    registers: int = 4
    layerscale: float = 1e-5
    rope: bool = False  # DINOv3 layout: rotary positions (base `rope_base`), a masked key bias
    rope_base: float = 100.0
    mask_k_bias: bool = False
    ln_eps: float = 1e-6
    drop_path: float = 0.0
    out_dim: int = 1024
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    head_bn: bool = False
    prototype_norm: str = "fixed"  # the head's last layer (dinox.model.head): fixed / learned / free
    ibot_head: bool = False  # set by resolve() from ssl.ibot_weight > 0

    def arch(self) -> ViTArch:
        return ViTArch(
            patch_size=self.vit_patch,
            embed_dim=self.vit_dim,
            depth=self.vit_depth,
            num_heads=self.vit_heads,
            mlp_hidden_dim=self.vit_mlp,
            swiglu=self.swiglu,
            num_registers=self.registers,
            layerscale_init=self.layerscale if self.layerscale > 0 else None,
            rope=self.rope,
            rope_base=self.rope_base,
            mask_k_bias=self.mask_k_bias,
            ln_eps=self.ln_eps,
        )


@dataclass
class ViewsConfig:
    """The 2.5D stack each sample is read as, and the two global views (and local crops)
    cut from it."""

    # The stack's neighbours are the slices nearest `context_mm` above and below slice z
    # (dinox.data.dataset.slice_gap); 0 stacks the adjacent slices z-1, z, z+1, which is
    # also what a checkpoint written without this setting trained on.
    context_mm: float = 0.0
    img_size: int = 64
    local_crops: int = 0
    local_size: int = 32
    global_scale_min: float = 0.5
    distinct_windows: bool = True
    standardize_views: bool = False
    local_scale_min: float = 0.1
    local_scale_max: float = 0.5

    def to_augment(self) -> AugmentConfig:
        return AugmentConfig(
            global_size=self.img_size,
            local_size=self.local_size,
            n_local=self.local_crops,
            global_scale=(self.global_scale_min, 1.0),
            local_scale=(self.local_scale_min, self.local_scale_max),
            distinct_global_windows=self.distinct_windows,
            standardize=self.standardize_views,
        )


@dataclass
class OptimConfig:
    """Optimizer, batch and the learning-rate / weight-decay schedules."""

    max_steps: int | None = None
    batch_size: int = 32
    accumulation_steps: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 2500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 0
    freeze_backbone_steps: int = 0  # warm start: only the heads learn for the first steps
    horizon: int = 100_000


@dataclass
class SSLConfig:
    """The self-supervised objective: teacher EMA, temperatures, centring, loss weights."""

    momentum: float = 0.994
    momentum_end: float = 1.0
    # fit the momentum to a short run (`dinox.run.schedules.fit_teacher_momentum`); off
    # where --momentum or --momentum-end is given
    fit_momentum: bool = True
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_steps: int = 0
    student_temp: float = 0.1
    centering: str = "centering"
    center_momentum: float = 0.9
    koleo_weight: float = 0.1
    # DINOv3's `reweight_dino_local_loss`: the local crops' DINO pairs count this much
    # against the global pairs' 1 (its 7B Gram-anchoring phase ends at 0.5)
    dino_local_weight: float = 1.0
    ibot_weight: float = 0.0  # 0: no iBOT (checkpoints written before iBOT existed)
    ibot_mask_ratio_min: float = 0.1
    ibot_mask_ratio_max: float = 0.5
    ibot_mask_probability: float = 0.5
    # the dense correspondence term (`dinox.losses.dense`); 0 leaves it out
    dense_weight: float = 0.0
    dense_temp: float = 0.2
    # the dense term's keys come from the EMA teacher on the global views enlarged this many
    # times (bicubic), its finer token map sampled at the same points (1: the teacher's own map)
    dense_teacher_scale: int = 1
    gram_weight: float = 1.0
    gram_refresh_every: int = 1000
    gram_start_step: int = 0  # first frozen Gram snapshot; before it the Gram teacher follows the EMA teacher
    # the Gram teacher sees the global views at this many times their size, its patch grid
    # brought back to the student's bicubically (DINOv3's high-resolution Gram teacher)
    gram_teacher_scale: int = 1

    def masking(self):
        from dinox.data.masking import MaskingConfig

        return MaskingConfig(ratio_range=(self.ibot_mask_ratio_min, self.ibot_mask_ratio_max),
                             sample_probability=self.ibot_mask_probability)


@dataclass
class RuntimeConfig:
    """Where and how the run executes (device, precision, processes, seed)."""

    device: str = "auto"
    amp: bool = False
    grad_checkpoint: bool = False
    compile: bool = False
    # Under torchrun: "ddp" replicates the networks on every rank, "fsdp" shards them (FSDP2).
    parallel: str = "ddp"
    num_workers: int = 0
    pin_memory: bool = False
    seed: int = 0
    hardware_preset: str = ""
    custom_values: list[str] = field(default_factory=list)


@dataclass
class IOConfig:
    """Data in, runs and checkpoints out."""

    data_root: str = "data/processed"
    index_csv: str | None = None
    split_manifest: str | None = None
    init_from: str | None = None  # pretrained backbone weights (DINOv2 / DINOv3 / transformers / dinox)
    out: str = "data/runs"
    resume: str | None = None
    ckpt_every: int = 100
    ckpt_keep_last: int = 5
    ckpt_milestone_every: int = 0
    ckpt_keep_emergency: int = 3   # the newest emergency checkpoints kept; 0 keeps every one


@dataclass
class WatchConfig:
    """Logging, monitoring, in-training evaluation and the anomaly guard."""

    monitor_every: int = 1000
    eval_every: int = 0
    eval_n: int = 512
    probe_every: int = 0  # labelled nodule probes (needs _labels/nodules.csv in the processed root)
    log_interval: float = 10.0
    log_every: int = 1
    halt_on_anomaly: bool = False
    collapse_std: float = 0.01
    spike_factor: float = 2.0


SECTIONS = {
    "model": ModelConfig, "views": ViewsConfig, "optim": OptimConfig, "ssl": SSLConfig,
    "runtime": RuntimeConfig, "io": IOConfig, "watch": WatchConfig,
}
# Flat name (as in checkpoints, config.json and the flags) -> (section, field).
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    ("config" if f.name == "preset" else f.name): (section, f.name)
    for section, cls in SECTIONS.items() for f in fields(cls)
}
# Fields that define the learned model: a checkpoint only resumes with the same values.
SHAPE_FIELDS = (
    "vit_patch", "vit_dim", "vit_depth", "vit_heads", "vit_mlp", "swiglu", "registers", "layerscale", "head_bn",
    "prototype_norm", "out_dim", "head_hidden", "head_bottleneck", "head_layers", "img_size", "ibot_head", "rope",
    "rope_base", "mask_k_bias", "ln_eps",
)
# What belongs to this launch rather than to the run: never taken from a checkpoint.
# `--max-steps unlimited`: train until stopped, also where a resumed checkpoint had a budget.
UNLIMITED_STEPS = 0
LAUNCH_KEYS = (*PRESET_KEYS, "device", "parallel", "hardware_preset", "custom_values", "max_steps", "out", "resume")
PARALLEL_CHOICES = ("ddp", "fsdp")


@dataclass
class RunConfig:
    """Every resolved setting of a run, one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    io: IOConfig = field(default_factory=IOConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step on one process."""
        return self.optim.batch_size * self.optim.accumulation_steps

    def get(self, name: str):
        section, attr = FLAT_FIELDS[name]
        return getattr(getattr(self, section), attr)

    def to_flat(self) -> dict:
        return {name: self.get(name) for name in FLAT_FIELDS}

    def shape(self) -> dict:
        return {name: self.get(name) for name in SHAPE_FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_flat(cls, flat: dict) -> "RunConfig":
        """Build from a flat dict (checkpoint format 1); unknown keys are ignored, missing
        ones take the defaults."""
        parts: dict[str, dict] = {name: {} for name in SECTIONS}
        for name, value in flat.items():
            if name in FLAT_FIELDS:
                section, attr = FLAT_FIELDS[name]
                parts[section][attr] = value
        return cls(**{name: SECTIONS[name](**values) for name, values in parts.items()})


BASE_RECIPE: dict[str, object] = {
    # Recipe of the big presets: DINOv2 / DINOv3 wiring and optimiser, with the settings that
    # a run of hundreds of steps at a batch of tens to hundreds needs to leave the entropy
    # wall (docs/recipes.md, "The big presets' recipe"): the seeds' ViT-Large validation run is
    # 384 steps at an effective batch of 256, where DINOv2's 100k+ steps at 1024+ are not.
    # The 2.5D stack's neighbours about 10 mm from slice z, whatever the slice spacing
    # (z-2, z, z+2 at 5 mm, z-8, z, z+8 at 1.25 mm): most of what a short run learns is how
    # slice z differs from its neighbours, so they must differ. Adjacent thin slices are nearly
    # one image (chest at 1.25-1.62 mm: a quarter of its 5 mm retrieval), and a slowly changing
    # anatomy needs more than 5 mm (limb at 1.75-5 mm: 1.4x its untrained network at 5 mm,
    # 6.6x at 10 mm); docs/recipes.md, "Thin slices" and "A 10 mm context".
    "context_mm": 10.0,
    "img_size": 224,
    # DINOv2: 8 local crops of 96 px (98 for patch 14) at scale (0.05, 0.32), globals at (0.32, 1).
    # 2 here: with iBOT, the seed's ViT-Large validation run (batch 64 x 4, --grad-checkpoint
    # --amp) fits a 24 GB card by the memory plan (docs/recipes.md). Pass --local-crops 8 where
    # memory allows (the APU, 80 GB GPUs, FSDP).
    "local_crops": 2,
    "local_size": 96,
    "global_scale_min": 0.32,
    # Views that share their intensity statistics: windows drawn independently and each view
    # standardised (distinct window families made the two views' untrained features
    # anti-correlated; without this the scaled-down recipe stays near the wall).
    "distinct_windows": False,
    "standardize_views": True,
    "local_scale_min": 0.05,
    "local_scale_max": 0.32,
    # The cap: DINO / DINOv2 train 65536 prototypes at a batch of 1024. A run's own count is
    # fitted to its global batch (`prototypes_for_batch`, PROTOTYPES_PER_IMAGE per image):
    # 65536 prototypes over a batch of 32 give each almost no samples, and the teacher sits
    # at the entropy wall (docs/recipes.md).
    "out_dim": 65536,
    "head_hidden": 2048,
    "head_bottleneck": 256,
    "head_layers": 3,
    # BN after the head's first layer: it standardises the class tokens over the batch, so
    # the teacher's targets differ between images from the first step (DINO's
    # `use_bn_in_head`); without it the scaled-down recipe stays near the wall.
    "head_bn": True,
    "drop_path": 0.1,
    # 0.1, not DINOv2's 1e-5: at 1e-5 every untrained class token is the same, and AdamW
    # opens the gains by at most about the learning rate per step, so a run whose learning
    # rates sum to ~0.1 (the validation run) keeps them near 0.01 and the teacher at the wall.
    "layerscale": 0.1,
    "lr": 5e-4,  # the user guide's advice for an effective batch of 256
    "min_lr": 1e-6,  # the warm-up research: cosine to 1e-6
    "warmup_steps": 2500,  # the warm-up research: 2500 steps
    "weight_decay": 0.04,
    "weight_decay_end": 0.2,
    "clip_grad": 3.0,
    "freeze_last_layer_steps": 1250,
    "momentum": 0.994,
    "momentum_end": 1.0,
    # DINO's default: a flat 0.04 (DINOv2 warms up to 0.07, which kept the scaled-down
    # recipe's DINO term at the wall).
    "teacher_temp": 0.04,
    "teacher_temp_start": 0.04,
    "teacher_temp_warmup_steps": 0,
    "student_temp": 0.1,
    "centering": "centering",
    "center_momentum": 0.9,
    # A thirtieth of DINOv2's 0.1: with BN in the head, KoLeo alone sets how far apart the
    # class tokens lie, and at 0.1 it spreads them along the views' nuisance (docs/recipes.md,
    # "KoLeo and the head's BN").
    "koleo_weight": 0.003,
    "ibot_weight": 1.0,  # DINOv2: iBOT on, masks of 10-50 % of the patches on half of the global views
    "ibot_mask_probability": 0.5,  # DINOv2's share of the global-view images that are masked
    # The dense correspondence term is dinox's, not DINOv3's; unmeasured at these sizes, so off
    # here (`--dense-weight 1` turns it on; docs/recipes.md, "A dense correspondence term").
    "dense_weight": 0.0,
    "gram_weight": 1.0,
    "gram_refresh_every": 1000,
    "gram_start_step": 2500,  # the first frozen Gram snapshot at the end of the warm-up (docs/recipes.md)
    "horizon": 100_000,
}

# Prototypes per image of the global batch, for every run not given --out-dim: half of DINO's
# 65536 at a batch of 1024; at a batch of 32 it gives the 1024 that the tiny recipe's sweep
# and the scaled-down big recipe measured (docs/recipes.md).
PROTOTYPES_PER_IMAGE = 32
MIN_PROTOTYPES = 1024


def prototypes_for_batch(global_batch: int, cap: int) -> int:
    """DINO prototypes for a global batch: PROTOTYPES_PER_IMAGE per image, rounded up to a
    power of two, between MIN_PROTOTYPES and the recipe's `cap`."""
    wanted = 1 << max(0, math.ceil(math.log2(max(1, PROTOTYPES_PER_IMAGE * global_batch))))
    return int(min(cap, max(MIN_PROTOTYPES, wanted)))


# Short CPU runs (the demo, the tests): what differs from BASE_RECIPE at 64 px and a few
# hundred steps; see docs/recipes.md for why each value differs.
RECIPES: dict[str, dict[str, object]] = {
    "vit-tiny": {
        "img_size": 64,
        # No local crops: with Sinkhorn-Knopp's sharp targets, the pairs of the two global
        # views alone learn more per second of a short run than multi-crop does (measured on
        # the six-block network: 290 steps without locals in the time of 220 with 4;
        # docs/recipes.md, "Local crops in a short run"). `--local-crops 4` gives the
        # multi-crop below.
        "local_crops": 0,
        "local_size": 32,
        "local_scale_min": 0.1,
        "local_scale_max": 0.4,
        # At 64 px a crop of a third of the slice leaves too little for two views to share:
        # (0.32, 1) measured ratio 4 -> 11 on the demo data, (0.5, 1) 3 -> 15 (docs/recipes.md).
        "global_scale_min": 0.5,
        "head_hidden": 512,
        "head_bottleneck": 128,
        "drop_path": 0.0,
        # LayerScale 0.3, not BASE's 0.1: at 0.1 the two-block network's untrained class tokens
        # start under the collapse line (embedding std 0.004 at step 1), and in fp32 they hovered
        # at it through steps 95-125 on the demo's data (0.0081 at step 107: the guard's alarm,
        # with bf16 and fp32 rounding the only difference). At 0.3 they start at 0.0105 and kept
        # 0.0143 or more after step 100 on all ten runs (fp32 chest seed 0: 0.0148). The margin
        # costs retrieval: 45.2 against 49.5 hits of 480 on the nine family-seeds (1.0: 45.6);
        # docs/recipes.md, "LayerScale of the two-block network".
        "layerscale": 0.3,
        "lr": 1e-3,
        "min_lr": 1e-5,
        "warmup_steps": 20,
        "weight_decay_end": 0.1,
        "freeze_last_layer_steps": 10,
        # held flat on the demo's few hundred steps by fit_teacher_momentum (a cosine to 1.0
        # over 220 steps would leave the final teacher 11 % untrained; docs/recipes.md, "The
        # teacher's lag")
        "momentum": 0.98,
        # The Gram teacher is the EMA teacher itself (a copy every step, so no forward of its
        # own): at the flat 0.98 it lags the student by ~50 steps, as far as snapshots every
        # 100 steps do on average, and it scored the same on nine family-seeds at 19 % less
        # time per step (docs/recipes.md, "The Gram teacher of a short run").
        "gram_refresh_every": 1,
        # A little more KoLeo than BASE's 0.003: the two-block network's class tokens start
        # closer together (embedding std 0.004-0.006 against 0.007-0.010 for six blocks) and
        # at 0.003 dipped once under the collapse line (0.0098-0.0099 at steps 107-109) on 2
        # of 9 family-seeds, raising the guard's alarm; 0.005 kept them above it in bf16, and
        # with LayerScale 0.3 (above) in fp32 too (docs/recipes.md, "The tiny network's depth").
        "koleo_weight": 0.005,
        "gram_start_step": 20,
        # iBOT masks on a quarter of the global-view images, not DINOv2's half: the masked
        # views also feed DINO's class-token pairs, and in a run this short the class token
        # learns more from unmasked views (chest 47.5 hits of 480 over five runs against 43.6;
        # docs/recipes.md, "iBOT masks on a quarter of the views").
        "ibot_mask_probability": 0.25,
        # DINOv3's Sinkhorn-Knopp centring with a sharper teacher than BASE's 0.04: its
        # equipartition over the batch keeps sharp targets from settling on a few prototypes,
        # where the EMA centre at a sharp temperature helped one family and hurt another;
        # 34.9 against 30.6 hits on nine family-seeds (docs/recipes.md, "Sinkhorn-Knopp").
        "centering": "sinkhorn",
        # The dense correspondence term (`dinox.losses.dense`): at the demo's 1000 steps it
        # found 1.70-1.97x the default's hits on chest seeds 0-2 and 1.19-1.53x on head, the
        # held-out limb level or a little under (0.94-1.08x), at ~40 % more time per step
        # (docs/recipes.md, "A dense correspondence term").
        "dense_weight": 1.0,
        "teacher_temp": 0.02,
        "teacher_temp_start": 0.02,
        "horizon": 2_000,
    },
}


# Starting from pretrained weights (--init-from): the heads are new, the backbone is not.
# The backbone stays frozen while the freshly initialised DINO/iBOT heads learn (the
# official DINOv3 recipe for continued pretraining: train the new heads with the backbone
# frozen, then continue at a low constant learning rate); dinox's numbers: a tenth of the
# run (at most 1250 steps, DINO's last-layer freeze) and a constant 1e-4 after it.
WARM_START_RECIPE: dict[str, object] = {"lr": 1e-4, "min_lr": 1e-4, "freeze_backbone_fraction": 0.1,
                                        "freeze_backbone_max": 1250}


def warm_start_values(max_steps: int | None, given: dict) -> dict[str, object]:
    """The warm-start settings for a run of `max_steps`, except those the user gave."""
    steps = max_steps or WARM_START_RECIPE["freeze_backbone_max"] * 10
    freeze = min(int(WARM_START_RECIPE["freeze_backbone_max"]), max(1, int(steps * WARM_START_RECIPE[
        "freeze_backbone_fraction"])))
    values = {"lr": WARM_START_RECIPE["lr"], "min_lr": WARM_START_RECIPE["min_lr"],
              "freeze_backbone_steps": freeze, "warmup_steps": freeze}
    return {k: v for k, v in values.items() if k not in given}


def recipe_for(preset: str) -> dict[str, object]:
    recipe = dict(BASE_RECIPE)
    recipe.update(RECIPES.get(preset, {}))
    return recipe


@dataclass
class Resolved:
    """The outcome of `resolve()`: the config and what to tell the user about it."""

    cfg: RunConfig
    notices: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # on resume: "name: saved -> now"
    preset_lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # settings that run but are likely mistakes


def _arch_values(preset: str, given: dict) -> dict[str, object]:
    arch = resolve_arch(preset, patch=given.get("vit_patch"), dim=given.get("vit_dim"),
                        depth=given.get("vit_depth"), heads=given.get("vit_heads"),
                        mlp_hidden_dim=given.get("vit_mlp"))
    values = {
        "vit_patch": arch.patch_size, "vit_dim": arch.embed_dim, "vit_depth": arch.depth,
        "vit_heads": arch.num_heads, "vit_mlp": arch.mlp_hidden_dim or 4 * arch.embed_dim,
        "swiglu": arch.swiglu, "registers": arch.num_registers, "rope": arch.rope, "rope_base": arch.rope_base,
        "mask_k_bias": arch.mask_k_bias, "ln_eps": arch.ln_eps,
    }
    return values


# Settings a checkpoint of an earlier dinox does not record, with the value that run trained
# with: a resumed run keeps it rather than taking today's recipe (a flag still overrides).
RECORDED_SINCE = {"context_mm": 0.0, "dense_weight": 0.0,
                  # before the run-length fit, the momentum followed its cosine as given
                  "fit_momentum": False}


def resolve(
    given: dict[str, object],
    *,
    hardware_preset: str,
    device_kind: str | None = None,
    saved: dict | None = None,
    world_size: int = 1,
    cpus: int | None = None,
) -> Resolved:
    """The ONE place where a run's settings are decided.

    `given`: the flags the user gave (flat names, only those given; "config" names the
    model preset). `hardware_preset`: the preset matched to this machine. `device_kind`:
    what "auto" became. `saved`: the flat config of the checkpoint being resumed.
    `world_size`: the processes that share each optimizer step (the global batch).
    `cpus`: the CPUs each process of this machine has (`run.device.cpus_per_rank`), which
    bound the preset's loader workers; None plans for another machine, uncut.
    """
    unknown = set(given) - set(FLAT_FIELDS)
    if unknown:
        raise ValueError(f"not run settings: {sorted(unknown)}")
    problem = shape_value_problem(saved) if saved is not None else None
    if problem:
        raise UserError(f"the checkpoint's configuration is damaged ({problem}); resume from another checkpoint "
                        f"of the run")
    resume_shape = saved is not None and "config" not in given
    preset = str(given.get("config") or (saved.get("config") if resume_shape else None) or "vit-tiny")
    recipe = recipe_for(preset)
    values: dict[str, object] = dict(recipe)
    if resume_shape:  # no --config on resume: the checkpoint's model, with any --vit-* flag given
        values.update({k: saved[k] for k in SHAPE_FIELDS if k in saved})
        values.update({k: v for k, v in given.items() if k in SHAPE_FIELDS})
    else:
        values.update(_arch_values(preset, given))
    kept = _kept_custom_values(saved, hardware_preset, given)
    hardware, preset_lines = apply_hardware_preset({k: given.get(k, kept.get(k)) for k in PRESET_KEYS},
                                                   hardware_preset, cpus=cpus)
    values.update(hardware)
    values.update(config=preset, hardware_preset=hardware_preset,
                  custom_values=sorted(k for k in {**kept, **given} if k in PRESET_KEYS))
    notices: list[str] = []
    if kept:
        notices.append("resumed on the same hardware preset: the run's own " + ", ".join(
            f"{k}={v}" for k, v in kept.items()) + " kept (give the flag to change it)")
    changes: list[str] = []
    if saved is not None:
        # The recipe's part of the model's shape is the checkpoint's on resume: the prototypes
        # were fitted to the batch the run began with, and the recipe may have changed since.
        # The preset's architecture and the flags given are still checked against it.
        values.update({k: saved[k] for k in SHAPE_FIELDS if k in saved and k in recipe and k not in given})
        requested = {**values, **given}
        requested["ibot_head"] = float(given.get("ibot_weight", saved.get("ibot_weight", 0.0))) > 0
        _check_shape(saved, requested)
        values.update({k: v for k, v in saved.items() if k in FLAT_FIELDS and k not in LAUNCH_KEYS})
        values.update({k: v for k, v in RECORDED_SINCE.items() if k not in saved})
        # The step budget is this launch's to change, but a resume that does not name one
        # keeps the run's: dropping the flag must not turn a finite run into an unlimited one.
        values["max_steps"] = saved.get("max_steps")
    values.update(given)
    if values.get("max_steps") == UNLIMITED_STEPS:
        values["max_steps"] = None
    if given.get("index_csv") and not given.get("data_root"):
        values["data_root"] = str(root_of_index(given["index_csv"]))
    if saved is None and values.get("init_from"):
        warm = warm_start_values(values.get("max_steps"), given)
        values.update(warm)
        if warm:
            notices.append("warm start from " + str(values["init_from"]) + ": " + ", ".join(
                f"{k}={v}" for k, v in warm.items()) + " (docs/recipes.md; flags override)")
    if values.get("device") in (None, "auto") and device_kind:
        values["device"] = device_kind
    values["ibot_head"] = float(values.get("ibot_weight") or 0.0) > 0
    if "momentum" in given or "momentum_end" in given:
        values["fit_momentum"] = False
    patch = int(values["vit_patch"])
    if "local_size" not in given and int(values["local_size"]) % patch:  # 96 px -> 98 for patch 14, as DINOv2
        values["local_size"] = max(patch, round(int(values["local_size"]) / patch) * patch)
    cfg = RunConfig.from_flat(values)
    if saved is None:
        notices += _fit_prototypes_to_batch(cfg, given, world_size)
        notices += _fit_to_run_length(cfg, given)
    else:
        changes = _changes(saved, cfg)
        if saved.get("max_steps") != cfg.optim.max_steps:
            notices.append(
                f"--max-steps {cfg.optim.max_steps if cfg.optim.max_steps is not None else '(unlimited)'} differs "
                f"from the checkpoint's {saved.get('max_steps')}: the learning-rate, weight-decay and momentum "
                "schedules are recomputed for the new length from the resumed step on")
    notices += _teacher_fit_notice(cfg)
    notices += _inert_flags(cfg, given)
    validate(cfg)
    warnings = _likely_mistakes(cfg, recipe, world_size) + (_resume_warnings(cfg, saved) if saved is not None else [])
    return Resolved(cfg, notices, changes, preset_lines, warnings)


def _resume_warnings(cfg: RunConfig, saved: dict) -> list[str]:
    """What a resume keeps that its launch may not expect: phases the run's own settings place
    past a new --max-steps (a new run would have fitted them to its length, a resume keeps the
    run's), and an effective batch that another preset or flag changed (the learning rate is
    not rescaled, the prototypes stay fitted to the run's batch)."""
    o, ssl, out = cfg.optim, cfg.ssl, []
    if o.max_steps is not None:
        for owner, name, what in ((o, "warmup_steps", "the learning rate never leaves its warm-up"),
                                  (o, "freeze_last_layer_steps", "the head's last layer stays frozen"),
                                  (o, "freeze_backbone_steps", "the backbone stays frozen"),
                                  (ssl, "gram_start_step", "no Gram snapshot is taken"),
                                  (ssl, "teacher_temp_warmup_steps", "the teacher temperature never ends its warm-up")):
            value = getattr(owner, name)
            if value and value >= o.max_steps:
                out.append(f"{_flag(name)} {value} (the run's) is at or past --max-steps {o.max_steps}: {what}; give "
                           f"{_flag(name)} to fit it to the new length")
    try:
        before = int(saved["batch_size"]) * int(saved["accumulation_steps"])
    except (KeyError, TypeError, ValueError):
        before = None
    if before is not None and before != cfg.effective_batch:
        out.append(f"the effective batch per rank changes on resume: {before} -> {cfg.effective_batch} (--batch-size "
                   f"{o.batch_size} x --accumulation-steps {o.accumulation_steps}); --lr is not rescaled and the "
                   f"prototypes stay fitted to the run's batch: give --batch-size {saved['batch_size']} "
                   f"--accumulation-steps {saved['accumulation_steps']} (or a split of the same product) to keep it")
    return out


# How far above the recipe's learning rate (scaled linearly to the global batch, as DINO
# scales it, lr = base x batch / 256) a run is warned: AdamW on a ViT diverges within a few
# multiples of it, and an order of magnitude is a slip of the exponent more often than a choice.
LR_WARN_FACTOR = 10.0


def _likely_mistakes(cfg: RunConfig, recipe: dict, world_size: int) -> list[str]:
    """Settings that run but that a DINO recipe almost never wants: warned, never refused
    (an ablation may want them)."""
    o, s, warnings = cfg.optim, cfg.ssl, []
    global_batch = cfg.effective_batch * max(1, world_size)
    scaled = float(recipe["lr"]) * max(1.0, global_batch / 256)
    if o.lr > LR_WARN_FACTOR * scaled:
        warnings.append(f"--lr {o.lr:g} is {o.lr / scaled:.0f}x the {cfg.model.preset} recipe's {scaled:g} for a "
                        f"global batch of {global_batch} (DINO scales it as base x batch / 256): AdamW on a ViT "
                        f"usually diverges there (the anomaly guard stops a run whose loss does)")
    hottest = max(s.teacher_temp, s.teacher_temp_start if s.teacher_temp_warmup_steps else 0.0)
    if hottest >= s.student_temp:
        warnings.append(f"the teacher is no sharper than the student (teacher temperature {hottest:g} >= "
                        f"--student-temp {s.student_temp:g}): DINO's targets then hold no more than the "
                        f"student's own outputs and drift to uniform (Caron et al. 2021, sec. 5.3: sharpening "
                        f"against collapse); the recipes: teacher {BASE_RECIPE['teacher_temp']:g} (vit-tiny "
                        f"{RECIPES['vit-tiny']['teacher_temp']:g}), student {BASE_RECIPE['student_temp']:g}")
    return warnings


# Flags that act only through a part of the objective or of the views: given while that
# part is off, they change nothing, and the run should say so rather than look tuned.
_NEEDS_LOCAL_CROPS = ("dino_local_weight", "local_size", "local_scale_min", "local_scale_max")
_NEEDS_IBOT = ("ibot_mask_ratio_min", "ibot_mask_ratio_max", "ibot_mask_probability")


def _inert_flags(cfg: RunConfig, given: dict) -> list[str]:
    """A notice for each flag given that this run's settings make ineffective."""
    notices = []
    for names, off, why in ((_NEEDS_LOCAL_CROPS, cfg.views.local_crops == 0, "--local-crops is 0"),
                            (_NEEDS_IBOT, cfg.ssl.ibot_weight == 0, "--ibot-weight is 0"),
                            (("teacher_temp_start",), cfg.ssl.teacher_temp_warmup_steps == 0,
                             "--teacher-temp-warmup-steps is 0 (the teacher temperature is flat)")):
        inert = [n for n in names if n in given]
        if off and inert:
            notices.append(f"{', '.join(map(_flag, inert))} {'has' if len(inert) == 1 else 'have'} no effect: {why}")
    return notices


def _kept_custom_values(saved: dict | None, hardware_preset: str, given: dict) -> dict:
    """The hardware-preset values a resumed run had chosen by flag (a custom batch size, say),
    kept when it resumes on the same preset without repeating the flag. On other hardware the
    new preset applies (the seeds' cross-hardware resume), and a flag given always wins."""
    if saved is None or saved.get("hardware_preset") != hardware_preset:
        return {}
    return {k: saved[k] for k in saved.get("custom_values") or () if k in PRESET_KEYS and k in saved
            and k not in given}


def _shape_of(flat: dict) -> dict:
    """The model-shape fields of a flat config; a field it lacks (a checkpoint written before
    the field existed) has the default it was built with."""
    defaults = RunConfig().to_flat()
    return {name: flat.get(name, defaults[name]) for name in SHAPE_FIELDS}


def _check_shape(saved: dict, requested: dict) -> None:
    have, want = _shape_of(saved), _shape_of(requested)
    mismatch = [f"{name}: checkpoint {have[name]!r}, requested {want[name]!r}"
                for name in SHAPE_FIELDS if have[name] != want[name]]
    if mismatch:
        raise UserError("the checkpoint's model differs from the one requested (" + "; ".join(mismatch)
                        + f"). Resume with the checkpoint's shape: {matching_flags(saved)}")


def matching_flags(saved: dict) -> str:
    """The flags that rebuild a checkpoint's model shape (the preset's own rope and LayerNorm
    settings come with its --config)."""
    value = _shape_of(saved)
    flags = [f"--config {saved.get('config', 'custom')}"]
    flags += [f"{_flag(name)} {value[name]}" for name in ("vit_patch", "vit_dim", "vit_depth", "vit_heads", "vit_mlp",
                                                           "registers", "out_dim", "head_hidden", "head_bottleneck",
                                                           "head_layers", "img_size")]
    flags += [f"--layerscale {value['layerscale']}", f"--head-bn {str(bool(value['head_bn'])).lower()}",
              f"--prototype-norm {value['prototype_norm']}"]
    flags += ["--swiglu" if value["swiglu"] else "--no-swiglu"]
    # a positive weight builds the iBOT head: the checkpoint's own, or DINOv2's 1.0 where it has none
    flags += [f"--ibot-weight {saved.get('ibot_weight') or 1.0}" if value["ibot_head"] else "--ibot-weight 0"]
    return " ".join(flags)


def shape_value_problem(flat: dict) -> str | None:
    """Why a saved configuration's model-shape values cannot build a model (a value of
    another type than the field's: "64" for vit_dim), or None. Fields it lacks are not
    a problem here: they take the default they had when the field was introduced."""
    defaults = RunConfig().to_flat()
    for name in SHAPE_FIELDS:
        if name not in flat or defaults[name] is None:
            continue
        value, default = flat[name], defaults[name]
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):   # None: off (LayerScale)
            ok, kind = value is None or isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "text"
        else:
            continue
        if not ok:
            return f"{name} is {value!r}, not {kind}"
    return None


def _changes(saved: dict, cfg: RunConfig) -> list[str]:
    """What differs from the checkpoint's settings; a setting it predates counts as the value
    the run trained with (RECORDED_SINCE), not as a change from None."""
    flat, before = cfg.to_flat(), {**RECORDED_SINCE, **saved}
    return [f"{name}: {before.get(name)!r} -> {flat[name]!r}" for name in sorted(flat)
            if name not in ("resume", "custom_values") and name in before and before[name] != flat[name]]


def _fit_prototypes_to_batch(cfg: RunConfig, given: dict, world_size: int) -> list[str]:
    """The recipe's prototype count is a cap: a new run takes PROTOTYPES_PER_IMAGE per image
    of its global batch (never a value the user gave; a resume keeps the checkpoint's)."""
    if "out_dim" in given:
        return []
    global_batch, cap = cfg.effective_batch * max(1, world_size), cfg.model.out_dim
    cfg.model.out_dim = prototypes_for_batch(global_batch, cap)
    if cfg.model.out_dim == cap:
        return []
    return [f"prototypes: {cfg.model.out_dim} for a global batch of {global_batch} ({PROTOTYPES_PER_IMAGE} per "
            f"image, at most {cap}; set --out-dim to choose)"]


def _fit_to_run_length(cfg: RunConfig, given: dict) -> list[str]:
    """Shorten recipe warm-ups that a short run would never leave (never a value the user gave)."""
    optim, ssl, notices = cfg.optim, cfg.ssl, []
    if optim.max_steps is None:
        return notices
    if optim.warmup_steps >= optim.max_steps:
        if "warmup_steps" in given:
            notices.append(f"--warmup-steps {optim.warmup_steps} >= --max-steps {optim.max_steps}: "
                           "the learning rate never leaves warm-up")
        else:
            clamped = max(1, optim.max_steps // 10)
            notices.append(f"warm-up {optim.warmup_steps} steps is longer than the run ({optim.max_steps}); "
                           f"using 10% of it: {clamped} steps (set --warmup-steps to choose)")
            optim.warmup_steps = clamped
    if "freeze_backbone_steps" in given and optim.freeze_backbone_steps >= optim.max_steps:
        notices.append(f"--freeze-backbone-steps {optim.freeze_backbone_steps} >= --max-steps {optim.max_steps}: "
                       "the backbone stays frozen for the whole run (only the heads learn)")
    for owner, name, limit, why in (
        (optim, "freeze_last_layer_steps", optim.warmup_steps, "the warm-up"),
        (ssl, "teacher_temp_warmup_steps", max(1, optim.max_steps * 3 // 10), "30% of the run"),
        # the Gram policy: the first frozen snapshot at the end of the warm-up (docs/recipes.md)
        (ssl, "gram_start_step", optim.warmup_steps, "the warm-up"),
    ):
        value = getattr(owner, name)
        if name not in given and value > limit:
            notices.append(f"{name} {value} is too long for a {optim.max_steps}-step run; using {why}: {limit}")
            setattr(owner, name, limit)
    return notices


def teacher_momentum_fit(cfg: RunConfig) -> TeacherFit | None:
    """The run-length fit of the teacher momentum that applies to this run (None: the
    recipe's or the user's schedule as given). `Schedules` applies it; resolve() reports it."""
    s = cfg.ssl
    return fit_teacher_momentum(s.momentum, s.momentum_end, cfg.optim.max_steps) if s.fit_momentum else None


def _teacher_fit_notice(cfg: RunConfig) -> list[str]:
    """What the run's length does to the teacher momentum."""
    s = cfg.ssl
    fit = teacher_momentum_fit(cfg)
    if cfg.optim.max_steps is None:
        end = unlimited_momentum_end(s.momentum, s.momentum_end)
        if end == s.momentum_end:
            return []
        return [f"an unlimited run: the teacher momentum ramps {s.momentum:g} -> {end:g} over --horizon "
                f"{cfg.optim.horizon} steps and holds there, not -> {s.momentum_end:g}, which would freeze the "
                "teacher for the rest of the run (give --max-steps for DINO's cosine to 1.0 at the run's end)"]
    if fit is None:
        return []
    return [f"teacher momentum {s.momentum:g} -> {s.momentum_end:g} over {cfg.optim.max_steps} steps would leave "
            f"the final teacher {fit.planned.untrained:.0%} untrained and {fit.planned.lag:.0%} of the run behind "
            f"the student; holding it flat at {fit.momentum:g} ({fit.fitted.untrained:.0%} untrained, "
            f"{fit.fitted.lag:.0%} behind; set --momentum/--momentum-end to choose)"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: RunConfig) -> None:
    """Reject settings that cannot work, with the flag to change."""
    from dinox.losses.gram import validate_gram_weight

    for name, value in cfg.to_flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(name)} {value} is not a finite number; give a finite value")
    m, v, o, s, w = cfg.model, cfg.views, cfg.optim, cfg.ssl, cfg.watch
    validate_gram_weight(s.gram_weight)
    if cfg.runtime.parallel not in PARALLEL_CHOICES:
        raise UserError(f"--parallel {cfg.runtime.parallel!r}: choose one of {', '.join(PARALLEL_CHOICES)}")
    if o.lr <= 0:
        raise UserError(f"--lr {o.lr} must be positive (try 5e-4 for an effective batch of 256)")
    if o.min_lr < 0 or o.min_lr > o.lr:
        raise UserError(f"--min-lr {o.min_lr} must lie between 0 and --lr {o.lr}")
    if o.weight_decay < 0 or o.weight_decay_end < 0:
        raise UserError("--weight-decay and --weight-decay-end must be >= 0 (typical 0.04 -> 0.2)")
    if o.freeze_backbone_steps < 0:
        raise UserError("--freeze-backbone-steps must be >= 0")
    if o.clip_grad < 0:
        raise UserError(f"--clip-grad {o.clip_grad} must be >= 0 (0 turns clipping off)")
    if not 0.0 <= m.drop_path < 1.0:
        raise UserError(f"--drop-path {m.drop_path} must lie in [0, 1) (typical 0.1 for big models, 0 for tiny)")
    if not 0.0 <= s.momentum <= 1.0 or not 0.0 <= s.momentum_end <= 1.0:
        raise UserError("--momentum and --momentum-end must lie in [0, 1] (typical 0.994 -> 1.0)")
    if s.teacher_temp <= 0 or s.student_temp <= 0 or s.teacher_temp_start <= 0:
        raise UserError(f"temperatures must be positive: --teacher-temp {s.teacher_temp:g}, --teacher-temp-start "
                        f"{s.teacher_temp_start:g}, --student-temp {s.student_temp:g} (the recipes: teacher "
                        f"{BASE_RECIPE['teacher_temp']:g}, vit-tiny {RECIPES['vit-tiny']['teacher_temp']:g}; student "
                        f"{BASE_RECIPE['student_temp']:g})")
    if not 0.0 <= s.center_momentum < 1.0:
        raise UserError(f"--center-momentum {s.center_momentum} must lie in [0, 1) (typical 0.9)")
    if w.spike_factor <= 1.0:
        raise UserError(f"--spike-factor {w.spike_factor} must be above 1 (a spike is loss > factor x its recent mean)")
    if s.koleo_weight < 0 or s.ibot_weight < 0:
        raise UserError("--koleo-weight and --ibot-weight must be >= 0 (0 turns the term off)")
    if not s.dense_weight >= 0:  # NaN too
        raise UserError(f"--dense-weight {s.dense_weight} must be >= 0 (0 leaves the dense correspondence term out)")
    if not s.dense_temp > 0:
        raise UserError(f"--dense-temp {s.dense_temp} must be > 0 (the InfoNCE temperature; PixPro and DenseCL: "
                        f"0.2-0.3)")
    if s.dense_teacher_scale < 1:
        raise UserError(f"--dense-teacher-scale {s.dense_teacher_scale} must be an integer >= 1 (1: the teacher's "
                        f"keys at the student's resolution)")
    if s.dense_teacher_scale > 1 and not s.dense_weight > 0:
        raise UserError(f"--dense-teacher-scale {s.dense_teacher_scale} acts on the dense term, which is off "
                        f"(--dense-weight 0); give --dense-weight a value > 0 or leave the scale at 1")
    if s.dino_local_weight < 0:
        raise UserError(f"--dino-local-weight {s.dino_local_weight} must be >= 0 (1: every DINO pair alike; "
                        f"DINOv3's last phase: 0.5)")
    if not 0.0 <= s.ibot_mask_ratio_min <= s.ibot_mask_ratio_max < 1.0:
        raise UserError("--ibot-mask-ratio must be two numbers 0 <= min <= max < 1 (DINOv2: 0.1 0.5)")
    if not 0.0 <= s.ibot_mask_probability <= 1.0:
        raise UserError("--ibot-mask-probability must lie in [0, 1] (DINOv2: 0.5)")
    if s.ibot_mask_probability == 0 and s.ibot_weight > 0:
        raise UserError(f"--ibot-mask-probability 0 masks no image, so the iBOT term (--ibot-weight "
                        f"{s.ibot_weight:g}) has no patch to predict; give a probability > 0 (DINOv2: 0.5), or "
                        f"--ibot-weight 0 to turn iBOT off")
    if s.gram_start_step < 0:
        raise UserError("--gram-start-step must be >= 0")
    if s.gram_teacher_scale < 1:
        raise UserError(f"--gram-teacher-scale {s.gram_teacher_scale} must be an integer >= 1 "
                        "(1: the student's resolution; DINOv3's high-resolution Gram teacher uses 2)")
    if not 0.0 <= v.context_mm <= 100.0:  # NaN too
        raise UserError(f"--context-mm {v.context_mm:g} must lie in [0, 100] mm (the distance of the 2.5D stack's "
                        f"neighbour slices from slice z; 0: the adjacent slices)")
    if not 0.0 < v.global_scale_min <= 1.0:
        raise UserError("the global crop scale minimum must lie in (0, 1]")
    if not m.layerscale >= 0:  # NaN too
        raise UserError(f"--layerscale {m.layerscale} must be >= 0 (an initial gain of the residual branches; "
                        f"0 turns LayerScale off, DINOv2: 1e-5)")
    if not 0.0 < v.local_scale_min <= v.local_scale_max <= 1.0:
        raise UserError(f"--local-scale {v.local_scale_min:g} {v.local_scale_max:g} must be two area fractions "
                        f"0 < min <= max <= 1 (DINOv2: 0.05 0.32)")
    if v.local_crops and v.local_size > v.img_size:
        raise UserError(f"--local-size {v.local_size} is larger than the global views (--img-size {v.img_size}); "
                        f"local crops are the small views (DINOv2: 96 px for 224 px globals)")
    if v.local_crops and v.local_size % m.vit_patch:
        raise UserError(
            f"--local-size {v.local_size} is not a multiple of --vit-patch {m.vit_patch}; "
            f"use --local-size {max(m.vit_patch, v.local_size // m.vit_patch * m.vit_patch)}"
        )
    validate_arch(m.arch(), v.img_size)


def config_from_checkpoint(state: dict, path=None) -> RunConfig:
    """The RunConfig a checkpoint was trained with (format checked); `path` names the file
    in the errors."""
    check_checkpoint_format(state, path)
    saved = state.get("config")
    if not isinstance(saved, dict):
        what = f"{path}" if path is not None else "this checkpoint"
        raise UserError(f"{what} carries no dinox configuration; was it written by dinox train?")
    problem = shape_value_problem(saved)
    if problem:
        raise UserError(f"{path or 'the checkpoint'}: its configuration is damaged ({problem}); use another "
                        f"checkpoint of the run")
    return RunConfig.from_flat(saved)


def check_checkpoint_format(state: dict, path=None) -> None:
    """UserError for a checkpoint of another program or of a newer dinox; `path` names the
    file in the message."""
    fmt, version = state.get("format"), state.get("format_version")
    what = f"{path} is " if path is not None else ""
    if fmt != CHECKPOINT_FORMAT:
        raise UserError(f"{what}not a dinox checkpoint (format {fmt!r}); pass a checkpoint_*.pth written by "
                        f"dinox train")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{path or 'the checkpoint'}: format version {version!r} is newer than this dinox reads "
                        f"({CHECKPOINT_FORMAT_VERSION}); upgrade dinox to load it")


def with_values(cfg: RunConfig, **flat) -> RunConfig:
    """A copy of `cfg` with some flat-named values replaced (tests, tools)."""
    return RunConfig.from_flat({**cfg.to_flat(), **flat})


__all__ = [
    "BASE_RECIPE", "CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "DEVICE_CHOICES", "FLAT_FIELDS",
    "IOConfig", "LAUNCH_KEYS", "MODEL_CHOICES", "ModelConfig", "OptimConfig", "PARALLEL_CHOICES",
    "PROTOTYPES_PER_IMAGE", "RECIPES", "RunConfig", "Resolved", "RuntimeConfig", "SECTIONS", "SHAPE_FIELDS",
    "SSLConfig", "ViewsConfig", "WatchConfig", "check_checkpoint_format", "config_from_checkpoint",
    "prototypes_for_batch", "recipe_for", "resolve", "validate", "with_values",
]
