"""``wadi toy``: train and measure the embedded digits teacher and evaluator.

``wadi toy train-teacher`` and ``wadi toy train-evaluator`` reproduce the assets shipped in
``wadi/toy/assets``; ``wadi toy eval-teacher`` measures a teacher's multi-step samples.
"""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    d = subparsers.add_parser(
        "demo",
        help="distill the shipped digits teacher on CPU, then measure and draw (minutes)",
        description=(
            "WaDi end to end on the digits teacher that ships with wadi: distill (LoRaD student "
            "and LoRaD fake score on one frozen base), then evaluate teacher 25 steps with CFG, "
            "teacher 1 step and student 1 step on the same samples. Writes report.json and "
            "grid.png."
        ),
    )
    d.add_argument(
        "--out", default="demo-output", metavar="DIR", help="output folder (demo-output)"
    )
    d.add_argument(
        "--teacher", metavar="DIR", default=None, help="teacher folder (default: the shipped one)"
    )
    d.add_argument("--steps", type=int, default=None, help="distillation steps")
    d.add_argument("--seed", type=int, default=None, help="random seed")
    d.add_argument("--samples", type=int, default=None, help="samples per generator")
    d.add_argument("--adapter", default=None, help="student adapter: lorad, lora, dora, full")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    a = subparsers.add_parser(
        "ablate",
        help="adapter ablation in miniature: lorad, lora, dora, full (and LoRaD ranks), several seeds",
    )
    a.add_argument(
        "--out",
        default="ablation-output",
        metavar="DIR",
        help="output folder; a rerun into it reuses each finished run whose settings match",
    )
    a.add_argument("--adapters", default="lorad,lora,dora,full", help="comma list")
    a.add_argument("--ranks", default="", help="extra LoRaD ranks for a rank sweep, comma list")
    a.add_argument(
        "--budgets",
        default="equal-rank",
        help="equal-rank (all at the demo rank) and/or equal-count (LoRA/DoRA at the rank "
        "matching LoRaD's trainable count), comma list",
    )
    a.add_argument(
        "--lr-grid",
        default="",
        metavar="LR,LR,...",
        help="per case: run the first seed at each rate, keep the best final FD, run the "
        "other seeds at it",
    )
    a.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    a.add_argument("--steps", type=int, default=300, help="distillation steps per run")
    a.add_argument("--eval-every", type=int, default=100, help="steps between FD measurements")
    a.add_argument("--samples", type=int, default=300, help="samples per FD measurement")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    a.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel processes (1); use threads x jobs <= cores",
    )
    a.add_argument(
        "--lr",
        default="",
        metavar="ADAPTER=LR,...",
        help="student learning rate per adapter, e.g. full=1e-4 (default: the demo's for all)",
    )
    a.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: summarise the runs of this command already finished in --out",
    )
    a.set_defaults(func=_ablate)

    toy = subparsers.add_parser(
        "toy", help="the embedded digits teacher and evaluator: train, measure"
    )
    sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    toy.set_defaults(func=lambda args: toy.print_help() or 1)

    p = sub.add_parser(
        "train-teacher", help="train the pixel-space digits teacher (diffusers folder)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="teacher folder to write")
    p.add_argument("--steps", type=int, default=1200, help="training steps (1200)")
    p.add_argument("--batch-size", type=int, default=48, help="images per step (48)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument(
        "--init-from", metavar="DIR", help="start from this teacher folder's weights (stage 2)"
    )
    p.add_argument(
        "--full-res-attention",
        action="store_true",
        help="transformer blocks at the 16x16 level too (SD's layout: attention at every level)",
    )
    _common(p)
    p.set_defaults(func=_train_teacher)

    p = sub.add_parser(
        "train-evaluator", help="train the CNN digit classifier used for FD/accuracy"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="evaluator folder to write")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training split (40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _common(p)
    p.set_defaults(func=_train_evaluator)

    p = sub.add_parser(
        "train-controlnet",
        help="train a digits ControlNet (condition: the digit's blurred mask) for the teacher",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="ControlNetModel folder to write")
    p.add_argument("--teacher", metavar="DIR", help="teacher folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=600, help="training steps (600)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (32)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    p.add_argument("--blur-sigma", type=float, default=1.5, help="mask blur in pixels (1.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _common(p)
    p.set_defaults(func=_train_controlnet)

    p = sub.add_parser("eval-teacher", help="FD and prompt accuracy of a teacher's DDIM samples")
    p.add_argument("--teacher", metavar="DIR", help="teacher folder (default: the shipped one)")
    p.add_argument("--samples", type=int, default=500, help="samples, digits 0-9 in turn (500)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (25)")
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale (1.5, the demo's)")
    p.add_argument("--template", type=int, default=0, help="prompt template number (0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    p.add_argument("--grid", metavar="PNG", help="also write a grid of the first samples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_eval_teacher)


def _demo(args) -> int:
    import dataclasses

    import torch

    from wadi._quiet import quiet_libraries

    from .demo import DemoConfig, format_table, run_demo

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    changes = {
        k: getattr(args, k)
        for k in ("teacher", "steps", "seed", "samples", "adapter")
        if getattr(args, k) is not None
    }
    cfg = dataclasses.replace(
        DemoConfig(), out_dir=args.out, progress=not args.no_progress, **changes
    )
    report = run_demo(cfg)
    print(format_table(report))
    if report.get("fd_note"):
        print(f"note: {report['fd_note']}")
    real = report["reference"]["real_train"]
    print(
        f"(floor: {real['samples']} real training digits score FD {real['fd']:.2f}, "
        f"accuracy {real['accuracy']:.3f}; teacher 25-step CFG {cfg.multistep_guidance:g})"
    )
    g = report["goals"]
    print(
        f"student FD / teacher 25-step FD {g['fd_vs_teacher_multistep']:.2f}, "
        f"/ teacher 1-step FD {g['fd_vs_teacher_onestep']:.2f}, "
        f"speed-up vs 25-step teacher {g['speedup_vs_teacher_multistep']:.0f}x"
    )
    for goal, met in g["met"].items():
        print(f"  [{'x' if met else ' '}] {goal}")
    print(f"wrote {args.out}/report.json and {args.out}/grid.png in {report['wall_seconds']:.0f} s")
    return 0


def _ablate(args) -> int:
    import torch

    from wadi._quiet import quiet_libraries
    from wadi.cli import UserError

    from .ablate import AblationConfig, format_rows, run_ablation

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")

    def ints(text):
        return tuple(int(x) for x in text.split(",") if x.strip())

    def floats(text):
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise UserError(
                f"--lr-grid: expected numbers such as 3e-4,1e-3, got {text!r}"
            ) from None

    lr_overrides = {}
    for item in (x.strip() for x in args.lr.split(",") if x.strip()):
        adapter, _, value = item.partition("=")
        try:
            lr_overrides[adapter.strip()] = float(value)
        except ValueError:
            raise UserError(f"--lr: expected ADAPTER=LR such as full=1e-4, got {item!r}") from None

    cfg = AblationConfig(
        out_dir=args.out,
        adapters=tuple(a.strip() for a in args.adapters.split(",") if a.strip()),
        lorad_ranks=ints(args.ranks),
        budgets=tuple(b.strip() for b in args.budgets.split(",") if b.strip()),
        lr_grid=floats(args.lr_grid),
        seeds=ints(args.seeds),
        steps=args.steps,
        eval_every=args.eval_every,
        samples=args.samples,
        lr_overrides=lr_overrides,
        jobs=args.jobs,
        threads=args.threads,
        report_only=args.report_only,
    )
    report = run_ablation(cfg)
    print(format_rows(report["rows"]))
    print(f"wrote {args.out}/ablation.json and {args.out}/fd_vs_step.png")
    return 0


def _common(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare(args) -> Path:
    import torch

    from wadi._quiet import quiet_libraries
    from wadi.cli import UserError

    quiet_libraries()

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; remove it or choose another --out")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


def _train_teacher(args) -> int:
    from wadi.cli import UserError
    from wadi.files import output_errors

    from .teacher import TeacherTrainConfig, train_teacher

    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError("--steps, --batch-size and --lr must be positive")
    out = _prepare(args)
    config = TeacherTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        warmup_steps=min(100, max(1, args.steps // 10)),
        full_res_attention=args.full_res_attention,
        init_from=args.init_from,
    )
    with output_errors(out):
        summary = train_teacher(out, config, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    print(f"teacher written to {out}")
    return 0


def _train_evaluator(args) -> int:
    from wadi.cli import UserError
    from wadi.files import output_errors

    from .evaluator import EvaluatorTrainConfig, train_evaluator

    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    out = _prepare(args)
    with output_errors(out):
        summary = train_evaluator(
            out,
            EvaluatorTrainConfig(epochs=args.epochs, seed=args.seed),
            progress=not args.no_progress,
        )
    print(json.dumps(summary, indent=2))
    print(f"evaluator written to {out}")
    return 0


def _train_controlnet(args) -> int:
    from wadi.cli import UserError
    from wadi.files import output_errors

    from . import TEACHER_DIR
    from .controlnet import ControlNetTrainConfig, train_controlnet

    config = ControlNetTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        blur_sigma=args.blur_sigma,
        seed=args.seed,
    )
    try:
        config.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    out = _prepare(args)
    with output_errors(out):
        summary = train_controlnet(
            out, args.teacher or TEACHER_DIR, config, progress=not args.no_progress
        )
    print(json.dumps(summary, indent=2))
    print(f"ControlNet written to {out}")
    return 0


def _eval_teacher(args) -> int:
    import time

    import torch

    from wadi._quiet import quiet_libraries
    from wadi.backbones import load_backbone
    from wadi.cli import UserError
    from wadi.files import output_errors

    from . import TEACHER_DIR
    from .evaluate import balanced_digits, evaluate_images, sample_teacher, save_grid

    quiet_libraries()

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if args.samples < 2 or args.steps < 1:
        raise UserError("--samples must be at least 2 and --steps at least 1")
    backbone = load_backbone(args.teacher or TEACHER_DIR)
    digits = balanced_digits(args.samples)
    start = time.perf_counter()
    images = sample_teacher(backbone, digits, args.steps, args.guidance, args.seed, args.template)
    seconds = time.perf_counter() - start
    result = evaluate_images(images, digits)
    result.update(
        samples=args.samples,
        steps=args.steps,
        guidance=args.guidance,
        ms_per_image=round(1000 * seconds / args.samples, 2),
    )
    print(json.dumps(result, indent=2))
    if args.grid:
        with output_errors(args.grid):
            save_grid({f"teacher {args.steps} steps": images}, args.grid)
    return 0
