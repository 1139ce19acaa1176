"""Fine-tuning a base model with LoRaD (or PEFT LoRA / DoRA): DreamBooth (``wadi finetune``).

The run is the core's: :func:`wadi.distill.loop.train` with the DreamBooth recipe
(:mod:`wadi.finetune.dreambooth`), so lock, hooks, checkpoints and resume are shared.
"""

from .config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune"]


def finetune(config, **kwargs):
    """:func:`wadi.finetune.dreambooth.finetune` (imported on first use)."""
    from .dreambooth import finetune as run

    return run(config, **kwargs)
