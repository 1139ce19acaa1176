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

    Works for every adapter kind (LoRaD, PEFT LoRA/DoRA, full); the teacher, the
    generator's timesteps and ``alpha_bar_T`` come from the checkpoint's ``config.yaml``.  ``out`` may not be,
    contain or lie inside the checkpoint, the run's other checkpoints or the teacher.
    """
    from wadi.backbones import load_backbone
    from wadi.backbones.export import check_export_output, parse_dtype
    from wadi.paths import DamagedFileError, damaged_message

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
    check_export_output(out, overwrite, *_run_inputs(checkpoint_dir))
    config = DistillConfig.load(checkpoint_dir / "config.yaml")
    check_export_output(out, overwrite, config.teacher)
    source = checkpoint_dir / ("ema.safetensors" if use_ema else "student.safetensors")
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; the run had no EMA (ema_decay) or drop --ema")
    try:
        state = ckpt.load_tensors(source)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - SafetensorError: a damaged file, one line
        raise DamagedFileError(damaged_message(source, err)) from None
    backbone = load_backbone(config.teacher, dtype=torch.float32, t5=config.t5)
    if getattr(backbone, "guidance_embeds", False):  # FLUX.1-dev: the guidance input it trained
        backbone.guidance = config.guidance_scale  # with, recorded in the stock call
    torch.manual_seed(config.seed)
    roles = Roles(
        backbone,
        config.adapter,
        config.student_rank,
        config.fake_rank,
        config.include_conv,
        config.full_scope,
    )
    expected = roles.student_named_state()
    if set(state) != set(expected):
        raise ValueError(f"{source} does not fit the {config.adapter} student of {config.teacher}")
    merged = roles.merged_student(state)
    from wadi.backbones.export import save_pipeline
    from wadi.generators import make_generator

    # the generator the run trained: its timesteps (and abar_T) decide the scheduler
    generator = make_generator(config.timesteps, config.alpha_bar_T)
    return save_pipeline(backbone, merged, out, generator=generator, dtype=parse_dtype(dtype))


def _run_inputs(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint and, when it sits in a run folder, the run's final/ and checkpoints/.

    An export may go into a new folder of the run (``RUN/pipeline-ema``) but never over
    or inside any of the run's checkpoints, nor over the run folder itself.
    """
    inputs = [checkpoint_dir]
    real = checkpoint_dir.resolve()
    run = None
    if real.name == "final":
        run = real.parent
    elif real.parent.name == "checkpoints":
        run = real.parent.parent
    if run is not None:
        inputs += [run / "final", run / "checkpoints"]
    return inputs
