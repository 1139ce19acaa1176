"""WaDi distillation: VSD with LoRaD adapters on one shared frozen base (method.md sections 3-4)."""

from .config import DistillConfig
from .loop import NonFiniteError, TrainResult, batch_indices, train
from .losses import (
    add_noise,
    fake_score_loss,
    generator_loss,
    guided,
    sample_timesteps,
    vsd_gradient,
)
from .roles import Roles

__all__ = [
    "DistillConfig",
    "NonFiniteError",
    "Roles",
    "TrainResult",
    "add_noise",
    "batch_indices",
    "fake_score_loss",
    "generator_loss",
    "guided",
    "sample_timesteps",
    "train",
    "vsd_gradient",
]
