"""Value types for the subcommands' flags: a bad value is refused by argparse, in one line,
before any work starts (not minutes later, deep inside a step)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)

SEED_MAX = 2 ** 32 - 1   # what numpy's RandomState and scikit-learn's random_state take


def seed_int(text: str) -> int:
    """A --seed: a whole number 0 to 2**32 - 1, what every consumer takes (scikit-learn's
    random_state; torch's int64 generator seed after the runs' derivations)."""
    value = nonneg_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and {SEED_MAX}, got {value}")
    return value


# 10x the longest published DINO run (DINOv3's 7B: 1M iterations). Beyond it a number is a
# stand-in for "forever", and resolve() fits the teacher momentum by walking every step once
# (0.26 s per million steps), before the command prints anything.
MAX_STEP_BUDGET = 10_000_000


def _steps(text: str, beyond: str) -> int:
    value = positive_int(text)
    if value > MAX_STEP_BUDGET:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_STEP_BUDGET} steps, got {value}{beyond}")
    return value


def step_count(text: str) -> int:
    """A number of optimizer steps, 1 to MAX_STEP_BUDGET (the demo's --steps)."""
    return _steps(text, "")


def step_budget(text: str) -> int:
    """--max-steps: a number of optimizer steps, or `unlimited` (train until stopped)."""
    from dinox.config import UNLIMITED_STEPS

    if text.strip().lower() == "unlimited":
        return UNLIMITED_STEPS
    return _steps(text, "; for a run that trains until stopped give `unlimited`")


# 20x the deepest ViT trained (ViT-22B: 48 blocks). The memory plan builds the model on the
# meta device, block by block (about 1.5 ms each), before it can say that a model fits no device.
MAX_VIT_DEPTH = 1000


def vit_depth(text: str) -> int:
    """--vit-depth: 1 to MAX_VIT_DEPTH transformer blocks."""
    value = positive_int(text)
    if value > MAX_VIT_DEPTH:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_VIT_DEPTH} blocks, got {value} (ViT-giant has 40)")
    return value


def float_at_least(minimum: float, *, inclusive: bool = True):
    """A finite number >= `minimum` (> when not `inclusive`); nan and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {minimum:g}, "
                                             f"got {text}")
        return value

    return parse


def path_text(text: str) -> str:
    """A path flag kept as given (it may be recorded in a run's config): refused when empty,
    where an empty string would silently mean the current folder or the flag's default."""
    path(text)
    return text


def path(text: str) -> Path:
    """A path that names something: an empty string would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


# The networks a checkpoint holds and the devices a command runs on, for the light commands'
# parsers (eval, monitor), which must not import torch to build them; the same lists as
# dinox.eval.load.NETWORKS and dinox.config.DEVICE_CHOICES (tests/test_commands.py checks).
NETWORK_CHOICES = ("teacher", "student")
DEVICE_CHOICES = ("auto", "cuda", "rocm", "mps", "cpu")


def add_network_and_device(p: argparse.ArgumentParser) -> None:
    """--network (the backbone read) and --device, as every evaluating command takes them."""
    p.add_argument("--network", choices=NETWORK_CHOICES, default="teacher",
                   help="the backbone read: the EMA teacher (what DINO evaluates; default) or the student")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="auto: a GPU (CUDA, ROCm) or Apple MPS where present, else the CPU")
