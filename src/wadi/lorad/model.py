"""Model-level LoRaD: inject wrappers into any ``nn.Module`` and manage named adapters.

The functions take the model itself (no wrapper class), so a diffusers U-Net
or transformer keeps its type, ``config`` and ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoRaDConfig
from .layer import LoRaDLayer, wrap_layer

__all__ = [
    "attach",
    "lorad_layers",
    "adapter_names",
    "set_active",
    "active_adapter",
    "using",
    "disabled",
    "adapter_parameters",
    "count_adapter_parameters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "delete_adapter",
]

_CONFIGS_ATTR = "_lorad_configs"


def lorad_layers(model: nn.Module) -> Iterator[tuple[str, LoRaDLayer]]:
    """``(name, layer)`` for every LoRaD wrapper in ``model``, names of the base layers."""
    for name, module in model.named_modules():
        if isinstance(module, LoRaDLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``."""
    return list(getattr(model, _CONFIGS_ATTR, {}))


def adapter_config(model: nn.Module, name: str) -> LoRaDConfig:
    configs = getattr(model, _CONFIGS_ATTR, {})
    if name not in configs:
        raise KeyError(f"no LoRaD adapter {name!r} on this model (adapters: {sorted(configs)})")
    return configs[name]


def _supported(module: nn.Module, config: LoRaDConfig) -> bool:
    return isinstance(module, nn.Linear) or (config.include_conv and isinstance(module, nn.Conv2d))


def select_layers(model: nn.Module, config: LoRaDConfig) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer ``config`` selects in ``model``: the one place the
    matching rule lives (attach, adapter loading and the PEFT/full baselines use it).

    ``layer`` is the plain ``nn.Linear``/``nn.Conv2d`` (for a layer already wrapped by
    LoRaD: the wrapper's ``base_layer``, named by the wrapper's name, which is what
    ``target_modules`` patterns and adapter files refer to).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoRaDLayer):
            if config.matches(name) and _supported(module.base_layer, config):
                found.append((name, module.base_layer))
        elif (
            _supported(module, config) and config.matches(name) and not _inside_wrapper(model, name)
        ):
            found.append((name, module))
    return found


def attach(
    model: nn.Module,
    config: LoRaDConfig,
    adapter_name: str = "default",
    *,
    freeze_base: bool = True,
    activate: bool = True,
) -> nn.Module:
    """Wrap the layers ``config`` selects and add adapter ``adapter_name`` to them.

    A second adapter name on the same model adds its factors to the same
    wrappers (layers not wrapped yet are wrapped).  With ``freeze_base`` every
    parameter that is not a LoRaD factor stops requiring grad.  Returns the
    model, changed in place.
    """
    configs = getattr(model, _CONFIGS_ATTR, None)
    if configs is None:
        configs = {}
        object.__setattr__(model, _CONFIGS_ATTR, configs)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} is already attached; pick another name")

    targets = [(name, model.get_submodule(name)) for name, _ in select_layers(model, config)]
    if not targets:
        raise ValueError(
            f"LoRaD config matched no layer (target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}); check the module names with "
            "model.named_modules()"
        )
    for name, module in targets:
        if not isinstance(module, LoRaDLayer):
            module = wrap_layer(module)
            _set_submodule(model, name, module)
        module.add_adapter(adapter_name, config.rank)
        if activate:
            module.active_adapter = adapter_name
    configs[adapter_name] = config
    if freeze_base:
        for pname, param in model.named_parameters():
            if ".lorad_A." not in f".{pname}" and ".lorad_B." not in f".{pname}":
                param.requires_grad_(False)
    if activate:
        set_active(model, adapter_name)
    return model


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRaDLayer):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def set_active(model: nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the adapter every wrapper applies (``None``: none)."""
    if adapter_name is not None:
        adapter_config(model, adapter_name)
    for _, layer in lorad_layers(model):
        layer.active_adapter = adapter_name if adapter_name in layer.lorad_A else None
    object.__setattr__(model, "_lorad_active", adapter_name)


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "_lorad_active", None)


@contextlib.contextmanager
def using(model: nn.Module, adapter_name: str | None):
    """Context manager: ``adapter_name`` active inside, the previous one restored after."""
    previous = active_adapter(model)
    set_active(model, adapter_name)
    try:
        yield model
    finally:
        set_active(model, previous)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Context manager: the model computes exactly its base model inside."""
    layers = [layer for _, layer in lorad_layers(model)]
    previous = [layer.adapters_disabled for layer in layers]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_disabled = state


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trainable angle factors of one adapter, in a stable order."""
    adapter_config(model, adapter_name)
    params = []
    for _, layer in lorad_layers(model):
        if adapter_name in layer.lorad_A:
            params += [layer.lorad_A[adapter_name], layer.lorad_B[adapter_name]]
    return params


def count_adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> int:
    """Number of angle-factor elements of one adapter, or of all adapters."""
    names = adapter_names(model) if adapter_name is None else [adapter_name]
    return sum(p.numel() for name in names for p in adapter_parameters(model, name))


def merge(model: nn.Module, adapter_name: str) -> None:
    """Rotate the base weights by adapter ``adapter_name`` (in place)."""
    adapter_config(model, adapter_name)
    for _, layer in lorad_layers(model):
        if adapter_name in layer.lorad_A:
            layer.merge(adapter_name)


def unmerge(model: nn.Module, adapter_name: str) -> None:
    """Rotate the base weights back by ``-theta`` (in place)."""
    for _, layer in lorad_layers(model):
        layer.unmerge(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    adapter_config(model, adapter_name)
    for _, layer in lorad_layers(model):
        if adapter_name in layer.lorad_A:
            layer.delete_adapter(adapter_name)
    del getattr(model, _CONFIGS_ATTR)[adapter_name]
    if active_adapter(model) == adapter_name:
        object.__setattr__(model, "_lorad_active", None)


@torch.no_grad()
def merge_and_unload(model: nn.Module, adapter_name: str) -> nn.Module:
    """Merge ``adapter_name`` and replace every wrapper by its plain base layer.

    Other adapters are dropped.  The result holds only stock ``nn.Linear`` /
    ``nn.Conv2d`` modules and saves like the original model.
    """
    adapter_config(model, adapter_name)
    for name, layer in list(lorad_layers(model)):
        for other in list(layer.merged_adapters):
            if other != adapter_name:
                layer.unmerge(other)
        if adapter_name in layer.lorad_A:
            layer.merge(adapter_name)
        _set_submodule(model, name, layer.base_layer)
    for attr in (_CONFIGS_ATTR, "_lorad_active"):
        if attr in model.__dict__:
            object.__delattr__(model, attr)
    return model
