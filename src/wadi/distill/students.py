"""How the student is parametrized on the shared frozen base: one strategy class per kind.

The paper's student is a LoRaD adapter; the baselines of its ablation are PEFT LoRA,
PEFT DoRA (with and without a trained magnitude) and a fine-tuned copy of the
denoiser.  Each is a :class:`StudentAdapter`; :class:`wadi.distill.roles.Roles` holds
one and never asks which kind it is, so a new kind of student is one new class here and
one entry in :data:`STUDENT_ADAPTERS`.

Every kind adapts exactly the layers the student preset selects (``lorad.select_layers``),
so the comparison is on the same layers.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from wadi import lorad

STUDENT = "student"

__all__ = [
    "StudentAdapter",
    "LoRaDStudent",
    "PeftStudent",
    "FullStudent",
    "STUDENT_ADAPTERS",
    "make_student_adapter",
    "preset_layer_names",
]


def preset_layer_names(model: nn.Module, config: lorad.LoRaDConfig) -> list[str]:
    """Module names of the plain layers ``config`` selects in ``model`` (a layer already
    wrapped by LoRaD is named by its ``.base_layer``)."""
    wrapped = {name for name, _ in lorad.lorad_layers(model)}
    return [
        f"{name}.base_layer" if name in wrapped else name
        for name, _ in lorad.select_layers(model, config)
    ]


class StudentAdapter:
    """One way of making the student trainable on ``backbone.denoiser`` (the shared base).

    Life cycle: ``before_fake(backbone)`` (before the fake score's adapter exists),
    ``attach(backbone)`` (after it; leave the student switched off), then ``active()``
    as the student role, ``parameters()`` / ``named_state()`` for the optimizer,
    checkpoints and EMA, ``merged()`` once at the end.
    """

    name = "?"

    def __init__(self, config: lorad.LoRaDConfig, rank: int | None = None):
        self.config = config  # the student preset: which layers, and LoRaD's rank
        self.rank = rank or config.rank

    def before_fake(self, backbone) -> None:
        self.backbone = backbone
        self.base = backbone.denoiser

    def attach(self, backbone) -> None:
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_state().values())

    def named_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @contextlib.contextmanager
    def active(self):
        raise NotImplementedError
        yield

    def models(self) -> list[nn.Module]:
        """The modules that run as the student (for train mode and checkpointing)."""
        return [self.base]

    def base_parameter_filter(self, name: str) -> bool:
        """Whether a parameter of the base belongs to the frozen base (not to an adapter)."""
        return "lorad_" not in name

    def save(self, folder: Path) -> None:
        """Extra files of this kind in a checkpoint/final folder (besides student.safetensors)."""

    def merged(self) -> nn.Module:
        """A plain denoiser (stock modules only) computing the student. Consumes the base."""
        raise NotImplementedError

    def _drop_lorad(self, model: nn.Module) -> nn.Module:
        for name, module in list(lorad.lorad_layers(model)):
            _replace(model, name, module.base_layer)
        return model


class LoRaDStudent(StudentAdapter):
    """The paper's student: a LoRaD rotation adapter named ``"student"``."""

    name = "lorad"

    def attach(self, backbone) -> None:
        lorad.attach(self.base, self.config, STUDENT, activate=False)

    def named_state(self):
        return lorad.adapter_state_dict(self.base, STUDENT)

    def parameters(self):
        return lorad.adapter_parameters(self.base, STUDENT)

    @contextlib.contextmanager
    def active(self):
        with lorad.using(self.base, STUDENT):
            yield self.base

    def save(self, folder: Path) -> None:
        lorad.save_adapter(self.base, folder / "student_adapter", STUDENT)

    def merged(self):
        return lorad.merge_and_unload(self.base, STUDENT)


class PeftStudent(StudentAdapter):
    """PEFT LoRA or DoRA (``alpha = r``) on the preset's layers; DoRA's magnitude may be frozen.

    ``train_magnitude=False`` is the paper's "DoRA with frozen norm" row: the magnitude
    vector keeps the base's column norms, only the low-rank direction update trains.
    """

    def __init__(self, config, rank=None, *, use_dora=False, train_magnitude=True):
        super().__init__(config, rank)
        self.use_dora = use_dora
        self.train_magnitude = train_magnitude
        self.name = "dora" if use_dora else "lora"
        if use_dora and not train_magnitude:
            self.name = "dora-fixed"

    def attach(self, backbone) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        trainable = [p for p in self.base.parameters() if p.requires_grad]
        names = preset_layer_names(self.base, self.config)
        peft_config = LoraConfig(
            r=self.rank, lora_alpha=self.rank, target_modules=names, use_dora=self.use_dora
        )
        inject_adapter_in_model(peft_config, self.base, adapter_name=STUDENT)
        for p in trainable:  # PEFT freezes every parameter that is not its own
            p.requires_grad_(True)
        for name, p in self.base.named_parameters():
            if "lora_" not in name:
                continue
            p.data = p.data.float()
            p.requires_grad_(self._trained(name))
        self._set_enabled(False)

    def _layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.base.modules() if isinstance(m, BaseTunerLayer)]

    def _set_enabled(self, enabled: bool) -> None:
        for layer in self._layers():
            layer.enable_adapters(enabled)  # also sets requires_grad of its adapter tensors
        if enabled and not self.train_magnitude:
            for name, p in self.base.named_parameters():
                if "lora_magnitude" in name:
                    p.requires_grad_(False)

    def _trained(self, name: str) -> bool:
        return "lora_" in name and (self.train_magnitude or "magnitude" not in name)

    def named_state(self):
        # by name, not requires_grad: PEFT's enable_adapters toggles requires_grad
        return {n: p for n, p in self.base.named_parameters() if self._trained(n)}

    def base_parameter_filter(self, name: str) -> bool:
        return "lorad_" not in name and "lora_" not in name

    @contextlib.contextmanager
    def active(self):
        self._set_enabled(True)
        try:
            with lorad.using(self.base, None):
                yield self.base
        finally:
            self._set_enabled(False)

    def merged(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.base
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[STUDENT])
                _replace(model, name, module.get_base_layer())
        return self._drop_lorad(model)


