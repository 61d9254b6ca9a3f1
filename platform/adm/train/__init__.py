"""Distributed training on Ray Train: one per-worker loop for the diffusion model, the noisy
classifier and the upsampler (`loop.py`), their objectives, EMA, checkpoints and export."""
from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
