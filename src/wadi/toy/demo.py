"""``wadi demo``: distill the shipped digits teacher with WaDi on CPU, then measure and draw.

Trains with :func:`wadi.distill.train` (LoRaD student and LoRaD fake score on the one shared
base), then evaluates teacher 25-step DDIM with CFG, teacher 1 step and student 1 step on the
same number of samples: FD and prompt accuracy with the shipped evaluator, network evaluations
per image and milliseconds per image. Writes ``report.json`` and ``grid.png``.

The whole output folder is built under a temporary name beside ``--out`` and renamed into
place at the end, so a full disk or an error midway leaves the previous output (or none)
and no half-written run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wadi.files import atomic_directory, output_errors, write_json, write_text

from . import TEACHER_DIR
from .data import load_digits_split
from .evaluate import (
    balanced_digits,
    evaluate_images,
    noise,
    real_digits_floor,
    sample_teacher,
    save_grid,
)
from .prompts import prompt_for, training_prompts

GENERATORS = ("teacher_multistep", "teacher_onestep", "student_onestep")
# what a demo output folder holds: an existing --out with anything else is not replaced
OUTPUTS = ("prompts.txt", "run", "grid.png", "report.json")


@dataclass
class DemoConfig:
    """The demo's knobs; defaults target <= 10 minutes on 2 CPU cores."""

    out_dir: str = "demo-output"
    teacher: str | None = None  # teacher folder; None: the shipped digits teacher
    steps: int = 420  # 500 at lr 1e-3 took 11 min; 3e-3 gets there sooner (docs/ablation.md s. 7)
    seed: int = 0
    samples: int = 500
    batch_size: int = 16
    adapter: str = "lorad"
    student_rank: int = 16
    fake_rank: int = 4
    include_conv: bool = False  # also rotate the U-Net's convolutions (most of its weights)
    ema_decay: float | None = 0.99  # the student oscillates; its EMA is exported
    lr_student: float = 3e-3
    lr_fake: float = 1e-2
    fake_updates: int = 3  # fake-score steps per student step; 1 (the paper's) stalls here
    vsd_guidance: float = 1.5  # teacher and fake CFG inside VSD (method.md section 4)
    teacher_steps: int = 25
    # the 25-step baseline's CFG; None: the VSD guidance, the distribution the student is
    # distilled towards (higher CFG trades FD for accuracy: see docs/ablation.md)
    teacher_guidance: float | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.samples < 10 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1 and samples >= 10")

    @property
    def teacher_dir(self) -> Path:
        return Path(self.teacher) if self.teacher else TEACHER_DIR

    @property
    def multistep_guidance(self) -> float:
        """CFG scale of the 25-step teacher baseline."""
        return self.vsd_guidance if self.teacher_guidance is None else self.teacher_guidance


def write_prompts(path: Path) -> Path:
    """All training prompts of the toy vocabulary, one a line (the distillation prompt set)."""
    lines = [p for prompts in training_prompts().values() for p in prompts]
    write_text(path, "\n".join(lines) + "\n")
    return path


def distill_config(cfg: DemoConfig, prompts: Path, run_dir: Path | None = None):
    """The :class:`wadi.distill.DistillConfig` of the demo run (in ``run_dir``, default
    ``out_dir/run``)."""
    from wadi.distill import DistillConfig

    out = Path(cfg.out_dir)
    return DistillConfig(
        teacher=str(cfg.teacher_dir),
        prompts=str(prompts),
        output_dir=str(run_dir if run_dir is not None else out / "run"),
        adapter=cfg.adapter,
        student_rank=cfg.student_rank,
        fake_rank=cfg.fake_rank,
        include_conv=cfg.include_conv,
        ema_decay=cfg.ema_decay,
        resolution=16,
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        lr_student=cfg.lr_student,
        lr_fake=cfg.lr_fake,
        guidance_scale=cfg.vsd_guidance,
        fake_updates=cfg.fake_updates,
        seed=cfg.seed,
        checkpoint_every=cfg.steps,
        keep_checkpoints=1,
        validate_every=cfg.steps,
        export_pipeline=True,
        progress=cfg.progress,
    )


@torch.no_grad()
def one_step_images(backbone, digits, z, alpha_bar_T: float) -> torch.Tensor:
    """One network evaluation per image: x0 from noise at t = 999 (method.md section 3)."""
    from wadi.generators import OneStep

    cond = backbone.encode_prompts([prompt_for(d) for d in digits])
    x0 = OneStep(999, alpha_bar_T).sample(backbone, z, cond)
    return backbone.decode(x0).float().clamp(-1.0, 1.0)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def evaluate_generators(teacher, student, alpha_bar_T: float, cfg: DemoConfig) -> tuple[dict, dict]:
    """({name: {fd, accuracy, nfe, ms_per_image}}, {name: images}) on the same digits and noise."""
    digits = balanced_digits(cfg.samples)
    z = noise(cfg.samples, cfg.seed + 1)
    runs = {
        "teacher_multistep": (
            lambda: sample_teacher(
                teacher, digits, cfg.teacher_steps, cfg.multistep_guidance, cfg.seed + 1
            ),
            cfg.teacher_steps * (2 if cfg.multistep_guidance != 1.0 else 1),
        ),
        "teacher_onestep": (lambda: one_step_images(teacher, digits, z, alpha_bar_T), 1),
        "student_onestep": (lambda: one_step_images(student, digits, z, alpha_bar_T), 1),
    }
    metrics, images = {}, {}
    for name, (fn, nfe) in runs.items():
        imgs, seconds = _timed(fn)
        images[name] = imgs
        metrics[name] = {
            **evaluate_images(imgs, digits),
            "nfe": nfe,
            "ms_per_image": 1000.0 * seconds / cfg.samples,
        }
    return metrics, images


