"""ScaleCrafter dispersed convolution in miniature: digits teacher and student at 2x.

The rows ``benchmarks/highres_digits.py`` leaves out, on the same noise, digits and
student, so they sit beside its table: the 32x32 samples with the ``auto`` blocks'
3x3 kernels dispersed to 5x5 (:func:`wadi.highres.disperse`, scale 2, eta 0.05) instead
of re-dilated.  The 25-step teacher disperses only while t > ``--until`` (as the
re-dilation row: ScaleCrafter's early steps); the one-step student's call at t = 999 is
always dispersed.  ``--check`` also re-runs the re-dilated student row (cheap) to
confirm the setup reproduces the earlier table.  32x32 samples are average-pooled to
16x16 and scored by the shipped evaluator.

    .venv/bin/python benchmarks/disperse_digits.py --student /tmp/highres/run/run/final/pipeline \\
        --out /tmp/disperse --samples 300 --threads 1 --check

Writes ``OUT/disperse.json`` and ``OUT/grid.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_images(backbone, digits, z, steps, guidance, context, until):
    """DDIM with CFG; each call inside ``context(unet)`` while t > ``until``."""
    from wadi.backbones.sampling import ddim_scheduler
    from wadi.toy.prompts import prompt_for

    scheduler = ddim_scheduler(backbone, steps)
    cond = backbone.encode_prompts([prompt_for(d) for d in digits])
    null = backbone.encode_prompts([""]).expand(len(digits))
    x = x0 = z
    for t in scheduler.timesteps:
        ctx = context(backbone.denoiser) if int(t) > until else nullcontext()
        with ctx:
            eps = backbone.predict_eps_cfg(x, int(t), cond, null, guidance)
        step = scheduler.step(eps, t, x, eta=0.0)
        x, x0 = step.prev_sample, step.pred_original_sample
    return backbone.decode(x0).float().clamp(-1, 1)


@torch.no_grad()
def student_images(backbone, digits, z, alpha_bar_T, context):
    from wadi.toy.demo import one_step_images

    with context(backbone.denoiser):
        return one_step_images(backbone, digits, z, alpha_bar_T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="exported digits student pipeline")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--samples", type=int, default=300, help="samples per row (300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", default="auto", help="dispersed blocks (auto)")
    parser.add_argument("--eta", type=float, default=0.05, help="pixel-level weight (0.05)")
    parser.add_argument("--until", type=int, default=400, help="teacher: disperse t > this")
    parser.add_argument("--check", action="store_true", help="re-run the re-dilated student")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from wadi._quiet import quiet_libraries
    from wadi.backbones import load_backbone
    from wadi.highres import disperse, redilate
    from wadi.toy import TEACHER_DIR
    from wadi.toy.evaluate import balanced_digits, evaluate_images, save_grid

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student_dir = Path(args.student)
    alpha_bar_T = json.loads((student_dir / "wadi_export.json").read_text())["alpha_bar_T"]
    teacher, student = load_backbone(TEACHER_DIR), load_backbone(student_dir)
    digits = balanced_digits(args.samples)
    gen = torch.Generator().manual_seed(args.seed + 2)  # highres_digits.py's 32x32 noise
    z32 = torch.randn((args.samples, 1, 32, 32), generator=gen)

    def dispersed(unet):
        return disperse(unet, 2.0, args.blocks, eta=args.eta)

    def redilated(unet):
        return redilate(unet, 2.0, args.blocks)

    runs = {}
    if args.check:
        runs["student 1 step, 32px redilated"] = (
            lambda: student_images(student, digits, z32, alpha_bar_T, redilated),
            1,
        )
    runs["student 1 step, 32px dispersed"] = (
        lambda: student_images(student, digits, z32, alpha_bar_T, dispersed),
        1,
    )
    runs["teacher 25 steps, 32px dispersed"] = (
        lambda: teacher_images(teacher, digits, z32, 25, 1.5, dispersed, args.until),
        50,
    )
    rows, grid = {}, {}
    for name, (fn, nfe) in runs.items():
        t0 = time.perf_counter()
        images = fn()
        seconds = time.perf_counter() - t0
        small = F.avg_pool2d(images, images.shape[-1] // 16)
        rows[name] = {
            **evaluate_images(small, digits),
            "nfe": nfe,
            "ms_per_image": 1000 * seconds / args.samples,
            "seconds": seconds,
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
        "blocks": args.blocks,
        "eta": args.eta,
        "kernel_size": 5,
        "teacher_disperse_until": args.until,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "disperse.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}/disperse.json and {out}/grid.png")


if __name__ == "__main__":
    main()
