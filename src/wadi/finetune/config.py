"""Every knob of a ``wadi finetune`` (DreamBooth) run in one object, saved as ``config.yaml``.

The knobs shared with ``wadi distill`` (output folder, steps, batch, resolution, optimiser,
checkpoints, seed, device) have the same names and meanings as in
:class:`~wadi.distill.config.DistillConfig`, so the core's loop, checkpoints and resume run
this config unchanged.  ``config.yaml`` beside every checkpoint makes a run resumable from
its folder alone.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from wadi.distill.config import MIXED_PRECISION, OPTIMIZERS, ConfigFile, _conforms, _describe

ADAPTERS = ("lorad", "lora", "dora")

#: keys that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "export_pipeline",
        "max_nonfinite_steps",
        "progress",
        "device",
    }
)
PATH_KEYS = ("base", "images")


@dataclass
class FinetuneConfig(ConfigFile):
    """DreamBooth with a LoRaD (or PEFT LoRA / DoRA) adapter on the base's denoiser."""

    COMMAND = "wadi finetune"
    MODEL_KEY = "base"
    PATH_KEYS = PATH_KEYS  # (class attributes, not fields: no annotation)
    RESUMABLE_CHANGES = RESUMABLE_CHANGES

    # what to tune, on which images, to where
    base: str = ""  # a diffusers pipeline folder wadi loads (a teacher or a multi-step base)
    images: str = ""  # folder of the subject's PNG/JPEG/WebP images
    instance_prompt: str = ""  # e.g. "a photo of sks dog"
    class_prompt: str | None = None  # e.g. "a photo of a dog": prior preservation on
    prior_images: int = 100  # class images the base generates (with class_prompt)
    prior_weight: float = 1.0  # weight of the class images' denoising loss
    prior_steps: int = 25  # DDIM steps of the base for each class image
    prior_guidance: float = 3.0  # CFG scale of those samples
    output_dir: str = "wadi-finetune"

    # adapter
    adapter: str = "lorad"  # lorad | lora | dora, on the layers of the backbone's student preset
    rank: int = 16
    include_conv: bool = False  # LoRaD only: also rotate the Conv2d kernels of those blocks

    # denoising loss: t uniform on {t_min..t_max}
    t_min: int = 0
    t_max: int = 999

    # optimisation (as wadi distill)
    resolution: int | None = None  # None: the base's native size
    batch_size: int = 1  # instance images per micro-batch (as many class images beside them)
    gradient_accumulation_steps: int = 1
    max_steps: int = 400
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = 10

    # reproducibility, checkpoints, monitoring (as wadi distill)
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    export_pipeline: bool = True  # final/pipeline: the tuned model merged, the base's scheduler
    progress: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            ok, fixed = _conforms(getattr(self, f.name), hints[f.name])
            if ok:
                if fixed is not getattr(self, f.name):
                    setattr(self, f.name, fixed)
            else:
                problems.append(
                    f"{f.name} must be {_describe(hints[f.name])}, got {getattr(self, f.name)!r}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        checks = [
            (self.adapter in ADAPTERS, f"adapter must be one of {ADAPTERS}, got {self.adapter!r}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (
                not self.include_conv or self.adapter == "lorad",
                "include_conv applies to the lorad adapter only",
            ),
            (self.prior_images >= 1, f"prior_images must be >= 1, got {self.prior_images}"),
            (self.prior_weight >= 0, f"prior_weight must be >= 0, got {self.prior_weight}"),
            (self.prior_steps >= 1, f"prior_steps must be >= 1, got {self.prior_steps}"),
            (self.prior_guidance >= 0, f"prior_guidance must be >= 0, got {self.prior_guidance}"),
            (
                0 <= self.t_min <= self.t_max <= 999,
                f"need 0 <= t_min <= t_max <= 999, got {self.t_min}..{self.t_max}",
            ),
            (
                self.resolution is None or self.resolution >= 8,
                f"resolution must be >= 8 pixels, got {self.resolution}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.gradient_accumulation_steps >= 1,
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}",
            ),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision: one of {MIXED_PRECISION}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def check_inputs(self) -> None:
        """One line for a run that cannot start (no base, no images, no instance prompt)."""
        if not self.base:
            raise ValueError("no base model given; pass --base PATH (a diffusers model folder)")
        if not self.images:
            raise ValueError("no subject images given; pass --images DIR (a folder of PNG/JPEG)")
        if not self.instance_prompt.strip():
            raise ValueError(
                'no instance prompt given; pass --instance-prompt "a photo of sks dog" (a rare '
                "token plus the subject's class)"
            )
        if self.class_prompt is not None and not self.class_prompt.strip():
            raise ValueError(
                '--class-prompt is empty; give it text ("a photo of a dog") or drop it'
            )

    @property
    def prior(self) -> bool:
        """Whether prior preservation is on (a class prompt given)."""
        return self.class_prompt is not None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps

    @classmethod
    def _check_kind(cls, data: dict) -> None:
        if "teacher" in data and "base" not in data:
            raise ValueError("it holds a wadi distill run, not a wadi finetune run")
