"""Every knob of a WaDi run in one object, with the paper's defaults (method.md section 4).

The config is saved as ``config.yaml`` beside every checkpoint, so a run can
always be reproduced or resumed from its folder alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ADAPTERS = ("lorad", "lora", "dora", "full")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")

#: keys that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "validate_every",
        "validation_prompts",
        "export_pipeline",
        "max_nonfinite_steps",
        "progress",
    }
)


@dataclass
class DistillConfig:
    """A WaDi distillation run.  Defaults follow the paper's recipe."""

    # what to distill, from which prompts, to where
    teacher: str = ""
    prompts: str | None = None  # .txt / .jsonl / .csv / .parquet
    prompt_column: str | None = None
    embeddings: str | None = (
        None  # folder written by `wadi embed` (replaces prompts + text encoder)
    )
    output_dir: str = "wadi-run"

    # adapters
    adapter: str = (
        "lorad"  # lorad | lora | dora | full (the student; the fake score is always LoRaD)
    )
    student_rank: int | None = None  # None: the backbone's preset (256 U-Net, 128 DiT)
    fake_rank: int | None = None  # None: the preset's 32
    include_conv: bool = (
        False  # also rotate nn.Conv2d kernels in the preset's blocks (beyond the paper)
    )

    # one-step generator (method.md section 3)
    alpha_bar_T: float | None = (
        None  # None: read from the teacher's scheduler; paper constant 0.0047
    )
    generator_timestep: int = 999

    # VSD (method.md section 4)
    guidance_scale: float = 1.5  # the same for teacher and fake score
    generator_t_min: int = 20
    generator_t_max: int = 980
    fake_t_min: int = 0
    fake_t_max: int = 999
    null_prompt_prob: float = 0.1  # fake-score update only
    # fake-score updates per generator update (1 in the paper; DMD2's two time-scale rule uses
    # more so the fake score tracks the moving student). Extra ones draw fresh student samples.
    fake_updates: int = 1

    # optimisation
    resolution: int = 512
    batch_size: int = 16  # per process
    max_steps: int = 22000
    lr_student: float = 1e-4
    lr_fake: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    warmup_steps: int = 0  # linear warm-up, then constant
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16; the frozen base is stored in this dtype
    gradient_checkpointing: bool = False
    ema_decay: float | None = None  # None: no EMA (the paper uses none)
    export_ema: bool = True  # with ema_decay: final/pipeline holds the EMA weights
    max_nonfinite_steps: int = 10  # stop after this many skipped steps in a row

    # reproducibility, checkpoints, monitoring
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    validate_every: int = 500
    validation_prompts: list[str] = field(default_factory=list)
    export_pipeline: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        self.validate()

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        """One clear error per out-of-range value."""
        checks = [
            (self.adapter in ADAPTERS, f"adapter must be one of {ADAPTERS}, got {self.adapter!r}"),
            (
                self.mixed_precision in MIXED_PRECISION,
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}",
            ),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.resolution >= 8, f"resolution must be >= 8 pixels, got {self.resolution}"),
            (self.lr_student > 0 and self.lr_fake > 0, "learning rates must be > 0"),
            (
                0 <= self.generator_t_min <= self.generator_t_max <= 999,
                f"need 0 <= generator_t_min <= generator_t_max <= 999, got "
                f"{self.generator_t_min}..{self.generator_t_max}",
            ),
            (
                0 <= self.fake_t_min <= self.fake_t_max <= 999,
                f"need 0 <= fake_t_min <= fake_t_max <= 999, got {self.fake_t_min}..{self.fake_t_max}",
            ),
            (
                0 <= self.null_prompt_prob <= 1,
                f"null_prompt_prob must be in [0, 1], got {self.null_prompt_prob}",
            ),
            (self.fake_updates >= 1, f"fake_updates must be >= 1, got {self.fake_updates}"),
            (self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}"),
            (
                self.alpha_bar_T is None or 0 < self.alpha_bar_T < 1,
                f"alpha_bar_T must be in (0, 1), got {self.alpha_bar_T}",
            ),
            (
                self.student_rank is None or self.student_rank >= 1,
                f"student_rank must be >= 1, got {self.student_rank}",
            ),
            (
                self.fake_rank is None or self.fake_rank >= 1,
                f"fake_rank must be >= 1, got {self.fake_rank}",
            ),
            (
                self.ema_decay is None or 0 < self.ema_decay < 1,
                f"ema_decay must be in (0, 1), got {self.ema_decay}",
            ),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}"),
            (
                self.checkpoint_every >= 1,
                f"checkpoint_every must be >= 1, got {self.checkpoint_every}",
            ),
            (
                self.keep_checkpoints >= 1,
                f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}",
            ),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.generator_timestep <= 999, "generator_timestep must be in 0..999"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def check_inputs(self) -> None:
        """Errors for a run that cannot start (missing teacher or prompts)."""
        if not self.teacher:
            raise ValueError("no teacher given; pass --teacher PATH (a diffusers model folder)")
        if not self.prompts and not self.embeddings:
            raise ValueError(
                "no prompts given; pass --prompts FILE (.txt/.jsonl/.csv/.parquet) or --embeddings DIR"
            )

    # -- serialisation ------------------------------------------------------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown config keys {unknown}; see `wadi distill --help` for the knobs"
            )
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> DistillConfig:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError("a wadi config file must hold a YAML mapping of knob: value")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> DistillConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            return cls.from_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None

    def replace(self, **changes) -> DistillConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: DistillConfig) -> list[str]:
        """Keys whose values differ, except those a resumption may change."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
