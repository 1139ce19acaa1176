"""The three networks of WaDi on ONE frozen base: teacher, fake score, student.

* teacher    = the base denoiser with every adapter off
* fake score = base + LoRaD adapter ``"fake"`` (rank 32 by default)
* student    = base + LoRaD adapter ``"student"`` (the paper), or a baseline:
  PEFT LoRA / DoRA on the same layers, or a trainable copy (``full``) whose trainable
  part is the same layers (``full_scope="preset"``, weight and bias) or everything
  (``full_scope="all"``)

Each role is a context manager that switches the shared denoiser into that
role.  Run a backward pass inside the same role as its forward: activation
checkpointing recomputes the forward during backward with the role then set.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from wadi import lorad

STUDENT, FAKE = "student", "fake"


class Roles:
    """Owns the adapters on ``backbone.denoiser`` and switches between roles."""

    has_fake = True  # a fake score exists (recipes without one, like fine-tuning, say False)

    def __init__(
        self,
        backbone,
        adapter="lorad",
        student_rank=None,
        fake_rank=None,
        include_conv=False,
        full_scope="preset",
    ):
        if full_scope not in ("preset", "all"):
            raise ValueError(f"full_scope must be 'preset' or 'all', got {full_scope!r}")
        self.backbone = backbone
        self.adapter = adapter
        self.full_scope = full_scope
        self.base = backbone.denoiser
        self.student_copy: nn.Module | None = None
        self.student_config = lorad.preset(
            backbone.student_preset,
            include_conv=include_conv,
            **({"rank": student_rank} if student_rank else {}),
        )
        if adapter == "full":
            # the baseline: a trainable copy of the denoiser, made before any adapter exists
            self.student_copy = copy.deepcopy(self.base)
            self.student_copy.to(torch.float32)
            if full_scope == "all":
                self.student_copy.requires_grad_(True)
            else:  # the layers the adapters would get: the fair comparison
                self.student_copy.requires_grad_(False)
                for name in self._preset_layer_names(self.student_copy):
                    self.student_copy.get_submodule(name).requires_grad_(True)
        fake_cfg = lorad.preset(
            backbone.fake_preset,
            include_conv=include_conv,
            **({"rank": fake_rank} if fake_rank else {}),
        )
        lorad.attach(self.base, fake_cfg, FAKE, activate=False)
        if adapter == "lorad":
            lorad.attach(self.base, self.student_config, STUDENT, activate=False)
        elif adapter in ("lora", "dora"):
            self._attach_peft(adapter == "dora", student_rank or self.student_config.rank)
        lorad.set_active(self.base, None)

    # -- baselines -----------------------------------------------------------
    def _preset_layer_names(self, model: nn.Module) -> list[str]:
        """Module names of the plain layers the student preset selects in ``model``
        (``lorad.select_layers``, the one matching rule; wrapped ones by ``.base_layer``)."""
        wrapped = {name for name, _ in lorad.lorad_layers(model)}
        return [
            f"{name}.base_layer" if name in wrapped else name
            for name, _ in lorad.select_layers(model, self.student_config)
        ]

    def _attach_peft(self, use_dora: bool, rank: int) -> None:
        """PEFT LoRA/DoRA on exactly the layers the LoRaD student preset selects."""
        from peft import LoraConfig, inject_adapter_in_model

        names = self._preset_layer_names(self.base)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, use_dora=use_dora)
        inject_adapter_in_model(config, self.base, adapter_name=STUDENT)
        for p in self.fake_parameters():  # PEFT freezes every parameter that is not its own
            p.requires_grad_(True)
        for p in self.peft_parameters():
            p.data = p.data.float()
            p.requires_grad_(True)
        self._set_peft_enabled(False)

    def _peft_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.base.modules() if isinstance(m, BaseTunerLayer)]

    def peft_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.base.named_parameters() if "lora_" in n]

    def _set_peft_enabled(self, enabled: bool) -> None:
        for layer in self._peft_layers():
            layer.enable_adapters(enabled)

    # -- parameters -------------------------------------------------------------
    def student_parameters(self) -> list[nn.Parameter]:
        if self.adapter == "lorad":
            return lorad.adapter_parameters(self.base, STUDENT)
        if self.adapter in ("lora", "dora"):
            return self.peft_parameters()
        return [p for p in self.student_copy.parameters() if p.requires_grad]

    def fake_parameters(self) -> list[nn.Parameter]:
        return lorad.adapter_parameters(self.base, FAKE)

    def student_named_state(self) -> dict[str, torch.Tensor]:
        """The student's trainable tensors by stable name (for checkpoints and EMA)."""
        if self.adapter == "lorad":
            return lorad.adapter_state_dict(self.base, STUDENT)
        if self.adapter in ("lora", "dora"):
            return {n: p for n, p in self.base.named_parameters() if "lora_" in n}
        return {n: p for n, p in self.student_copy.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of student and fake score, and the frozen base's size."""
        base = sum(
            p.numel()
            for n, p in self.base.named_parameters()
            if "lorad_" not in n and "lora_" not in n
        )
        return {
            "base": base,
            "student": sum(p.numel() for p in self.student_parameters()),
            "fake": sum(p.numel() for p in self.fake_parameters()),
        }

    # -- roles ---------------------------------------------------------------------
    @contextlib.contextmanager
    def teacher(self):
        with lorad.disabled(self.base):
            yield self.base

    @contextlib.contextmanager
    def fake(self):
        with lorad.using(self.base, FAKE):
            yield self.base

    @contextlib.contextmanager
    def student(self):
        if self.adapter == "lorad":
            with lorad.using(self.base, STUDENT):
                yield self.base
        elif self.adapter in ("lora", "dora"):
            self._set_peft_enabled(True)
            try:
                with lorad.using(self.base, None):
                    yield self.base
            finally:
                self._set_peft_enabled(False)
        else:
            self.backbone.denoiser = self.student_copy
            try:
                yield self.student_copy
            finally:
                self.backbone.denoiser = self.base

    def enable_gradient_checkpointing(self) -> None:
        for model in (self.base, self.student_copy):
            if model is not None and hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()

    def train(self) -> None:
        self.base.train()
        if self.student_copy is not None:
            self.student_copy.train()

    # -- export ----------------------------------------------------------------------
    @torch.no_grad()
    def merged_student(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A plain denoiser (stock modules only) computing the student.

        ``state`` replaces the student's tensors first (e.g. the EMA weights).
        Consumes the shared base: call it once, at the end of a run.
        """
        if state is not None:
            current = self.student_named_state()
            for name, value in state.items():
                current[name].data.copy_(value)
        if self.adapter == "full":
            return self.student_copy
        model = self.base
        lorad.delete_adapter(model, FAKE)
        if self.adapter == "lorad":
            return lorad.merge_and_unload(model, STUDENT)
        # PEFT baselines: merge every LoRA/DoRA layer, then drop the (now empty) LoRaD wrappers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[STUDENT])
                _replace(model, name, module.get_base_layer())
        for name, module in list(lorad.lorad_layers(model)):
            _replace(model, name, module.base_layer)
        return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
