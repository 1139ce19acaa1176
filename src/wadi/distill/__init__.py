"""WaDi distillation: VSD with LoRaD adapters on one shared frozen base (method.md sections 3-4).

Names are imported lazily (each from its submodule on first use) so ``wadi --help``,
which imports ``wadi.distill.cli``, does not load torch.
"""

from __future__ import annotations

from wadi._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
