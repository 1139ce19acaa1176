"""LoRaD: a low-rank adapter that only rotates weight directions.

Works on any PyTorch model: :func:`attach` wraps the selected ``nn.Linear``
(and optionally ``nn.Conv2d``) layers in place; the math lives in
:mod:`wadi.lorad.functional`.
"""

from .config import LoRaDConfig
from .functional import angles, rotate_pairs, rotate_pairs_grad_theta
from .io import AdapterMismatchError, adapter_state_dict, load_adapter, save_adapter
from .layer import LoRaDConv2d, LoRaDLayer, LoRaDLinear, trainable_count
from .model import (
    active_adapter,
    adapter_config,
    adapter_names,
    adapter_parameters,
    attach,
    count_adapter_parameters,
    delete_adapter,
    disabled,
    lorad_layers,
    merge,
    merge_and_unload,
    select_layers,
    set_active,
    unmerge,
    using,
)
from .presets import PRESETS, preset, preset_names

__all__ = [
    "LoRaDConfig",
    "LoRaDLayer",
    "LoRaDLinear",
    "LoRaDConv2d",
    "AdapterMismatchError",
    "PRESETS",
    "active_adapter",
    "adapter_config",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "angles",
    "attach",
    "count_adapter_parameters",
    "delete_adapter",
    "disabled",
    "load_adapter",
    "lorad_layers",
    "merge",
    "merge_and_unload",
    "preset",
    "preset_names",
    "rotate_pairs",
    "rotate_pairs_grad_theta",
    "save_adapter",
    "select_layers",
    "set_active",
    "trainable_count",
    "unmerge",
    "using",
]
