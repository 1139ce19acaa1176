"""WaDi distillation: VSD with LoRaD adapters on one shared frozen base (method.md sections 3-4).

Names are imported lazily (each from its submodule on first use) so ``wadi --help``,
which imports ``wadi.distill.cli``, does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistillConfig": "config",
    "NonFiniteError": "loop",
    "TrainResult": "loop",
    "batch_indices": "loop",
    "train": "loop",
    "add_noise": "losses",
    "fake_score_loss": "losses",
    "generator_loss": "losses",
    "guided": "losses",
    "sample_timesteps": "losses",
    "vsd_gradient": "losses",
    "Roles": "roles",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the submodule holding ``name`` on first use, so ``wadi --help`` stays torch-free."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
