"""ScaleCrafter re-dilation in miniature: the digits teacher and a digits student at 2x.

Distills a digits student with wadi's own loop (the ``wadi demo`` recipe, fewer steps),
or reuses one (``--student``, an exported pipeline folder), then samples teacher (25-step
DDIM with CFG) and student (one step) at the native 16x16, at 32x32 as is, and at 32x32
with :func:`wadi.highres.redilate` (``auto``: ``down_blocks.1, mid_block, up_blocks.0``,
dilation 2).  32x32 samples are average-pooled to 16x16 and scored by the shipped
evaluator (FD against the held-out digits, accuracy of the digit asked for).  The
25-step teacher re-dilates only while t > ``--dilate-until`` (ScaleCrafter: 30 of 50
steps, t > ~400); the one-step student's single call is at t = 999, always dilated.

    .venv/bin/python benchmarks/highres_digits.py --out /tmp/highres --steps 300 --threads 1

Writes ``OUT/highres.json``, ``OUT/grid.png`` (and the run under ``OUT/run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F


def distill_student(out: Path, steps: int, seed: int) -> tuple[Path, float]:
    """Distill with the demo's recipe; returns (exported pipeline folder, alpha_bar_T)."""
    from wadi.distill import train
    from wadi.toy.demo import DemoConfig, distill_config, write_prompts

    out.mkdir(parents=True, exist_ok=True)
    # lr 1e-3: the demo's rate when docs/downstream.md's numbers were measured (now 3e-3)
    cfg = dataclasses.replace(
        DemoConfig(), out_dir=str(out), steps=steps, seed=seed, lr_student=1e-3
    )
    result = train(distill_config(cfg, write_prompts(out / "prompts.txt")), overwrite=True)
    summary = json.loads((result.final_dir / "summary.json").read_text())
    return result.final_dir / "pipeline", float(summary["alpha_bar_T"])


@torch.no_grad()
def teacher_images(backbone, digits, z, steps, guidance, redilate_blocks, until):
    """25-step DDIM with CFG; re-dilated (if asked) while t > ``until``."""
    from wadi.backbones.sampling import ddim_scheduler
    from wadi.highres import redilate
    from wadi.toy.prompts import prompt_for

    scheduler = ddim_scheduler(backbone, steps)
    cond = backbone.encode_prompts([prompt_for(d) for d in digits])
    null = backbone.encode_prompts([""]).expand(len(digits))
    scale = z.shape[-1] / backbone.denoiser.config.sample_size
    x = x0 = z
    for t in scheduler.timesteps:
        dilated = redilate_blocks is not None and int(t) > until
        ctx = redilate(backbone.denoiser, scale, redilate_blocks) if dilated else nullcontext()
        with ctx:
            eps = backbone.predict_eps_cfg(x, int(t), cond, null, guidance)
        step = scheduler.step(eps, t, x, eta=0.0)
        x, x0 = step.prev_sample, step.pred_original_sample
    return backbone.decode(x0).float().clamp(-1, 1)


@torch.no_grad()
def student_images(backbone, digits, z, alpha_bar_T, redilate_blocks):
    """One step at t = 999, re-dilated throughout if asked."""
    from wadi.highres import redilate
    from wadi.toy.demo import one_step_images

    scale = z.shape[-1] / backbone.denoiser.config.sample_size
    ctx = redilate(backbone.denoiser, scale, redilate_blocks) if redilate_blocks else nullcontext()
    with ctx:
        return one_step_images(backbone, digits, z, alpha_bar_T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--student", help="exported student pipeline (skip distillation)")
    parser.add_argument("--alpha-bar-T", type=float, default=None, help="with --student")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps (300)")
    parser.add_argument("--samples", type=int, default=500, help="samples per row (500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", default="auto", help="re-dilated blocks (auto)")
    parser.add_argument("--dilate-until", type=int, default=400, help="teacher: dilate t > this")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from wadi._quiet import quiet_libraries
    from wadi.backbones import load_backbone
    from wadi.toy import TEACHER_DIR
    from wadi.toy.evaluate import balanced_digits, evaluate_images, save_grid

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.student:
        student_dir, alpha_bar_T = Path(args.student), args.alpha_bar_T
        if alpha_bar_T is None:
            alpha_bar_T = json.loads((student_dir / "wadi_export.json").read_text())["alpha_bar_T"]
    else:
        student_dir, alpha_bar_T = distill_student(out / "run", args.steps, args.seed)
    train_seconds = time.perf_counter() - start

    teacher = load_backbone(TEACHER_DIR)
    student = load_backbone(student_dir)
    digits = balanced_digits(args.samples)
    gen = torch.Generator().manual_seed(args.seed + 1)
    z16 = torch.randn((args.samples, 1, 16, 16), generator=gen)
    gen = torch.Generator().manual_seed(args.seed + 2)
    z32 = torch.randn((args.samples, 1, 32, 32), generator=gen)

    runs = {}
    for res, z, blocks in ((16, z16, None), (32, z32, None), (32, z32, args.blocks)):
        label = f"{res}px" + (" redilated" if blocks else "")
        runs[f"teacher 25 steps, {label}"] = (
            lambda z=z, b=blocks: teacher_images(teacher, digits, z, 25, 1.5, b, args.dilate_until),
            50,
        )
        runs[f"student 1 step, {label}"] = (
            lambda z=z, b=blocks: student_images(student, digits, z, alpha_bar_T, b),
            1,
        )
    rows, grid = {}, {}
    for name, (fn, nfe) in runs.items():
        t0 = time.perf_counter()
        images = fn()
        seconds = time.perf_counter() - t0
        small = F.avg_pool2d(images, images.shape[-1] // 16) if images.shape[-1] > 16 else images
        rows[name] = {
            **evaluate_images(small, digits),
            "nfe": nfe,
            "ms_per_image": 1000 * seconds / args.samples,
        }
        grid[name.replace(" steps", "").replace(" step", "")] = small[:10]
        print(
            f"{name:<36} FD {rows[name]['fd']:8.2f}  acc {rows[name]['accuracy']:.3f}  "
            f"{rows[name]['ms_per_image']:.2f} ms/img",
            flush=True,
        )
    save_grid(grid, out / "grid.png")
    report = {
        "rows": rows,
        "samples": args.samples,
        "student": str(student_dir),
        "alpha_bar_T": alpha_bar_T,
        "distill_steps": None if args.student else args.steps,
        "distill_seconds": None if args.student else train_seconds,
        "blocks": args.blocks,
        "teacher_dilate_until": args.dilate_until,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "highres.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}/highres.json and {out}/grid.png")


if __name__ == "__main__":
    main()