def goals(generators: dict) -> dict:
    """The issue's targets, measured: True/False each, with the ratios behind them."""
    multi, one, student = (generators[k] for k in GENERATORS)
    return {
        "fd_vs_teacher_multistep": student["fd"] / multi["fd"],
        "fd_vs_teacher_onestep": student["fd"] / one["fd"],
        "speedup_vs_teacher_multistep": multi["ms_per_image"] / student["ms_per_image"],
        "met": {  # issue 14's goal for the demo's student
            "fd <= 1.25x teacher 25-step": student["fd"] <= 1.25 * multi["fd"],
            "accuracy >= 0.97": student["accuracy"] >= 0.97,
            ">= 20x faster than teacher 25-step": (
                multi["ms_per_image"] >= 20 * student["ms_per_image"]
            ),
        },
    }


def format_table(report: dict) -> str:
    """A plain-text table of the generators."""
    lines = [f"{'generator':<20}{'FD':>10}{'accuracy':>10}{'NFE':>6}{'ms/image':>10}"]
    for name, m in report["generators"].items():
        lines.append(
            f"{name:<20}{m['fd']:>10.2f}{m['accuracy']:>10.3f}{m['nfe']:>6}{m['ms_per_image']:>10.2f}"
        )
    return "\n".join(lines)


def check_output(out: Path) -> None:
    """Refuse an output that is a file, or a folder holding more than a demo's outputs.

    The demo replaces its whole output folder, so it must not be a file (left intact) or a
    folder with the user's other files in it.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ValueError(
            f"demo output {out} is a file, not a folder; remove it or choose another --out"
        )
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(
            f"demo output {out} holds files that are not a demo's ({shown}) and would be "
            "replaced; choose a new or empty folder"
        )


def small_sample_note(samples: int) -> str | None:
    """The one-line caveat for an FD from fewer than 2,000 samples (biased upward)."""
    from wadi.eval.metrics import warn_small_sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # returned for the report, not raised as a warning
        return warn_small_sample(samples, "FD")


def _retarget_configs(run_dir: Path, tmp: Path, out: Path) -> None:
    """Point the saved ``config.yaml`` files at the final folder, not the temporary one."""
    from wadi.distill import DistillConfig

    old, new = (str(Path(os.path.abspath(p))) for p in (tmp, out))
    for path in run_dir.rglob("config.yaml"):
        config = DistillConfig.load(path)
        changes = {}
        for key, value in config.to_dict().items():
            if isinstance(value, str):
                absolute = os.path.abspath(value)
                if absolute == old or absolute.startswith(old + os.sep):
                    changes[key] = new + absolute[len(old) :]
        if changes:
            config.replace(**changes).save(path)


def run_demo(cfg: DemoConfig | None = None) -> dict:
    """Distill, evaluate, write ``report.json`` and ``grid.png`` into ``cfg.out_dir``.

    Everything is built in a temporary folder renamed onto ``cfg.out_dir`` at the end; an
    ``OSError`` writing it (full disk, read-only) becomes one ``ValueError`` naming it.
    """
    cfg = cfg or DemoConfig()
    cfg.validate()
    out = Path(cfg.out_dir)
    check_output(out)
    with output_errors(out), atomic_directory(out) as tmp:
        report = _run_in(cfg, tmp, out)
    return report


def _run_in(cfg: DemoConfig, tmp: Path, out: Path) -> dict:
    from wadi.backbones import load_backbone
    from wadi.distill import train

    start = time.perf_counter()
    dcfg = distill_config(cfg, write_prompts(tmp / "prompts.txt"), tmp / "run")
    result = train(dcfg, overwrite=True)
    summary = json.loads((result.final_dir / "summary.json").read_text())
    alpha_bar_T = float(summary["alpha_bar_T"])

    teacher = load_backbone(cfg.teacher_dir)
    student = load_backbone(result.final_dir / "pipeline")
    metrics, images = evaluate_generators(teacher, student, alpha_bar_T, cfg)

    _, _, test_x, test_y = load_digits_split()
    # the floor: real training digits against the held-out ones, same number of samples
    reference = real_digits_floor(cfg.samples, cfg.seed)
    real = torch.stack([test_x[test_y == d][0] for d in range(10)])
    save_grid({"real (held-out)": real, **{k: v[:10] for k, v in images.items()}}, tmp / "grid.png")
    _retarget_configs(tmp / "run", tmp, out)
    # the run stores absolute paths; the demo's own may be relative (make demo: demo-output)
    final_dir = out / "run" / result.final_dir.resolve().relative_to((tmp / "run").resolve())
    report = {
        "generators": metrics,
        "goals": goals(metrics),
        "reference": {"real_train": reference, "teacher_guidance": cfg.multistep_guidance},
        "fd_note": small_sample_note(cfg.samples),
        "config": {
            "demo": asdict(cfg),
            "distill": distill_config(cfg, out / "prompts.txt").to_dict(),
        },
        "distill": {
            "steps": result.steps,
            "skipped_steps": result.skipped_steps,
            "seconds_per_step": result.seconds_per_step,
            "final_dir": str(final_dir),
        },
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(tmp / "report.json", report)
    return report
