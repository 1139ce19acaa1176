"""The two roles of a fine-tuning run on one frozen base: the base itself and the tuned model.

:class:`FinetuneRoles` is the core's :class:`~wadi.distill.roles.Roles` without a fake
score: the student adapter (LoRaD, PEFT LoRA / DoRA, one strategy class each in
:mod:`wadi.distill.students`) on the layers of the backbone's student preset, at the
rank asked for.  Checkpoints, resume and merging then run the core's code.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from wadi import lorad
from wadi.distill.roles import Roles
from wadi.distill.students import make_student_adapter

__all__ = ["FinetuneRoles", "FINETUNE_ADAPTERS"]

FINETUNE_ADAPTERS = ("lorad", "lora", "dora")


class FinetuneRoles(Roles):
    """``teacher()`` is the base, ``student()`` the tuned model; there is no fake score."""

    has_fake = False

    def __init__(self, backbone, adapter: str = "lorad", rank: int = 16, include_conv=False):
        if adapter not in FINETUNE_ADAPTERS:
            raise ValueError(f"adapter must be one of {FINETUNE_ADAPTERS}, got {adapter!r}")
        self.backbone, self.adapter, self.full_scope = backbone, adapter, "preset"
        self.base = backbone.denoiser
        self.student_config = lorad.preset(
            backbone.student_preset, include_conv=include_conv, rank=rank
        )
        self.student_adapter = make_student_adapter(adapter, self.student_config, rank)
        self.student_adapter.before_fake(backbone)
        self.student_adapter.attach(backbone)
        lorad.set_active(self.base, None)

    def fake_parameters(self) -> list[nn.Parameter]:
        return []

    @contextlib.contextmanager
    def fake(self):
        raise ValueError("a fine-tuning run has no fake score")
        yield  # pragma: no cover

    @torch.no_grad()
    def merged_student(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The tuned denoiser with the adapter merged (stock modules only); consumes the base."""
        if state is not None:
            current = self.student_named_state()
            for name, value in state.items():
                current[name].data.copy_(value)
        return self.student_adapter.merged()
