"""wadi: one-step distillation of text-to-image diffusion models with LoRaD."""

__version__ = "0.1.0"
