"""dinox: DINOv3-style self-supervised pretraining of Vision Transformers on CT."""

__version__ = "0.1.0"


def load_backbone(path, device="cpu", network: str = "teacher"):
    """The backbone (a ``dinox.model.vit.VisionTransformer`` in eval mode, on ``device``)
    stored at ``path``, ready for feature extraction: ``backbone(x)`` returns
    ``{"cls", "registers", "patches"}`` for ``x`` of shape (B, 3, H, W).

    ``path`` may be a dinox training checkpoint (``network``: "teacher", the EMA network
    DINO evaluates, or "student"), a folder written by ``dinox export`` (hf or safetensors),
    a ``backbone.safetensors`` file, or weights dinox can import (a transformers
    Dinov2 / DINOv3 folder, a torch-hub DINOv2 / DINOv3 ``.pth``). Only tensors are loaded
    (``weights_only=True``); anything else is refused with a ``dinox.errors.UserError``.
    """
    # Imported here, by name: every `import dinox.<module>` runs this file first, so it must
    # not pull in the model, config and eval packages (tests/test_layout.py keeps it bare).
    import importlib

    import torch

    weights = importlib.import_module("dinox.model.weights")
    if weights.detect_source(path) == weights.DINOX_CHECKPOINT:
        load = importlib.import_module("dinox.eval.load")
        backbone, _, _ = load.load_for_inference(path, torch.device(device), which=network)
        return backbone
    return weights.load_exported(path, device=device)
