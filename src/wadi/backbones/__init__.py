"""Teacher backbones behind one interface: loading, prompt encoding, eps prediction, export.

Names are imported lazily so ``wadi --help`` does not load torch.
"""

from __future__ import annotations

from wadi._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
