"""Everything one distillation run holds, built from its config in one place.

:func:`build_run` loads the teacher, attaches the adapters, picks generator and
objective, makes one :class:`~wadi.distill.optim.OptimizerStep` per trained part,
prepares the output folder (only once every input checked out) and restores a
checkpoint when resuming.  The loop (:mod:`wadi.distill.loop`) then only iterates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import report, run_dir
from .data import PromptSource
from .distributed import barrier
from .hooks import EMA
from .iteration import IterationResult, WaDiIteration
from .optim import OptimizerStep
from .roles import Roles
from .run_state import load_checkpoint

__all__ = ["Run", "build_run", "DTYPES"]

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class Run:
    config: object
    backbone: object
    roles: Roles
    data: PromptSource
    generator: object
    iteration: WaDiIteration
    optimizers: dict[str, OptimizerStep]
    ema: EMA | None
    rng: torch.Generator
    null_cond: object
    shape: tuple[int, ...]
    counts: dict[str, int]
    rank: int = 0
    world: int = 1
    resume_from: Path | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)  # extra trained modules
    step: int = 0
    skipped: int = 0
    in_a_row: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def account(self, result: IterationResult) -> dict:
        """Count the step (skips included) and return its log record."""
        if result.ok:
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1
            if self.is_main:
                print(
                    f"wadi distill: step {self.step} skipped (non-finite loss or gradients), "
                    f"{self.in_a_row} in a row"
                )
            if self.in_a_row >= self.config.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.in_a_row} non-finite steps in a row at step {self.step}; lower the "
                    "learning rates, use bf16 instead of fp16, or raise max_nonfinite_steps"
                )
        return {
            "step": self.step,
            "loss_generator": result.loss_generator,
            "loss_fake": result.loss_fake,
            "grad_norm_student": result.grad_norm_student,
            "grad_norm_fake": result.grad_norm_fake,
            "skipped": self.skipped,
            "skipped_now": not result.ok,
        }


def build_run(config, device, rank: int, world: int, resume, overwrite) -> tuple[Run, object]:
    """The run of ``config`` on this process, resumed if asked; returns (run, config)
    with the config's teacher-dependent values (resolution) resolved."""
    from wadi.backbones import load_backbone
    from wadi.generators import make_generator

    from .objectives import make_objective

    is_main = rank == 0
    out = Path(config.output_dir)
    resume_from = run_dir.prepare_output_dir(
        config, resume, overwrite, run_dir.warn if is_main else None
    )
    if config.fsdp:  # before anything loads: one line for one process or a backend that can't
        from .fsdp import check_process_group

        check_process_group(world, device)
    dtype = DTYPES[config.mixed_precision]
    backbone = load_backbone(
        config.teacher,
        dtype=dtype,
        device=device,
        load_text_encoder=not config.embeddings,
        t5=config.t5,
    )
    if config.resolution is None:  # the teacher's own size, recorded in config.yaml
        config = config.replace(resolution=report.native_resolution(backbone))
    if hasattr(backbone, "resolution"):  # SDXL's time ids, FLUX's resolution-dependent shift
        backbone.resolution = config.resolution
    if getattr(backbone, "guidance_embeds", False):
        # a guidance-distilled teacher (FLUX.1-dev): teacher and fake are queried with the
        # guidance input = guidance_scale; the fake's regression and the student use the same
        backbone.guidance = config.guidance_scale
    generator = make_generator(config.timesteps, config.alpha_bar_T)
    generator.parametrization(backbone)  # one line now for a timestep the teacher lacks
    if is_main and (warning := generator.precision_warning(backbone)):
        run_dir.warn(f"warning: {warning}")
    torch.manual_seed(config.seed)  # identical adapter initialisation on every process
    roles = Roles(
        backbone,
        config.adapter,
        config.student_rank,
        config.fake_rank,
        config.include_conv,
        config.full_scope,
    )
    counts = roles.parameter_counts()
    if is_main and (warning := report.share_warning(config, counts)):
        run_dir.warn(warning)
    if config.gradient_checkpointing:
        roles.enable_gradient_checkpointing()
    roles.train()
    if config.fsdp:  # the frozen base sharded per block; the adapters stay whole
        from .fsdp import shard_base

        shard_base(roles, device, world)
    if config.compile:
        backbone.denoiser.compile(backend=config.compile_backend)
    data = PromptSource(config, backbone, device)
    if data.size == 0:
        raise ValueError("the prompt source holds no prompts")
    latent = backbone.latent_size(config.resolution)
    shape = (config.global_batch, backbone.latent_channels, latent, latent)
    gan, real, modules = _gan_term(config, backbone) if config.gan_weight else (None, None, {})
    fake_params = roles.fake_parameters() + (gan.parameters() if gan is not None else [])
    optimizers = {
        "student": OptimizerStep(
            "student", roles.student_parameters(), config.lr_student, config, device
        ),
        "fake": OptimizerStep("fake", fake_params, config.lr_fake, config, device),
    }
    autocast = functools.partial(
        torch.autocast, device.type, dtype=dtype, enabled=config.mixed_precision != "no"
    )
    iteration = WaDiIteration(
        backbone, roles, make_objective(config.objective), generator, config, autocast,
        optimizers, gan=gan, real_latents=real,
    )  # fmt: skip
    # inputs are good: only now touch the output folder
    barrier()
    if is_main:
        if overwrite and not resume:
            run_dir.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    barrier()
    ema = EMA(roles.student_named_state(), config.ema_decay) if config.ema_decay else None
    run = Run(
        config=config,
        backbone=backbone,
        roles=roles,
        data=data,
        generator=generator,
        iteration=iteration,
        optimizers=optimizers,
        ema=ema,
        rng=torch.Generator(device).manual_seed(config.seed * 7919 + rank),
        null_cond=data.null(),
        shape=shape,
        counts=counts,
        rank=rank,
        world=world,
        resume_from=resume_from,
        modules=modules,
    )
    if resume_from is not None:
        load_checkpoint(resume_from, run)
    return run, config


def _gan_term(config, backbone):
    """DMD2's GAN term with its real images encoded once: (term, latents, modules to save)."""
    from wadi.data.images import encode_images, load_image_folder

    from .gan import GANTerm

    channels = 3 if backbone.vae is not None else backbone.latent_channels
    images = load_image_folder(config.real_images, config.resolution, channels)
    with torch.no_grad():
        latents = encode_images(backbone, images.to(backbone.device, backbone.dtype)).float()
    gan = GANTerm.for_backbone(backbone, weight=config.gan_weight)
    return gan, latents, {"gan_head": gan.head}