class FullStudent(StudentAdapter):
    """A trainable fp32 copy of the denoiser, made before any adapter exists.

    ``scope="preset"`` trains exactly the preset's layers (weight and bias: the fair
    comparison), ``scope="all"`` every parameter.
    """

    name = "full"

    def __init__(self, config, rank=None, *, scope="preset"):
        super().__init__(config, rank)
        if scope not in ("preset", "all"):
            raise ValueError(f"full_scope must be 'preset' or 'all', got {scope!r}")
        self.scope = scope

    def before_fake(self, backbone) -> None:
        super().before_fake(backbone)
        self.copy = copy.deepcopy(self.base)
        nn.Module.to(self.copy, torch.float32)  # diffusers' own .to() warns about fp32 modules
        if self.scope == "all":
            self.copy.requires_grad_(True)
        else:
            self.copy.requires_grad_(False)
            for name in preset_layer_names(self.copy, self.config):
                self.copy.get_submodule(name).requires_grad_(True)

    def attach(self, backbone) -> None:
        pass

    def named_state(self):
        return {n: p for n, p in self.copy.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def active(self):
        self.backbone.denoiser = self.copy
        try:
            yield self.copy
        finally:
            self.backbone.denoiser = self.base

    def models(self):
        return [self.base, self.copy]

    def merged(self):
        return self.copy


def _lora(config, rank, **_):
    return PeftStudent(config, rank)


def _dora(config, rank, **_):
    return PeftStudent(config, rank, use_dora=True)


def _dora_fixed(config, rank, **_):
    return PeftStudent(config, rank, use_dora=True, train_magnitude=False)


def _full(config, rank, full_scope="preset", **_):
    return FullStudent(config, rank, scope=full_scope)


def _lorad(config, rank, **_):
    return LoRaDStudent(config, rank)


# name -> factory(student preset config, rank, **options)
STUDENT_ADAPTERS = {
    "lorad": _lorad,
    "lora": _lora,
    "dora": _dora,
    "dora-fixed": _dora_fixed,
    "full": _full,
}


def make_student_adapter(name: str, config, rank=None, **options) -> StudentAdapter:
    if name not in STUDENT_ADAPTERS:
        raise ValueError(
            f"unknown student adapter {name!r}: choose one of {', '.join(STUDENT_ADAPTERS)}"
        )
    return STUDENT_ADAPTERS[name](config, rank, **options)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
