"""Capture and restore every global random number generator a training step touches.

The captured state holds only tensors, ints, floats, strings and None, so it can live in a
checkpoint that loads with `torch.load(weights_only=True)`. Restoring on different
hardware (a CUDA checkpoint on a CPU or ROCm box with another device count) restores what
exists there and logs what could not be; exact replay is only promised on the same setup.
"""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

log = logging.getLogger("dinox.checkpoint")


def _python_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _set_python_state(state: dict) -> None:
    internal = tuple(int(v) for v in state["state"].tolist())
    random.setstate((int(state["version"]), internal, state["gauss_next"]))


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(
        (state["bit_generator"], keys, int(state["pos"]), int(state["has_gauss"]),
         float(state["cached_gaussian"]))
    )


def seed_all(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and accelerators).

    Every run seeds all of them, not only the ones it uses: their states are in each
    checkpoint, and an unseeded Python or NumPy RNG would start from fresh OS entropy in
    every process, so an uninterrupted run and a resumed one would end with different
    states (and a later continuation would diverge)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(device, generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python `random`, numpy's legacy global RNG, torch CPU, and the accelerator RNGs
    (all CUDA/ROCm devices when `device` is cuda, the MPS generator when it is mps).
    `generators` (optional, e.g. the augmentation generator) are stored by name."""
    dev = torch.device(device)
    state: dict = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    if dev.type == "mps" and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state().cpu()
    if generators:
        state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def restore_rng_state(state: dict, device, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`. Missing parts are skipped, so checkpoints from
    other hardware still resume (with a logged notice)."""
    dev = torch.device(device)
    if "python" in state:
        _set_python_state(state["python"])
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        saved = state["cuda"]
        if dev.type == "cuda" and torch.cuda.is_available():
            count = torch.cuda.device_count()
            for index, s in enumerate(saved[:count]):
                torch.cuda.set_rng_state(s.cpu(), index)
            if len(saved) != count:
                log.info("checkpoint holds RNG states for %d CUDA devices, this machine has %d; "
                         "restored %d", len(saved), count, min(len(saved), count))
        else:
            log.info("checkpoint holds CUDA RNG states; not restored on device %s", dev)
    if "mps" in state:
        if dev.type == "mps" and torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"].cpu())
        else:
            log.info("checkpoint holds an MPS RNG state; not restored on device %s", dev)
    saved_generators = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved_generators:
            g.set_state(saved_generators[name].cpu())
        else:
            log.warning("checkpoint holds no state for RNG generator %r; it keeps its seed", name)
