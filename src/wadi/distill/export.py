"""Export any checkpoint of a run (``step-*`` or ``final``) as a stock diffusers pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import DistillConfig


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    use_ema: bool = False,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Rebuild the run's student from ``checkpoint_dir``, merge it, write a pipeline folder.

    Works for every adapter kind (LoRaD, PEFT LoRA/DoRA, full); the teacher and
    ``alpha_bar_T`` come from the checkpoint's ``config.yaml``.
    """
    from wadi.backbones import load_backbone
    from wadi.backbones.export import parse_dtype

    from .roles import Roles

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if (
        not (checkpoint_dir / "config.yaml").is_file()
        or not (checkpoint_dir / "student.safetensors").is_file()
    ):
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a wadi checkpoint (needs config.yaml and student.safetensors); "
            "give OUTPUT/final or OUTPUT/checkpoints/step-*"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    config = DistillConfig.load(checkpoint_dir / "config.yaml")
    source = checkpoint_dir / ("ema.safetensors" if use_ema else "student.safetensors")
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; the run had no EMA (ema_decay) or drop --ema")
    state = ckpt.load_tensors(source)
    backbone = load_backbone(config.teacher, dtype=torch.float32)
    torch.manual_seed(config.seed)
    roles = Roles(
        backbone, config.adapter, config.student_rank, config.fake_rank, config.include_conv
    )
    expected = roles.student_named_state()
    if set(state) != set(expected):
        raise ValueError(f"{source} does not fit the {config.adapter} student of {config.teacher}")
    merged = roles.merged_student(state)
    from wadi.backbones import alpha_bar_from_scheduler

    alpha_bar_T = config.alpha_bar_T or alpha_bar_from_scheduler(
        backbone.scheduler, config.generator_timestep
    )
    return backbone.save_pipeline(merged, out, alpha_bar_T, dtype=parse_dtype(dtype))
