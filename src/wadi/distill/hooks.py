"""What happens around each step besides the update itself: EMA, progress, logs, samples,
checkpoints, a user callback.  Each is a :class:`Hook` with ``on_start`` / ``on_step`` /
``on_end``, so the loop stays one screen and a new concern is one class here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .run_state import save_checkpoint

__all__ = [
    "EMA",
    "Hook",
    "EMAHook",
    "ProgressHook",
    "TensorBoardHook",
    "ValidationHook",
    "CheckpointHook",
    "CallbackHook",
    "default_hooks",
]


class EMA:
    """An exponential moving average of the student's trained tensors (float32)."""

    def __init__(self, named_state: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.tensors = {k: v.detach().float().clone() for k, v in named_state.items()}

    @torch.no_grad()
    def update(self, named_state: dict[str, torch.Tensor]) -> None:
        for name, value in named_state.items():
            self.tensors[name].lerp_(value.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.tensors[name].copy_(value)


class Hook:
    def on_start(self, run) -> None:
        pass

    def on_step(self, run, record: dict) -> None:
        pass

    def on_end(self, run) -> None:
        pass


class EMAHook(Hook):
    """Update the EMA after every applied step (a skipped step leaves it as it was)."""

    def on_step(self, run, record):
        if run.ema is not None and not record["skipped_now"]:
            run.ema.update(run.roles.student_named_state())


class ProgressHook(Hook):
    """The start summary and a tqdm bar on the main process."""

    def __init__(self, summary: str):
        self.summary, self.bar = summary, None

    def on_start(self, run):
        from tqdm.auto import tqdm

        print(self.summary, file=sys.stderr, flush=True)
        self.bar = tqdm(
            total=run.config.max_steps,
            initial=run.step,
            desc="wadi distill",
            unit="step",
            dynamic_ncols=True,
        )

    def on_step(self, run, record):
        self.bar.update(1)
        self.bar.set_postfix(
            gen=f"{record['loss_generator']:.3g}", fake=f"{record['loss_fake']:.3g}"
        )

    def on_end(self, run):
        self.bar.close()


class TensorBoardHook(Hook):
    """Scalars every ``log_every`` steps (and at the last), one learning rate per optimizer."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a dependency, but logging must never stop a run
            self.writer = None
        else:
            self.writer = SummaryWriter(str(out / "logs"))

    def on_step(self, run, record):
        step = run.step
        if self.writer is None or not (
            step % run.config.log_every == 0 or step == run.config.max_steps
        ):
            return
        for key, value in record.items():
            if key not in ("step", "skipped_now"):
                self.writer.add_scalar(f"train/{key}", value, step)
        for name, opt in run.optimizers.items():
            self.writer.add_scalar(f"train/lr_{name}", opt.lr, step)

    def on_end(self, run):
        if self.writer is not None:
            self.writer.close()


class ValidationHook(Hook):
    """Student samples of the validation prompts with fixed noise, as a PNG grid."""

    def __init__(self, writer_hook: TensorBoardHook | None, dtype: torch.dtype):
        self.writer_hook, self.dtype = writer_hook, dtype

    def on_step(self, run, record):
        config = run.config
        if config.validation_prompts and run.step % config.validate_every == 0:
            self.sample(run)

    @torch.no_grad()
    def sample(self, run) -> None:
        from wadi.images import save_image_grid

        backbone, config = run.backbone, run.config
        if backbone.text_encoder is None:
            return
        prompts = config.validation_prompts
        g = torch.Generator(backbone.device).manual_seed(config.seed)  # training RNG untouched
        latent = backbone.latent_size(config.resolution)
        shape = (len(prompts), backbone.latent_channels, latent, latent)
        z = torch.randn(shape, generator=g, device=backbone.device)
        cond = backbone.encode_prompts(prompts).to(backbone.device)
        autocast = torch.autocast(
            backbone.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        with autocast, run.roles.student():
            x0 = run.generator.sample(backbone, z, cond, g)
        if not run.is_main:  # --fsdp: every process ran the sharded denoiser; one writes
            return
        images = backbone.decode(x0.float())
        path = Path(config.output_dir) / "samples" / f"{ckpt.step_dir_name(run.step)}.png"
        grid = save_image_grid(images, path, nrow=min(len(prompts), 8))
        writer = self.writer_hook.writer if self.writer_hook is not None else None
        if writer is not None:
            writer.add_image("validation", grid, run.step)


class CheckpointHook(Hook):
    """A checkpoint every ``checkpoint_every`` steps and at the last (every process takes part)."""

    def on_step(self, run, record):
        if run.step % run.config.checkpoint_every == 0 or run.step == run.config.max_steps:
            save_checkpoint(run)


class CallbackHook(Hook):
    """``callback(step, context)`` on the main process at step 0 and every ``every`` steps."""

    def __init__(self, callback, every: int):
        self.callback, self.every = callback, every

    def context(self, run) -> dict:
        return {
            "backbone": run.backbone,
            "roles": run.roles,
            "generator": run.generator,
            "alpha_bar_T": run.generator.alpha_bar(run.backbone),
            "config": run.config,
            "ema": run.ema.tensors if run.ema is not None else None,
        }

    def on_start(self, run):
        if run.step == 0:
            self.callback(0, self.context(run))

    def on_step(self, run, record):
        if run.step % self.every == 0:
            self.callback(run.step, self.context(run))


def default_hooks(
    run, *, summary: str, dtype, callback=None, callback_every: int = 0
) -> list[Hook]:
    """The hooks of a run, in order: EMA first (checkpoints then hold the updated EMA)."""
    hooks: list[Hook] = [EMAHook()]
    writer = None
    if run.is_main:
        if run.config.progress:
            hooks.append(ProgressHook(summary))
        writer = TensorBoardHook(Path(run.config.output_dir))
        hooks.append(writer)
        if hasattr(run.config, "validation_prompts"):  # recipes without validation skip it
            hooks.append(ValidationHook(writer, dtype))
    elif getattr(run.config, "fsdp", False) and getattr(run.config, "validation_prompts", None):
        hooks.append(ValidationHook(None, dtype))  # the sharded denoiser needs every process
    hooks.append(CheckpointHook())
    if callback is not None and run.is_main and callback_every:
        hooks.append(CallbackHook(callback, callback_every))
    return hooks
