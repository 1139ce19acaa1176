"""The three networks of WaDi on ONE frozen base: teacher, fake score, student.

* teacher    = the base denoiser with every adapter off
* fake score = base + LoRaD adapter ``"fake"`` (rank 32 by default)
* student    = base + the student adapter: LoRaD ``"student"`` (the paper) or a baseline
  (PEFT LoRA / DoRA / DoRA with frozen magnitude, a trainable copy); each kind is a
  strategy class in :mod:`wadi.distill.students`

Each role is a context manager that switches the shared denoiser into that
role.  Run a backward pass inside the same role as its forward: activation
checkpointing recomputes the forward during backward with the role then set.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from wadi import lorad

from .students import STUDENT, StudentAdapter, make_student_adapter

FAKE = "fake"

__all__ = ["Roles", "STUDENT", "FAKE"]


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
        self.student_config = lorad.preset(
            backbone.student_preset,
            include_conv=include_conv,
            **({"rank": student_rank} if student_rank else {}),
        )
        self.student_adapter: StudentAdapter = make_student_adapter(
            adapter, self.student_config, student_rank, full_scope=full_scope
        )
        self.student_adapter.before_fake(backbone)  # a full copy is made before any adapter
        fake_cfg = lorad.preset(
            backbone.fake_preset,
            include_conv=include_conv,
            **({"rank": fake_rank} if fake_rank else {}),
        )
        lorad.attach(self.base, fake_cfg, FAKE, activate=False)
        self.student_adapter.attach(backbone)
        lorad.set_active(self.base, None)

    @property
    def student_copy(self) -> nn.Module | None:
        return getattr(self.student_adapter, "copy", None)

    # -- parameters -------------------------------------------------------------
    def student_parameters(self) -> list[nn.Parameter]:
        return self.student_adapter.parameters()

    def fake_parameters(self) -> list[nn.Parameter]:
        return lorad.adapter_parameters(self.base, FAKE)

    def student_named_state(self) -> dict[str, torch.Tensor]:
        """The student's trainable tensors by stable name (for checkpoints and EMA)."""
        return self.student_adapter.named_state()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of student and fake score, and the frozen base's size."""
        keep = self.student_adapter.base_parameter_filter
        base = sum(p.numel() for n, p in self.base.named_parameters() if keep(n))
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
        with self.student_adapter.active() as model:
            yield model

    def enable_gradient_checkpointing(self) -> None:
        for model in self.student_adapter.models():
            if hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()

    def train(self) -> None:
        for model in self.student_adapter.models():
            model.train()

    # -- export ----------------------------------------------------------------------
    def save_student_files(self, folder) -> None:
        """The student's kind-specific files in a checkpoint or final folder."""
        self.student_adapter.save(folder)

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
        if self.student_copy is None:
            lorad.delete_adapter(self.base, FAKE)
        return self.student_adapter.merged()
