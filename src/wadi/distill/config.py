"""Every knob of a WaDi run in one object, with the paper's defaults (method.md section 4).

The config is saved as ``config.yaml`` beside every checkpoint, so a run can
always be reproduced or resumed from its folder alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ADAPTERS = ("lorad", "lora", "dora", "dora-fixed", "full")  # = students.STUDENT_ADAPTERS
FULL_SCOPES = ("preset", "all")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
OBJECTIVES = ("vsd", "dmd")
EXPORT_DTYPES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16")

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
        "export_dtype",  # how final/pipeline is stored, not what is trained
        "max_nonfinite_steps",
        "progress",
        "device",
        "fsdp",  # how the frozen base is laid out; the checkpoint files are the same
    }
)

#: keys that never make two runs different recipes (where the run folder is, how it is shown)
NOT_RECIPE = frozenset({"output_dir"})

#: keys whose ``None`` means "the teacher's own value", resolved when the teacher loads
RESOLVED_AT_LOAD = frozenset({"resolution"})

#: keys holding file system paths: written absolute, so a run resumes from any folder
PATH_KEYS = ("teacher", "prompts", "embeddings", "real_images")


class ConfigFile:
    """What a run's config does besides holding knobs: YAML round trip, atomic save, one-line
    load errors, absolute paths, and which changed keys make a different recipe.

    A subclass (a dataclass) names its command, its model key and its path keys, and the
    keys a resumption may change; :class:`DistillConfig` and ``wadi.finetune``'s config
    share this code.
    """

    COMMAND = "wadi distill"
    MODEL_KEY = "teacher"  # a model path that is kept as given when nothing is there (a hub id)
    PATH_KEYS: tuple[str, ...] = ()
    RESUMABLE_CHANGES: frozenset = frozenset()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown config keys {unknown}; see `{cls.COMMAND} --help` for the knobs"
            )
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str):
        data = yaml.load(text, Loader=_Loader) or {}
        if not isinstance(data, dict):
            raise ValueError("a wadi config file must hold a YAML mapping of knob: value")
        cls._check_kind(data)
        return cls.from_dict(data)

    @classmethod
    def _check_kind(cls, data: dict) -> None:
        """Refuse another command's config (a subclass hook)."""

    def save(self, path: str | Path) -> None:
        """Write ``config.yaml`` atomically (a full disk leaves the previous file whole)."""
        from wadi.files import write_text

        write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            return cls.from_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def with_absolute_paths(self, base: str | Path | None = None):
        """The path keys and output_dir as absolute paths (relative to ``base``, default the
        working directory), so the saved config works from any folder.

        A model key that is not a local path (nothing there) is kept as given.
        """
        base = Path(base) if base is not None else Path.cwd()
        changes = {}
        for key in (*self.PATH_KEYS, "output_dir"):
            value = getattr(self, key)
            if not value or Path(value).is_absolute():
                continue
            path = os.path.normpath(base / Path(value).expanduser())
            if key == self.MODEL_KEY and not Path(path).exists():
                continue
            changes[key] = path
        return self.replace(**changes) if changes else self

    def differences(self, other) -> list[str]:
        """Keys whose values make a different recipe (not those a resumption may change,
        not where the run folder is, not a value left to the model on one side)."""
        a, b = self.to_dict(), other.to_dict()
        return [
            k
            for k in a
            if k not in self.RESUMABLE_CHANGES
            and k not in NOT_RECIPE
            and not (k in RESOLVED_AT_LOAD and (a[k] is None or b[k] is None))
            and a[k] != b[k]
        ]


