"""The generation core of ``wadi serve``: load once, then ``generate(prompt, seed)`` -> PNG + ms.

No UI here.  The student is an exported pipeline folder (``wadi export``, ``wadi distill``'s
``final/pipeline``) or, by default, the shipped digits teacher with the shipped LoRaD student
merged into it (:mod:`wadi.serve.student`).  The teacher, when there is one, samples DDIM
with CFG for the side-by-side comparison.

Noise comes from :func:`wadi.backbones.generate.seeded_noise` with index 0, so the page's
image for ``(prompt, seed)`` is the one ``wadi generate --prompt PROMPT --seed SEED`` writes
first.  Calls are serialised by a lock: one image at a time, and its time is its own.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Engine", "Image", "MAX_PROMPT_CHARS", "MAX_SEED", "check_seed", "check_prompt"]

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1
ROLES = ("student", "teacher")


@dataclass(frozen=True)
class Image:
    """One generated image: PNG bytes, the milliseconds it took, how many network calls."""

    png: bytes
    ms: float
    steps: int
    nfe: int
    width: int
    height: int


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise ValueError("prompt must be text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"prompt is {len(prompt)} characters, more than {MAX_PROMPT_CHARS}; shorten it"
        )
    return prompt


def check_seed(seed) -> int:
    """An integer seed in 0 .. 2**32 - 1 (text such as "42" is accepted)."""
    try:
        value = int(str(seed).strip())
    except ValueError:
        raise ValueError(f"seed must be a whole number 0-{MAX_SEED}, got {seed!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be a whole number 0-{MAX_SEED}, got {value}")
    return value


def _folder(path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {path} is not a folder; give a diffusers pipeline folder")
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"{flag} {path} has no model_index.json; give a diffusers pipeline folder "
            "(wadi export --out, or OUTPUT/final/pipeline of wadi distill)"
        )
    return path


def _export_teacher(pipeline: Path) -> Path | None:
    """The teacher an exported folder was made from, when ``wadi_export.json`` names one
    that exists here."""
    path = pipeline / "wadi_export.json"
    if not path.is_file():
        return None
    try:
        teacher = json.loads(path.read_text()).get("teacher")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if teacher and (Path(teacher) / "model_index.json").is_file():
        return Path(teacher)
    return None


class Engine:
    """The student (and optionally the teacher), loaded once, generating one image a call.

    ``pipeline``: an exported student folder; ``None``: the shipped digits student.
    ``teacher``: the teacher folder for the comparison; ``None``: the exported folder's
    own teacher when ``wadi_export.json`` names one that exists (the shipped teacher for the
    default student), else no comparison.  ``teacher=False`` loads no teacher.
    """

    def __init__(
        self,
        pipeline: str | os.PathLike | None = None,
        teacher: str | os.PathLike | bool | None = None,
        *,
        teacher_steps: int = 25,
        guidance: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from wadi.backbones import load_backbone
        from wadi.backbones.export import exported_generator
        from wadi.toy import TEACHER_DIR

        from .student import STUDENT_DIR, student_info

        if teacher_steps < 2:
            raise ValueError(f"--teacher-steps must be at least 2, got {teacher_steps}")
        if guidance is not None and guidance < 1.0:
            raise ValueError(f"--guidance must be at least 1.0 (1.0: no CFG), got {guidance}")
        self.device, self.dtype = torch.device(device), dtype
        self._lock = threading.Lock()
        if pipeline is None:
            if teacher not in (None, False):
                raise ValueError(
                    "--teacher without --pipeline: the shipped student fits only the shipped "
                    "digits teacher; give --pipeline DIR (an exported student) as well"
                )
            self.student = self._shipped_student(STUDENT_DIR, TEACHER_DIR)
            info = student_info(STUDENT_DIR)
            from wadi.generators import make_generator

            self.generator = make_generator(info.get("timesteps") or [999], info.get("alpha_bar_T"))
            self.student_name = "digits student (shipped, LoRaD rank 16)"
            teacher_dir = None if teacher is False else TEACHER_DIR
            default_guidance = 1.5  # the digits demo's: the distribution the student learnt
        else:
            folder = _folder(pipeline, "--pipeline")
            self.student = load_backbone(folder, dtype=dtype, device=device)
            self.generator = exported_generator(folder)
            self.student_name = str(folder)
            if teacher is False:
                teacher_dir = None
            elif teacher is None:
                teacher_dir = _export_teacher(folder)
            else:
                teacher_dir = _folder(teacher, "--teacher")
            default_guidance = 1.5 if _same(teacher_dir, TEACHER_DIR) else 3.0
        self.teacher = None
        self.teacher_name = None
        if teacher_dir is not None:
            self.teacher = load_backbone(teacher_dir, dtype=dtype, device=device)
            self.teacher_name = str(teacher_dir)
            self._null = self._encode(self.teacher, "")
        self.teacher_steps = int(teacher_steps)
        self.guidance = float(default_guidance if guidance is None else guidance)
        self.size = self.student.denoiser.config.sample_size

    # -- loading --------------------------------------------------------------------------
    def _shipped_student(self, student_dir: Path, teacher_dir: Path):
        """The shipped teacher with the shipped LoRaD student merged in (plain modules)."""
        from wadi.backbones import load_backbone
        from wadi.lorad import load_adapter, merge_and_unload
        from wadi.lorad.io import require_role

        if not (student_dir / "adapter_model.safetensors").is_file():
            raise ValueError(
                f"the shipped student {student_dir} is missing; reinstall wadi or give "
                "--pipeline DIR (an exported student)"
            )
        require_role(student_dir, "student")
        backbone = load_backbone(teacher_dir, dtype=self.dtype, device=self.device)
        load_adapter(backbone.denoiser, student_dir, "student")
        backbone.denoiser = merge_and_unload(backbone.denoiser, "student")
        return backbone

    # -- generating -----------------------------------------------------------------------
    def info(self) -> dict:
        """What the page shows about the models."""
        return {
            "student": self.student_name,
            "student_steps": self.generator.num_steps,
            "teacher": self.teacher_name,
            "teacher_steps": self.teacher_steps if self.teacher is not None else None,
            "guidance": self.guidance if self.teacher is not None else None,
            "size": self.size * self.student.vae_scale_factor,
            "max_seed": MAX_SEED,
        }

    def _encode(self, backbone, prompt: str):
        with torch.no_grad():
            return backbone.encode_prompts([prompt])

    def _noise(self, backbone, seed: int):
        from wadi.backbones.generate import seeded_noise

        z = seeded_noise([0], seed, (backbone.latent_channels, self.size, self.size))
        return z.to(device=self.device, dtype=self.dtype)

    def generate(self, prompt: str, seed: int = 0, role: str = "student") -> Image:
        """One image of ``prompt`` from noise seed ``seed`` by the student or the teacher."""
        prompt, seed = check_prompt(prompt), check_seed(seed)
        if role not in ROLES:
            raise ValueError(f"model must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "teacher" and self.teacher is None:
            raise ValueError(
                "no teacher is loaded for the comparison; start wadi serve with --teacher DIR"
            )
        with self._lock, torch.no_grad():
            start = time.perf_counter()
            if role == "student":
                images, steps, nfe = self._student(prompt, seed)
            else:
                images, steps, nfe = self._teacher(prompt, seed)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            ms = 1000.0 * (time.perf_counter() - start)
        png, (width, height) = to_png(images[0])
        return Image(png=png, ms=ms, steps=steps, nfe=nfe, width=width, height=height)

    def _student(self, prompt, seed):
        from wadi.backbones.generate import RENOISE_SEED

        backbone = self.student
        z = self._noise(backbone, seed)
        cond = backbone.encode_prompts([prompt])
        renoise = torch.Generator().manual_seed(RENOISE_SEED + seed)
        x0 = self.generator.sample(backbone, z, cond, renoise)
        steps = self.generator.num_steps
        return _pixels(backbone.decode(x0)), steps, steps

    def _teacher(self, prompt, seed):
        from wadi.backbones.sampling import sample_multistep

        backbone = self.teacher
        z = self._noise(backbone, seed)
        cond = backbone.encode_prompts([prompt])
        x0 = sample_multistep(
            backbone, cond, self._null, z, steps=self.teacher_steps, guidance=self.guidance
        )
        nfe = self.teacher_steps * (2 if self.guidance != 1.0 else 1)
        return _pixels(backbone.decode(x0)), self.teacher_steps, nfe


def _same(a, b) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def _pixels(decoded: torch.Tensor) -> torch.Tensor:
    return (decoded.float().cpu() / 2 + 0.5).clamp(0, 1)


def to_png(image: torch.Tensor) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes and (width, height) of one ``(C, H, W)`` image in [0, 1]."""
    from wadi.backbones.generate import to_pil

    pil = to_pil(image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue(), pil.size
