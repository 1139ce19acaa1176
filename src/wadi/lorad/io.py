"""Save and load LoRaD adapters as ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the angle factors are written (keys ``<module>.lorad_A`` and
``<module>.lorad_B``, module names as in the unwrapped model), never the base
weights.  Files are written to a temporary name and renamed, so a crash never
leaves a half-written adapter in place of a good one.  ``adapter_config.json``
also records the adapter's ``role`` in a distillation run ("student" or "fake"),
so commands that need the student can refuse the fake score by name; adapters
saved before roles were recorded have none and still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from wadi.files import atomic_file, write_text

from .config import CONFIG_NAME, LoRaDConfig
from .model import adapter_config, adapter_names, attach, lorad_layers

WEIGHTS_NAME = "adapter_model.safetensors"
#: roles of a run's adapters (a distillation's student and fake score, a fine-tuned model's
#: adapter); an adapter named "student" or "fake" gets that role by default
ROLES = ("student", "fake", "finetune")

__all__ = [
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "AdapterMismatchError",
    "WEIGHTS_NAME",
    "adapter_role",
    "require_role",
]


class AdapterMismatchError(ValueError):
    """The adapter files do not fit the model's architecture."""


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"<module>.lorad_A": A, "<module>.lorad_B": B}`` for one adapter (detached)."""
    adapter_config(model, adapter_name)
    state = {}
    for name, layer in lorad_layers(model):
        if adapter_name in layer.lorad_A:
            state[f"{name}.lorad_A"] = layer.lorad_A[adapter_name].detach()
            state[f"{name}.lorad_B"] = layer.lorad_B[adapter_name].detach()
    return state


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    role: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` (created if needed).

    ``role`` ("student" or "fake") is recorded in ``adapter_config.json``; by default an
    adapter named "student" or "fake" gets that role and any other name none.
    """
    if role is None and adapter_name in ("student", "fake"):
        role = adapter_name
    if role is not None and role not in ROLES:
        raise ValueError(f"adapter role must be one of {', '.join(ROLES)}, got {role!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, adapter_name)
    state = {
        k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model, adapter_name).items()
    }
    metadata = {"format": "pt", "wadi_adapter": "lorad", "adapter_name": adapter_name}
    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    data = config.to_dict()
    if role is not None:
        data["role"] = role
    write_text(directory / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return directory


def adapter_role(directory: str | os.PathLike) -> str | None:
    """The role recorded in ``directory/adapter_config.json`` ("student", "fake"), or ``None``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a wadi adapter folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter looks damaged") from None
    return data.get("role") if isinstance(data, dict) else None


def require_role(directory: str | os.PathLike, role: str | tuple[str, ...]) -> None:
    """Refuse an adapter whose recorded role is not ``role`` (or one of them; no recorded
    role passes)."""
    roles = (role,) if isinstance(role, str) else tuple(role)
    role = roles[0]
    found = adapter_role(directory)
    if found is not None and found not in roles:
        hint = (
            " (the run's fake score, trained only to guide the student)" if found == "fake" else ""
        )
        raise ValueError(
            f"adapter {directory} is the {found} adapter{hint}, not the {role}: give the run's "
            f"{role}_adapter folder (OUTPUT/final/{role}_adapter)"
        )


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    activate: bool = True,
    freeze_base: bool = True,
) -> nn.Module:
    """Attach (if needed) and fill adapter ``adapter_name`` from ``directory``.

    The files must fit the model: every wrapped module and shape must match.
    On a mismatch raises :class:`AdapterMismatchError` naming the first
    modules that differ, expected vs found, and leaves the model unchanged.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: is {directory} a wadi LoRaD adapter folder?")
    config = LoRaDConfig.load(directory)
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - SafetensorError: a damaged file, one line
        from wadi.paths import DamagedFileError, damaged_message

        raise DamagedFileError(damaged_message(weights, err)) from None

    expected = _expected_shapes(model, config, adapter_name)
    problems = _compare(expected, saved)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise AdapterMismatchError(
            f"adapter in {directory} does not fit this model ({len(problems)} mismatches): {shown}. "
            "Load it into the architecture it was trained on."
        )
    if adapter_name not in adapter_names(model):
        attach(model, config, adapter_name, activate=activate, freeze_base=freeze_base)
    layers = dict(lorad_layers(model))
    with safe_open(str(weights), framework="pt") as f, torch.no_grad():
        for key in f.keys():
            module, _, which = key.rpartition(".")
            param = getattr(layers[module], which)[adapter_name]
            param.copy_(f.get_tensor(key).to(param.dtype))
    return model


def _expected_shapes(
    model: nn.Module, config: LoRaDConfig, adapter_name: str
) -> dict[str, list[int]]:
    """Key -> shape the adapter files must have for this model."""
    shapes = {}
    if adapter_name in adapter_names(model):
        for name, layer in lorad_layers(model):
            if adapter_name in layer.lorad_A:
                shapes[f"{name}.lorad_A"] = list(layer.lorad_A[adapter_name].shape)
                shapes[f"{name}.lorad_B"] = list(layer.lorad_B[adapter_name].shape)
        return shapes
    from .model import select_layers

    for name, base in select_layers(model, config):
        out_features = base.weight.shape[0]
        pairs = base.weight[0].numel() // 2
        shapes[f"{name}.lorad_A"] = [out_features, config.rank]
        shapes[f"{name}.lorad_B"] = [config.rank, pairs]
    return shapes


def _compare(expected: dict[str, list[int]], found: dict[str, list[int]]) -> list[str]:
    problems = []
    for key in sorted(set(expected) | set(found)):
        module = key.rpartition(".")[0]
        if key not in found:
            problems.append(
                f"module {module}: expected {key.rpartition('.')[2]} {expected[key]}, found none"
            )
        elif key not in expected:
            problems.append(
                f"module {module}: found {key.rpartition('.')[2]} {found[key]}, model has no such layer"
            )
        elif list(expected[key]) != list(found[key]):
            problems.append(
                f"module {module}: {key.rpartition('.')[2]} expected shape {expected[key]}, found {found[key]}"
            )
    return problems
