"""Load a trained backbone from a checkpoint for inference (eval, monitor, inspect, export)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from dinox.config import config_from_checkpoint
from dinox.errors import UserError
from dinox.model.dino_model import build_dino_model
from dinox.run import checkpoint as store

NETWORKS = ("teacher", "student")


def load_for_inference(path: str | Path, device: torch.device, which: str = "teacher"):
    """(backbone in eval mode on `device`, RunConfig, SimpleNamespace(step, raw)) of the
    `which` network ("teacher" or "student") of a dinox checkpoint."""
    path = Path(path)
    if which not in NETWORKS:
        raise UserError(f"--network {which!r}: choose one of {', '.join(NETWORKS)}")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; list a run's checkpoints with ls data/runs/*/")
    problem = store.not_a_checkpoint(path)
    if problem:
        raise UserError(f"checkpoint {path} {problem}")
    state = store.load_checkpoint(path, map_location="cpu")
    cfg = config_from_checkpoint(state)
    with torch.device("cpu"):
        model = build_dino_model(cfg.model, img_size=cfg.views.img_size, drop_path=0.0)
    model.load_state_dict(state[which])
    backbone = model.backbone.to(device).eval()
    backbone.grad_checkpoint = False
    return backbone, cfg, SimpleNamespace(step=int(state.get("step", 0)), raw=state)
