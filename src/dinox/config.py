"""The run configuration: flags, recipe defaults per model preset, resolution and validation.

Precedence for every setting: an explicit flag, then the model preset's recipe, then the
hardware preset (workers, pinning, batch, accumulation), then the base recipe below.
Every flag defaults to None in argparse so "the user set it" is always known.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

from dinox.errors import UserError

MODEL_CHOICES = ["vit-tiny", "vit-small", "vit-base", "vit-large", "vit-giant", "custom"]
DEVICE_CHOICES = ["auto", "cuda", "rocm", "mps", "cpu"]

# Recipe defaults for the big presets (DINO/DINOv2 values unless noted).
BASE_RECIPE: dict[str, object] = {
    "img_size": 224,
    "local_crops": 0,
    "local_size": 96,
    "global_scale_min": 0.5,
    "distinct_windows": True,
    "standardize_views": False,
    "local_scale_min": 0.1,
    "local_scale_max": 0.5,
    "out_dim": 65536,
    "head_hidden": 2048,
    "head_bottleneck": 256,
    "head_layers": 3,
    "head_bn": False,
    "drop_path": 0.1,
    "layerscale": 1e-5,
    "lr": 5e-4,  # the guide's advice for an effective batch of 256
    "min_lr": 1e-6,  # seed 004
    "warmup_steps": 2500,  # seed 004
    "weight_decay": 0.04,
    "weight_decay_end": 0.2,
    "clip_grad": 3.0,
    "freeze_last_layer_steps": 1250,
    "momentum": 0.994,
    "momentum_end": 1.0,
    "teacher_temp": 0.07,
    "teacher_temp_start": 0.04,
    "teacher_temp_warmup_steps": 3000,
    "student_temp": 0.1,
    "centering": "centering",
    "center_momentum": 0.9,
    "koleo_weight": 0.1,
    "gram_weight": 1.0,
    "gram_refresh_every": 1000,
    "horizon": 100_000,
}

# Short CPU runs (the demo, the tests): see docs/recipes.md for why each value differs.
RECIPES: dict[str, dict[str, object]] = {
    "vit-tiny": {
        "img_size": 64,
        "local_crops": 4,
        "local_size": 32,
        "local_scale_min": 0.1,
        "local_scale_max": 0.4,
        "out_dim": 1024,
        "head_hidden": 512,
        "head_bottleneck": 128,
        "drop_path": 0.0,
        "layerscale": 0.1,  # 1e-5 makes every untrained class token identical (erank 1)
        # What made the demo learn (docs/recipes.md): BN in the head (diverse teacher targets
        # at initialisation), windows drawn independently (distinct families make the two
        # views' untrained features anti-correlated), per-view standardisation, a flat sharp
        # teacher temperature (a warm-up to 0.06 let the teacher drift to uniform).
        "head_bn": True,
        "distinct_windows": False,
        "standardize_views": True,
        "lr": 1e-3,
        "min_lr": 1e-5,
        "warmup_steps": 20,
        "weight_decay": 0.04,
        "weight_decay_end": 0.1,
        "freeze_last_layer_steps": 10,
        "momentum": 0.98,
        "teacher_temp": 0.04,
        "teacher_temp_start": 0.04,
        "teacher_temp_warmup_steps": 0,
        "gram_refresh_every": 100,
        "horizon": 2_000,
    },
}


@dataclass
class TrainConfig:
    """Every resolved setting of a run (written to config.json and into checkpoints)."""

    config: str = "vit-tiny"
    vit_patch: int = 8
    vit_dim: int = 192
    vit_depth: int = 6
    vit_heads: int = 3
    vit_mlp: int = 768
    swiglu: bool = False
    registers: int = 4
    layerscale: float = 1e-5
    drop_path: float = 0.0
    img_size: int = 64
    local_crops: int = 0
    local_size: int = 32
    global_scale_min: float = 0.5
    distinct_windows: bool = True
    standardize_views: bool = False
    local_scale_min: float = 0.1
    local_scale_max: float = 0.5
    out_dim: int = 1024
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    head_bn: bool = False
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
    momentum: float = 0.994
    momentum_end: float = 1.0
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_steps: int = 0
    student_temp: float = 0.1
    centering: str = "centering"
    center_momentum: float = 0.9
    koleo_weight: float = 0.1
    gram_weight: float = 1.0
    gram_refresh_every: int = 1000
    horizon: int = 100_000
    device: str = "auto"
    amp: bool = False
    grad_checkpoint: bool = False
    compile: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    data_root: str = "data/processed"
    index_csv: str | None = None
    split_manifest: str | None = None
    out: str = "data/runs"
    resume: str | None = None
    seed: int = 0
    ckpt_every: int = 100
    ckpt_keep_last: int = 5
    ckpt_milestone_every: int = 0
    monitor_every: int = 1000
    eval_every: int = 0
    eval_n: int = 512
    log_interval: float = 10.0
    log_every: int = 1
    halt_on_anomaly: bool = False
    collapse_std: float = 0.01
    spike_factor: float = 2.0
    hardware_preset: str = ""
    custom_values: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation_steps

    # Fields that define the learned model: a checkpoint only resumes with the same values.
    SHAPE_FIELDS = (
        "vit_patch", "vit_dim", "vit_depth", "vit_heads", "vit_mlp", "swiglu", "registers", "layerscale", "head_bn",
        "out_dim", "head_hidden", "head_bottleneck", "head_layers", "img_size",
    )


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """All flags of `dinox train` / scripts/phase5_big_run.py (defaults None: see module doc)."""
    g = p.add_argument_group("model")
    g.add_argument("--config", choices=MODEL_CHOICES, default="vit-tiny",
                   help="model preset (default vit-tiny); the --vit-* flags override it; 'custom' needs all four")
    g.add_argument("--vit-patch", type=_positive_int)
    g.add_argument("--vit-dim", type=_positive_int)
    g.add_argument("--vit-depth", type=_positive_int)
    g.add_argument("--vit-heads", type=_positive_int)
    g.add_argument("--vit-mlp", type=_positive_int, help="MLP hidden width (default 4 x dim; 6144 for vit-giant)")
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None, help="SwiGLU MLP instead of GELU")
    g.add_argument("--registers", type=_nonneg_int, help="register tokens (default 4)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--layerscale", type=float, help="LayerScale init (1e-5 for big presets; 0 disables)")
    g.add_argument("--out-dim", type=_positive_int, help="DINO head prototypes (65536 for big presets, 1024 for vit-tiny)")
    g.add_argument("--head-hidden", type=_positive_int)
    g.add_argument("--head-bottleneck", type=_positive_int)
    g.add_argument("--head-layers", type=_positive_int)
    g.add_argument("--head-bn", type=_bool, metavar="true|false",
                   help="BatchNorm (batch statistics) in the head MLP (DINO's use_bn; default off)")

    g = p.add_argument_group("views")
    g.add_argument("--img-size", type=_positive_int, help="global crop size in px (224; 64 for vit-tiny)")
    g.add_argument("--local-crops", type=_nonneg_int, help="local crops per sample")
    g.add_argument("--local-size", type=_positive_int, help="local crop size in px")
    g.add_argument("--distinct-windows", type=_bool, metavar="true|false",
                   help="draw the two global views' HU windows from different families (lung/mediastinal/bone/broad)")
    g.add_argument("--standardize-views", type=_bool, metavar="true|false",
                   help="zero-mean unit-std each view after windowing")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=_positive_int, help="optimizer steps; omit to train until stopped")
    g.add_argument("--batch-size", type=_positive_int, help="per-device micro-batch (default: hardware preset)")
    g.add_argument("--accumulation-steps", type=_positive_int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, help="peak learning rate (not scaled by batch)")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine (seed 004: 1e-6)")
    g.add_argument("--warmup-steps", type=_nonneg_int, help="linear warm-up steps (seed 004: 2500)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--weight-decay-end", type=float)
    g.add_argument("--clip-grad", type=float, help="gradient norm clip (0 disables)")
    g.add_argument("--freeze-last-layer-steps", type=_nonneg_int)
    g.add_argument("--momentum", type=float, help="teacher EMA momentum at step 0 (cosine towards --momentum-end)")
    g.add_argument("--momentum-end", type=float)
    g.add_argument("--teacher-temp", type=float)
    g.add_argument("--teacher-temp-start", type=float)
    g.add_argument("--teacher-temp-warmup-steps", type=_nonneg_int)
    g.add_argument("--student-temp", type=float)
    g.add_argument("--centering", choices=["centering", "sinkhorn"])
    g.add_argument("--center-momentum", type=float)
    g.add_argument("--koleo-weight", type=float)
    g.add_argument("--gram-weight", type=float, help="Gram anchoring weight (> 0; it cannot be disabled)")
    g.add_argument("--gram-refresh-every", type=_positive_int, help="steps between Gram-teacher snapshots")
    g.add_argument("--horizon", type=_positive_int, help="schedule span of an unlimited run")
    g.add_argument("--seed", type=int)

    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="override detection (default auto)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (fp16 + scaler where bf16 is missing)")
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None, help="per-block activation checkpointing")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the backbone")
    g.add_argument("--num-workers", type=_nonneg_int)
    g.add_argument("--pin-memory", type=_bool, metavar="true|false")
    g.add_argument("--device-memory", type=float, metavar="GB", help="plan for a device with this much memory")

    g = p.add_argument_group("data and output")
    g.add_argument("--data-root", help="processed root (default data/processed)")
    g.add_argument("--index-csv", help="default <data-root>/_index/index.csv")
    g.add_argument("--split-manifest", help="default <data-root>/_splits/val10_seed0.json")
    g.add_argument("--out", help="runs root (default data/runs); each run gets YYYYMMDD_HHMMSS/")
    g.add_argument("--resume", help="'auto' (newest good checkpoint under --out) or a checkpoint path")

    g = p.add_argument_group("checkpoints, monitoring, validation")
    g.add_argument("--ckpt-every", type=_positive_int, help="steps between checkpoints (100)")
    g.add_argument("--ckpt-keep-last", type=_positive_int, help="periodic checkpoints kept (5)")
    g.add_argument("--ckpt-milestone-every", type=_nonneg_int, help="keep every M-th step out of rotation")
    g.add_argument("--monitor-every", type=_nonneg_int, help="steps between heatmaps/stats (1000; 0 off)")
    g.add_argument("--eval-every", type=_nonneg_int, help="steps between retrieval + rank checks (0 off)")
    g.add_argument("--eval-n", type=_positive_int, help="validation samples per in-training check (512)")
    g.add_argument("--log-interval", type=float, help="seconds between progress lines (10)")
    g.add_argument("--log-every", type=_positive_int, help="steps between metrics.jsonl/TensorBoard rows (1)")
    g.add_argument("--halt-on-anomaly", action=argparse.BooleanOptionalAction, default=None, help="stop on a loss spike too")
    g.add_argument("--collapse-std", type=float, help="embedding std below which collapse is flagged (0.01)")
    g.add_argument("--spike-factor", type=float, help="loss above this x its 10-step mean is a spike (2.0)")

    g = p.add_argument_group("planning")
    g.add_argument("--dry-run", action="store_true", help="resolve, estimate memory on the meta device, exit (0 fits, 3 not)")
    g.add_argument("--json", action="store_true", help="with --dry-run: print the summary as one JSON object")


_HARDWARE_KEYS = ("num_workers", "pin_memory", "batch_size", "accumulation_steps")


def explicit_values(args: argparse.Namespace) -> dict[str, object]:
    """The flags the user actually gave (None means not given)."""
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None and name not in ("config",):
            out[name] = value
    return out


def recipe_for(preset: str) -> dict[str, object]:
    recipe = dict(BASE_RECIPE)
    recipe.update(RECIPES.get(preset, {}))
    return recipe


def build_config(
    args: argparse.Namespace, arch, hardware: dict[str, object], hardware_preset: str
) -> tuple[TrainConfig, list[str]]:
    """Merge flags, recipe and hardware preset into a TrainConfig; returns it and notices."""
    given = explicit_values(args)
    values: dict[str, object] = {}
    values.update(recipe_for(args.config))
    values.update(hardware)
    values.update(given)
    values.update(
        config=args.config,
        vit_patch=arch.patch_size,
        vit_dim=arch.embed_dim,
        vit_depth=arch.depth,
        vit_heads=arch.num_heads,
        vit_mlp=arch.mlp_hidden_dim or 4 * arch.embed_dim,
        swiglu=arch.swiglu,
        registers=arch.num_registers,
        hardware_preset=hardware_preset,
        custom_values=sorted(k for k in given if k in _HARDWARE_KEYS),
    )
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    notices = []
    if cfg.max_steps is not None and cfg.warmup_steps >= cfg.max_steps:
        if "warmup_steps" in given:
            notices.append(
                f"--warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: "
                "the learning rate never leaves warm-up"
            )
        else:
            clamped = max(1, cfg.max_steps // 10)
            notices.append(
                f"warm-up {cfg.warmup_steps} steps is longer than the run ({cfg.max_steps}); "
                f"using 10% of it: {clamped} steps (set --warmup-steps to choose)"
            )
            cfg.warmup_steps = clamped
    if cfg.max_steps is not None:
        for name, limit, why in (
            ("freeze_last_layer_steps", cfg.warmup_steps, "the warm-up"),
            ("teacher_temp_warmup_steps", max(1, cfg.max_steps * 3 // 10), "30% of the run"),
        ):
            value = getattr(cfg, name)
            if name not in given and value > limit:
                notices.append(f"{name} {value} is too long for a {cfg.max_steps}-step run; using {why}: {limit}")
                setattr(cfg, name, limit)
    validate(cfg)
    return cfg, notices


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, with the flag to change."""
    from dinox.losses.gram import validate_gram_weight

    validate_gram_weight(cfg.gram_weight)
    if cfg.lr <= 0:
        raise UserError(f"--lr {cfg.lr} must be positive (try 5e-4 for an effective batch of 256)")
    if cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise UserError(f"--min-lr {cfg.min_lr} must lie between 0 and --lr {cfg.lr}")
    if not 0.0 <= cfg.momentum <= 1.0 or not 0.0 <= cfg.momentum_end <= 1.0:
        raise UserError("--momentum and --momentum-end must lie in [0, 1] (typical 0.994 -> 1.0)")
    if cfg.teacher_temp <= 0 or cfg.student_temp <= 0 or cfg.teacher_temp_start <= 0:
        raise UserError("temperatures must be positive (typical: --teacher-temp 0.07 --student-temp 0.1)")
    if cfg.spike_factor <= 1.0:
        raise UserError(f"--spike-factor {cfg.spike_factor} must be above 1 (a spike is loss > factor x its recent mean)")
    if cfg.koleo_weight < 0:
        raise UserError(f"--koleo-weight {cfg.koleo_weight} must be >= 0")
    if not 0.0 < cfg.global_scale_min <= 1.0:
        raise UserError("the global crop scale minimum must lie in (0, 1]")
    if cfg.local_crops and cfg.local_size % cfg.vit_patch:
        raise UserError(
            f"--local-size {cfg.local_size} is not a multiple of --vit-patch {cfg.vit_patch}; "
            f"use --local-size {max(cfg.vit_patch, cfg.local_size // cfg.vit_patch * cfg.vit_patch)}"
        )
