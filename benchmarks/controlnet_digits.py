"""ControlNet in miniature: does a digits student follow a ControlNet trained for its teacher?

The ControlNet (``wadi toy train-controlnet``, condition: the blurred ink mask of a
digit) was trained on the teacher only.  On held-out digits, the teacher (25-step DDIM,
CFG 1.5) and a one-step student are sampled with and without it, at the same prompt (the
digit's label) and noise; :func:`wadi.toy.controlnet.follow_scores` measures how well the
samples follow the condition (IoU of the ink with the source digit's ink, correlation
with the condition), the shipped evaluator measures FD and accuracy.

    .venv/bin/wadi toy train-controlnet --out /tmp/digits_cn --steps 300 --threads 1
    .venv/bin/python benchmarks/controlnet_digits.py --controlnet /tmp/digits_cn \
        --student /tmp/highres/run/run/final/pipeline --out /tmp/cn_bench --threads 1

Writes ``OUT/controlnet.json`` and ``OUT/grid.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet", required=True, help="digits ControlNetModel folder")
    parser.add_argument("--student", required=True, help="exported digits student pipeline")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--samples", type=int, default=360, help="held-out digits (<= 360)")
    parser.add_argument("--scale", type=float, default=1.0, help="conditioning scale (1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student-only", action="store_true", help="skip the teacher rows")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from diffusers import ControlNetModel

    from wadi._quiet import quiet_libraries
    from wadi.backbones import load_backbone
    from wadi.backbones.sampling import sample_multistep
    from wadi.controlnet import Control, controlled
    from wadi.toy import TEACHER_DIR
    from wadi.toy.controlnet import blurred_mask, follow_scores
    from wadi.toy.data import load_digits_split
    from wadi.toy.demo import one_step_images
    from wadi.toy.evaluate import evaluate_images, save_grid
    from wadi.toy.prompts import prompt_for

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, _, test_x, test_y = load_digits_split()
    # digits 0..9 first (their first held-out example each: the grid's columns), then the rest
    first = [int((test_y == d).nonzero()[0]) for d in range(10)]
    order = first + [i for i in range(len(test_y)) if i not in set(first)]
    order = torch.tensor(order[: args.samples])
    targets, digits = test_x[order], test_y[order].tolist()
    blur = json.loads((Path(args.controlnet) / "training_config.json").read_text())
    conditions = blurred_mask(targets, blur["config"]["blur_sigma"])

    cn = ControlNetModel.from_pretrained(args.controlnet).eval()
    control = [Control(cn, conditions, args.scale)]
    teacher = load_backbone(TEACHER_DIR)
    student = load_backbone(args.student)
    info = json.loads((Path(args.student) / "wadi_export.json").read_text())
    alpha_bar_T = info["alpha_bar_T"]
    z = torch.randn((len(digits), 1, 16, 16), generator=torch.Generator().manual_seed(args.seed))

    @torch.no_grad()
    def teacher_25():
        cond = teacher.encode_prompts([prompt_for(d) for d in digits])
        null = teacher.encode_prompts([""]).expand(len(digits))
        return teacher.decode(sample_multistep(teacher, cond, null, z, 25, 1.5)).clamp(-1, 1)

    def student_1():
        return one_step_images(student, digits, z, alpha_bar_T)

    runs = [
        ("teacher 25 steps", teacher, teacher_25, 50, False),
        ("teacher 25 steps + ControlNet", teacher, teacher_25, 50, True),
        ("student 1 step", student, student_1, 1, False),
        ("student 1 step + ControlNet", student, student_1, 1, True),
    ]
    if args.student_only:
        runs = runs[2:]
    rows = {}
    grid = {"condition": conditions[:10] * 2 - 1, "source digit": targets[:10]}
    for name, backbone, fn, nfe, use_cn in runs:
        ctx = controlled(backbone.denoiser, control) if use_cn else nullcontext()
        t0 = time.perf_counter()
        with ctx:
            images = fn()
        seconds = time.perf_counter() - t0
        rows[name] = {
            **follow_scores(images, targets, conditions),
            **evaluate_images(images, digits),
            "nfe": nfe + (nfe if use_cn else 0),  # a ControlNet call per U-Net call
            "ms_per_image": 1000 * seconds / len(digits),
        }
        grid[name.replace(" + ControlNet", " +CN").replace(" steps", "").replace(" step", "")] = (
            images[:10]
        )
        r = rows[name]
        print(
            f"{name:<32} IoU {r['iou']:.3f}  corr {r['corr']:.3f}  FD {r['fd']:7.2f}  "
            f"acc {r['accuracy']:.3f}  {r['ms_per_image']:.2f} ms/img",
            flush=True,
        )
    save_grid(grid, out / "grid.png")
    real = follow_scores(targets, targets, conditions)
    report = {
        "rows": rows,
        "source_digits": real,
        "samples": len(digits),
        "scale": args.scale,
        "controlnet": args.controlnet,
        "controlnet_training": blur,
        "student": args.student,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "controlnet.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"(the source digits themselves: IoU {real['iou']:.3f}, corr {real['corr']:.3f})")
    print(f"wrote {out}/controlnet.json and {out}/grid.png")


if __name__ == "__main__":
    main()
