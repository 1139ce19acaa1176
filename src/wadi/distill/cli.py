"""``wadi distill``: run WaDi from a YAML config and/or flags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# flag -> (config key, type, help)
FLAGS = {
    "--teacher": ("teacher", str, "teacher: a local diffusers pipeline folder"),
    "--prompts": ("prompts", str, "prompt file: .txt, .jsonl, .csv or .parquet"),
    "--prompt-column": ("prompt_column", str, "column of a .csv/.parquet prompt file"),
    "--embeddings": (
        "embeddings",
        str,
        "folder written by `wadi embed` (no text encoder in memory)",
    ),
    "--output-dir": ("output_dir", str, "where checkpoints and final/ go"),
    "--max-steps": ("max_steps", int, "training iterations (paper: ~22k)"),
    "--batch-size": ("batch_size", int, "prompts per process per step (paper: 16)"),
    "--resolution": (
        "resolution",
        int,
        "image side in pixels (default: the teacher's native size, e.g. SD1.5 512)",
    ),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--keep-checkpoints": ("keep_checkpoints", int, "how many checkpoints to keep"),
    "--seed": ("seed", int, "random seed"),
    "--adapter": ("adapter", str, "student adapter: lorad (paper), lora, dora or full"),
    "--student-rank": ("student_rank", int, "student rank (default: preset, 256 U-Net / 128 DiT)"),
    "--fake-rank": ("fake_rank", int, "fake-score LoRaD rank (default 32)"),
    "--lr-student": ("lr_student", float, "student learning rate (1e-4)"),
    "--lr-fake": ("lr_fake", float, "fake-score learning rate (1e-2)"),
    "--fake-updates": (
        "fake_updates",
        int,
        "fake-score updates per generator update (1, the paper)",
    ),
    "--guidance-scale": ("guidance_scale", float, "CFG scale of teacher and fake score (1.5)"),
    "--alpha-bar-T": (
        "alpha_bar_T",
        float,
        "abar at T for the generator (default: teacher's scheduler)",
    ),
    "--mixed-precision": (
        "mixed_precision",
        str,
        "no, fp16 or bf16 (the frozen base is stored in it)",
    ),
    "--optimizer": ("optimizer", str, "adamw or adamw8bit (bitsandbytes)"),
    "--device": ("device", str, "cpu, cuda or cuda:N (default: what the launcher gives)"),
    "--ema-decay": ("ema_decay", float, "EMA of the student (off by default)"),
    "--validate-every": ("validate_every", int, "steps between validation grids"),
    "--log-every": ("log_every", int, "steps between TensorBoard points"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distill a multi-step teacher into a one-step generator (WaDi)",
        description="VSD with a LoRaD student and a LoRaD fake score on one shared frozen base.",
    )
    p.add_argument("--config", help="YAML file of DistillConfig knobs; flags override it")
    for flag, (key, typ, text) in FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=text)
    p.add_argument(
        "--validation-prompt", dest="validation_prompts", action="append", help="repeatable"
    )
    p.add_argument(
        "--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None
    )
    p.add_argument("--no-export", dest="export_pipeline", action="store_false", default=None)
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar, start summary or checkpoint lines (warnings still show)",
    )
    p.add_argument(
        "--full-scope",
        dest="full_scope",
        choices=("preset", "all"),
        default=None,
        help="with --adapter full: train the preset's layers (default) or every parameter",
    )
    p.add_argument(
        "--include-conv",
        dest="include_conv",
        action="store_true",
        default=None,
        help="also adapt Conv2d layers of the preset's blocks (beyond the paper)",
    )
    p.add_argument(
        "--resume",
        help="'latest' (the newest complete checkpoint), step-N or a checkpoint folder; without "
        "--config the run's own config.yaml is used",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
    p.set_defaults(func=run)


def resolve_config(args):
    """Defaults <- ``--config`` (or, resuming without one, the run's config.yaml) <- flags."""
    from .config import DistillConfig

    if args.config:
        base = DistillConfig.load(args.config).to_dict()
    elif args.resume and args.output_dir and (Path(args.output_dir) / "config.yaml").is_file():
        # the run's own recipe; where the folder is now (moved, copied) is where it runs
        base = DistillConfig.load(Path(args.output_dir) / "config.yaml").to_dict()
        base["output_dir"] = args.output_dir
    elif args.resume and not args.teacher:
        out = args.output_dir or DistillConfig().output_dir
        raise FileNotFoundError(
            f"{out} holds no wadi run (no config.yaml) to resume; check --output-dir, or pass "
            "--config FILE"
        )
    else:
        base = DistillConfig().to_dict()
    keys = [key for key, _, _ in FLAGS.values()] + [
        "validation_prompts",
        "gradient_checkpointing",
        "export_pipeline",
        "include_conv",
        "progress",
        "full_scope",
    ]
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return DistillConfig.from_dict(base)


def run(args) -> int:
    config = resolve_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from .loop import train
    from .run_dir import resume_command

    try:
        result = train(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        out = Path(config.output_dir)
        if os.environ.get("RANK", "0") == "0" and (out / "config.yaml").is_file():
            print(
                f"wadi distill: interrupted; continue with: {resume_command(out)}",
                file=sys.stderr,
            )
        raise
    if result.final_dir is not None:
        rate = (
            f"{result.seconds_per_step:.3f} s/step" if result.steps_run else "nothing left to run"
        )
        print(
            f"wadi distill: {result.steps} steps ({result.steps_run} run now, "
            f"{result.skipped_steps} skipped), {rate}; results in {result.final_dir}"
        )
    return 0