@dataclass
class DistillConfig(ConfigFile):
    """A WaDi distillation run.  Defaults follow the paper's recipe."""

    PATH_KEYS = PATH_KEYS  # (class attributes, not fields: no annotation)
    RESUMABLE_CHANGES = RESUMABLE_CHANGES

    # what to distill, from which prompts, to where
    teacher: str = ""
    prompts: str | None = None  # .txt / .jsonl / .csv / .parquet
    prompt_column: str | None = None
    embeddings: str | None = (
        None  # folder written by `wadi embed` (replaces prompts + text encoder)
    )
    output_dir: str = "wadi-run"
    # SD3's optional T5 (text_encoder_3); False (--no-t5) trains and exports without it, its
    # part of the prompt embeddings zeros, as StableDiffusion3Pipeline(text_encoder_3=None)
    t5: bool = True

    # adapters
    adapter: str = (
        "lorad"  # lorad | lora | dora | dora-fixed | full (the student; the fake is LoRaD)
    )
    student_rank: int | None = None  # None: the backbone's preset (256 U-Net, 128 DiT)
    fake_rank: int | None = None  # None: the preset's 32
    include_conv: bool = (
        False  # also rotate nn.Conv2d kernels in the preset's blocks (beyond the paper)
    )
    # adapter full: "preset" fine-tunes exactly the layers the student preset selects (the fair
    # comparison with LoRaD/LoRA/DoRA), "all" every denoiser parameter
    full_scope: str = "preset"

    # one-step generator (method.md section 3)
    alpha_bar_T: float | None = (
        None  # None: read from the teacher's scheduler; paper constant 0.0047
    )
    generator_timestep: int = 999
    # the student's sampler (wadi.generators): None is one step at generator_timestep (the
    # paper); DMD2's 4-step students use [999, 749, 499, 249], trained by backward simulation
    generator_timesteps: list[int] | None = None

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
    # objective (wadi.distill.objectives): vsd (WaDi, SwiftBrush weighting) or dmd (DMD's
    # per-sample normalisation by mean |x0 - x0_real|)
    objective: str = "vsd"
    # DMD2's GAN term: a classifier head on the fake score's bottleneck features, trained on
    # real images (real_images: a folder of PNG/JPEG); 0 is off
    gan_weight: float = 0.0
    real_images: str | None = None

    # optimisation
    resolution: int | None = None  # None: the teacher's native size (sample_size x VAE factor)
    batch_size: int = 16  # per process and micro-batch
    # micro-batches accumulated per optimizer step: global batch = batch_size x this x processes
    gradient_accumulation_steps: int = 1
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
    compile: bool = False  # torch.compile the denoiser (student, fake and teacher share it)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager needs no compiler)
    fsdp: bool = False  # shard the frozen denoiser across processes (FSDP2); adapters stay whole
    ema_decay: float | None = None  # None: no EMA (the paper uses none)
    export_ema: bool = True  # with ema_decay: final/pipeline holds the EMA weights
    # final/pipeline's stored dtype: fp16 | bf16 | fp32; None: the teacher's stored dtype
    export_dtype: str | None = None
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
    device: str | None = None  # None: what the launcher gives (accelerate); cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        """One clear error per wrong type (all of them, one line) or out-of-range value."""
        self._check_types()
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
            (
                self.resolution is None or self.resolution >= 8,
                f"resolution must be >= 8 pixels, got {self.resolution}",
            ),
            (
                self.full_scope in FULL_SCOPES,
                f"full_scope must be one of {FULL_SCOPES}, got {self.full_scope!r}",
            ),
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
            (
                self.gradient_accumulation_steps >= 1,
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}",
            ),
            (
                self.objective in OBJECTIVES,
                f"objective must be one of {OBJECTIVES}, got {self.objective!r}",
            ),
            (self.gan_weight >= 0, f"gan_weight must be >= 0, got {self.gan_weight}"),
            (
                self.export_dtype is None or self.export_dtype in EXPORT_DTYPES,
                f"export_dtype must be fp16, bf16 or fp32 (or null: the teacher's stored dtype), "
                f"got {self.export_dtype!r}",
            ),
            (
                not self.fsdp or self.adapter != "full",
                "--fsdp shards the frozen base, but --adapter full trains a whole copy of it; use "
                "--adapter lorad, lora or dora, or drop --fsdp",
            ),
            (
                not (self.fsdp and self.gan_weight),
                "--fsdp with --gan-weight is not supported (the GAN head stops the denoiser "
                "halfway, inside a sharded block); drop one of them",
            ),
            (
                not (self.fsdp and self.compile),
                "--fsdp with --compile is not supported (untested together); drop one of them",
            ),
            (
                not self.gan_weight or bool(self.real_images),
                "gan_weight > 0 needs real images: pass --real-images DIR (a folder of PNG/JPEG)",
            ),
            (
                self.generator_timesteps is None
                or (
                    len(self.generator_timesteps) >= 1
                    and all(0 <= t <= 999 for t in self.generator_timesteps)
                    and all(
                        a > b
                        for a, b in zip(self.generator_timesteps, self.generator_timesteps[1:])
                    )
                ),
                "generator_timesteps must be a strictly decreasing list in 0..999 (e.g. "
                f"999,749,499,249), got {self.generator_timesteps}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_types(self) -> None:
        """Check every value against its field's annotation (YAML gives strings, lists, ...).

        Integers count as floats (and become floats); ``adam_betas`` may be a list.
        """
        problems = []
        hints = _field_types()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, fixed = _conforms(value, hints[f.name])
            if ok:
                if fixed is not value:
                    setattr(self, f.name, fixed)
            else:
                problems.append(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def timesteps(self) -> list[int]:
        """The generator's timesteps: ``generator_timesteps`` or ``[generator_timestep]``."""
        return list(self.generator_timesteps or [self.generator_timestep])

    @property
    def global_batch(self) -> int:
        """Prompts per process per optimizer step (times the process count for the global one)."""
        return self.batch_size * self.gradient_accumulation_steps

    def check_inputs(self) -> None:
        """Errors for a run that cannot start (missing teacher or prompts)."""
        if not self.teacher:
            raise ValueError("no teacher given; pass --teacher PATH (a diffusers model folder)")
        if not self.prompts and not self.embeddings:
            raise ValueError(
                "no prompts given; pass --prompts FILE (.txt/.jsonl/.csv/.parquet) or --embeddings DIR"
            )


# -- types --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-4`` as a float (PyYAML's YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _field_types() -> dict:
    return typing.get_type_hints(DistillConfig)


def _conforms(value, hint) -> tuple[bool, object]:
    """(whether ``value`` fits ``hint``, the value normalised: int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, fixed = _conforms(value, arg)
            if ok:
                return True, fixed
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, value if isinstance(value, float) else float(value)
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        items = [_conforms(v, a) for v, a in zip(value, args)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_conforms(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    return True, value


def _describe(hint) -> str:
    """``int | None`` -> 'an integer (or null)' for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{_describe(rest[0])} (or null)"
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if args[0] is float else 'values'}"
    if origin is list:
        return "a list of strings" if args[0] is str else "a list"
    return names.get(hint, str(hint))
