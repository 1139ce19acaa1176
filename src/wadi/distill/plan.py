"""``wadi distill --dry-run``: the memory a run needs per process, before anything loads.

The denoiser is built on the meta device from its ``config.json`` (no weights read), the
adapters are attached to it there, and the other parts (text encoders, VAE) are sized
from their safetensors headers.  The plan counts what is resident for the whole run:

- the frozen base (denoiser, text encoders unless ``embeddings``, VAE) in the run's dtype;
- the trained tensors (student, fake score; fp32), their gradients (fp32) and AdamW's two
  moments (fp32; ``adamw8bit``: one byte each), the student's EMA (fp32) if any.

Activations are not in it: they depend on resolution, batch and checkpointing and are
measured on a GPU by ``benchmarks/gpu_check.sh``.  Sharded over ``N`` processes
(``--fsdp``, :mod:`wadi.distill.fsdp`) each frozen denoiser weight is split along its first
dimension, padded to a multiple of ``N`` as FSDP2 does, so a process holds
``ceil(d0 / N) * rest`` elements of it (exactly the largest local shard a run holds,
``tests/distill/test_fsdp.py``); the adapters stay whole.  While a block runs its weights
are gathered whole: the plan's ``largest_block`` (up to two at a time when the next
block's all-gather overlaps on a GPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["MemoryPlan", "plan_for_denoiser", "plan_run", "format_plan"]

_DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
_GIB = 1024**3


@dataclass
class MemoryPlan:
    """Bytes per process, by part (see the module docstring)."""

    denoiser: int
    text_encoders: int
    vae: int
    student: int
    fake: int
    gradients: int
    optimizer: int
    ema: int
    student_params: int
    fake_params: int
    base_params: int
    #: (first dimension, elements per row) of every frozen denoiser weight, for sharding
    denoiser_rows: tuple[tuple[int, int], ...] = ()
    largest_block: int = 0  # bytes of the largest FSDP unit, gathered while it runs

    def sharded_denoiser(self, shards: int = 1) -> int:
        """Bytes of the frozen denoiser on one process with ``shards`` processes (FSDP2)."""
        if shards <= 1 or not self.denoiser_rows:
            return self.denoiser if shards <= 1 else -(-self.denoiser // shards)
        width = self.denoiser // sum(d0 * rest for d0, rest in self.denoiser_rows)
        return width * sum(-(-d0 // shards) * rest for d0, rest in self.denoiser_rows)

    def total(self, shards: int = 1) -> int:
        return (
            self.sharded_denoiser(shards)
            + self.text_encoders
            + self.vae
            + self.student
            + self.fake
            + self.gradients
            + self.optimizer
            + self.ema
        )


def _safetensors_elements(folder: Path) -> int:
    """Elements of every tensor in the ``*.safetensors`` files of ``folder`` (headers only)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= int(d)
            total += n
    return total


def _student_count(denoiser, backbone_cls, config) -> tuple[int, int, int]:
    """(student, fake, base) parameter counts of the run's adapters on a meta denoiser."""
    from types import SimpleNamespace

    from .roles import Roles

    base = sum(p.numel() for p in denoiser.parameters())
    stub = SimpleNamespace(
        denoiser=denoiser,
        student_preset=backbone_cls.student_preset,
        fake_preset=backbone_cls.fake_preset,
    )
    roles = Roles(
        stub,
        config.adapter,
        config.student_rank,
        config.fake_rank,
        config.include_conv,
        config.full_scope,
    )
    counts = roles.parameter_counts()
    return counts["student"], counts["fake"], base


def plan_for_denoiser(
    denoiser, backbone_cls, config, *, text_encoder_params: int = 0, vae_params: int = 0
) -> MemoryPlan:
    """The plan for a (meta) denoiser of ``backbone_cls`` under ``config``."""
    student, fake, base = _student_count(denoiser, backbone_cls, config)
    width = _DTYPE_BYTES[config.mixed_precision]
    moments = 2 * (1 if config.optimizer == "adamw8bit" else 4)
    trained = student + fake
    rows, blocks = _frozen_layout(denoiser)
    return MemoryPlan(
        denoiser=base * width,
        text_encoders=0 if config.embeddings else text_encoder_params * width,
        vae=vae_params * width,
        student=student * 4,
        fake=fake * 4,
        gradients=trained * 4,
        optimizer=trained * moments,
        ema=student * 4 if config.ema_decay else 0,
        student_params=student,
        fake_params=fake,
        base_params=base,
        denoiser_rows=rows,
        largest_block=max(blocks, default=0) * width,
    )


def _frozen_layout(denoiser) -> tuple[tuple[tuple[int, int], ...], list[int]]:
    """(d0, rest) of each frozen weight, and the frozen elements of each FSDP unit
    (every block, then the root's rest), on a denoiser with its adapters attached."""
    from .fsdp import block_names

    def frozen(module):
        return [p for n, p in module.named_parameters() if "lorad_" not in n and "lora_" not in n]

    params = frozen(denoiser)
    rows = tuple((p.shape[0], math.prod(p.shape[1:])) if p.dim() else (1, 1) for p in params)
    sizes = [
        sum(p.numel() for p in frozen(denoiser.get_submodule(n))) for n in block_names(denoiser)
    ]
    return rows, [*sizes, sum(p.numel() for p in params) - sum(sizes)]


def plan_run(config) -> MemoryPlan:
    """The plan for ``config.teacher`` (a local pipeline folder), reading no weights."""
    import diffusers

    from wadi.backbones.loading import read_json
    from wadi.backbones.registry import _pick_class, _resolve

    root = _resolve(config.teacher)
    cls = _pick_class(root)
    denoiser_config = read_json(root / cls.denoiser_folder / "config.json")
    model_cls = getattr(diffusers, cls.denoiser_class)
    with torch.device("meta"):
        denoiser = model_cls.from_config(denoiser_config)
    text = sum(_safetensors_elements(p) for p in sorted(root.glob("text_encoder*")) if p.is_dir())
    vae = _safetensors_elements(root / "vae") if (root / "vae").is_dir() else 0
    return plan_for_denoiser(denoiser, cls, config, text_encoder_params=text, vae_params=vae)


def format_plan(plan: MemoryPlan, processes: tuple[int, ...] = (1, 8)) -> str:
    """A table: each part, then the total per process unsharded and with the base sharded."""

    def gib(n: int) -> str:
        return f"{n / _GIB:8.2f}"

    rows = [
        ("frozen denoiser", plan.denoiser),
        ("text encoders", plan.text_encoders),
        ("VAE", plan.vae),
        (f"student ({plan.student_params:,} trained)", plan.student),
        (f"fake score ({plan.fake_params:,} trained)", plan.fake),
        ("gradients (fp32)", plan.gradients),
        ("optimizer moments", plan.optimizer),
        ("student EMA", plan.ema),
    ]
    totals = [("total", plan.total())]
    totals += [
        (f"total, base sharded over {n} (--fsdp)", plan.total(n)) for n in processes if n > 1
    ]
    if plan.largest_block and any(n > 1 for n in processes):
        totals.append(("  + largest block, gathered (--fsdp)", plan.largest_block))
    width = max(len(name) for name, _ in rows + totals) + 2
    lines = [f"{'part':<{width}}{'GiB/process':>12}"]
    lines += [f"{name:<{width}}{gib(n):>12}" for name, n in rows + totals]
    lines.append("activations are not included (benchmarks/gpu_check.sh measures them)")
    return "\n".join(lines)
