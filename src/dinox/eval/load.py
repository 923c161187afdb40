"""Rebuild a trained model from a checkpoint for evaluation and monitoring."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from dinox.errors import UserError
from dinox.model.dino_model import build_dino_model
from dinox.run import checkpoint as ckpt
from dinox.config import TrainConfig


def config_from_state(state: dict) -> TrainConfig:
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError("this checkpoint carries no dinox configuration; was it written by dinox train?")
    known = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def load_for_inference(path: str | Path, device: torch.device, which: str = "teacher"):
    """(backbone in eval mode on `device`, config, checkpoint state) of `which` network."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; list a run's checkpoints with ls data/runs/*/")
    state = ckpt.load_checkpoint(path, map_location="cpu")
    cfg = config_from_state(state)
    with torch.device("cpu"):
        model = build_dino_model(cfg, drop_path=0.0)
    model.load_state_dict(state[which])
    backbone = model.backbone.to(device).eval()
    backbone.grad_checkpoint = False
    return backbone, cfg, SimpleNamespace(step=int(state.get("step", 0)), raw=state)
