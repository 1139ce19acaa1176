"""Teacher backbones behind one interface: loading, prompt encoding, eps prediction, export.

Names are imported lazily so ``wadi --help`` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TextCondition": "conditioning",
    "Backbone": "base",
    "eps_from_model_output": "base",
    "load_backbone": "registry",
    "register_backbone": "registry",
    "registered_backbones": "registry",
    "SDUNetBackbone": "sd",
    "PixArtBackbone": "pixart",
    "SDXLBackbone": "sdxl",
    "SD3Backbone": "sd3",
    "FluxBackbone": "flux",
    "alpha_bar_from_scheduler": "onestep",
    "one_step": "onestep",
    "x0_from_eps": "onestep",
    "ALPHA_BAR_T_REFERENCE": "onestep",
    "sample_multistep": "sampling",
    "save_pipeline": "export",
    "export_student": "export",
    "one_step_scheduler": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wadi.backbones' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
