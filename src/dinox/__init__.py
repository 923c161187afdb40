"""dinox: DINOv3-style self-supervised pretraining of Vision Transformers on CT."""

__version__ = "0.1.0"
