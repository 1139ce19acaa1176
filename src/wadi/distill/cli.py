"""``wadi distill``: run WaDi from a YAML config and/or flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

#: help text per DistillConfig field, used where the field has no ``metadata["help"]``
HELP = {
    "teacher": "teacher: a local diffusers pipeline folder",
    "prompts": "prompt file: .txt, .jsonl, .csv or .parquet",
    "prompt_column": "column of a .csv/.parquet prompt file",
    "embeddings": "folder written by `wadi embed` (replaces prompts and the text encoder)",
    "output_dir": "where checkpoints and final/ go (the run folder)",
    "t5": "SD3's optional T5 text encoder; --no-t5 trains and exports without it (its "
    "embeddings zeros, as the stock pipeline without T5; saves ~9.5 GB in bf16); FLUX and "
    "PixArt need theirs",
    "adapter": "student adapter: lorad (paper), lora, dora, dora-fixed (DoRA, magnitude frozen) "
    "or full; the fake score is LoRaD",
    "student_rank": "student rank (default: the preset's, 256 U-Net / 128 DiT)",
    "fake_rank": "fake-score LoRaD rank (default: the preset's 32)",
    "include_conv": "also adapt the Conv2d layers of the preset's blocks (beyond the paper)",
    "full_scope": "with --adapter full: train the preset's layers (preset) or every parameter (all)",
    "alpha_bar_T": "abar at T for the generator (default: the teacher's scheduler; paper 0.0047)",
    "generator_timestep": "timestep the one-step generator is evaluated at",
    "generator_timesteps": "the student's multi-step sampler timesteps, e.g. 999 749 499 249",
    "guidance_scale": "CFG scale of teacher and fake score",
    "generator_t_min": "smallest timestep of the generator loss",
    "generator_t_max": "largest timestep of the generator loss",
    "fake_t_min": "smallest timestep of the fake-score loss",
    "fake_t_max": "largest timestep of the fake-score loss",
    "null_prompt_prob": "share of null prompts in the fake-score update",
    "fake_updates": "fake-score updates per generator update (the paper's 1)",
    "objective": "generator objective: vsd (WaDi) or dmd",
    "gan_weight": "weight of DMD2's GAN term (0: off; needs --real-images)",
    "real_images": "folder of real PNG/JPEG images for the GAN term",
    "resolution": "image side in pixels (default: the teacher's native size, e.g. SD1.5 512)",
    "batch_size": "prompts per process per micro-batch (the paper's 16)",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_steps": "training iterations (the paper's ~22k)",
    "lr_student": "student learning rate",
    "lr_fake": "fake-score learning rate",
    "adam_betas": "AdamW betas",
    "adam_eps": "AdamW epsilon",
    "weight_decay": "AdamW weight decay",
    "optimizer": "adamw or adamw8bit (bitsandbytes)",
    "warmup_steps": "linear learning-rate warm-up steps, then constant",
    "max_grad_norm": "gradient clipping norm",
    "mixed_precision": "no, fp16 or bf16 (the frozen base is stored in it)",
    "gradient_checkpointing": "recompute activations in backward (less memory, slower)",
    "compile": "torch.compile the shared denoiser",
    "compile_backend": "torch.compile backend: inductor, or aot_eager (no C++ compiler needed)",
    "fsdp": "shard the frozen denoiser across the launched processes (FSDP2, one unit per block); "
    "adapters and their optimizer state stay whole on every process; needs >= 2 processes",
    "ema_decay": "EMA decay of the student (default: no EMA, as the paper)",
    "export_ema": "with --ema-decay: final/pipeline holds the EMA weights",
    "export_dtype": "final/pipeline's weights: fp16, bf16 or fp32 (default: the teacher's stored "
    "dtype); fp16/bf16 use the stock variant names (variant='fp16')",
    "max_nonfinite_steps": "stop after this many non-finite steps in a row",
    "seed": "random seed",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "how many checkpoints to keep",
    "log_every": "steps between TensorBoard points",
    "validate_every": "steps between validation grids",
    "validation_prompts": "a validation prompt (repeatable)",
    "export_pipeline": "write final/pipeline, a stock diffusers pipeline (--no-export: skip)",
    "progress": "progress bar, start summary and checkpoint lines (--no-progress: quiet)",
    "device": "cpu, cuda or cuda:N (default: what the launcher gives)",
}

#: flag spellings that are not ``--field-name``
SPELLINGS = {"validation_prompts": "--validation-prompt", "export_pipeline": "--export"}


METAVARS = {
    int: "N",
    float: "X",
    str: "NAME",
    "teacher": "PATH",
    "prompts": "FILE",
    "embeddings": "DIR",
    "output_dir": "DIR",
    "real_images": "DIR",
    "prompt_column": "COLUMN",
}


def _int_items(text: str) -> list[int]:
    """``"999,749"`` or ``"999"`` as a list of integers (argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of integers (e.g. 999,749,499,249)"
        ) from None


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _add_config_flags(p, config_cls=None, helps=None, spellings=None) -> None:
    """One flag per field of ``config_cls`` (DistillConfig): type, default and help come from
    the dataclass (``helps`` and ``spellings`` extend HELP and SPELLINGS).

    The argparse default is None (not given), so a ``--config`` file's value stands unless
    a flag is passed; the dataclass default is shown in the help.
    """
    from .config import DistillConfig

    config_cls = config_cls or DistillConfig
    helps, spellings = {**HELP, **(helps or {})}, {**SPELLINGS, **(spellings or {})}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = spellings.get(f.name, "--" + f.name.replace("_", "-"))
        default = _field_default(f)
        text = f.metadata.get("help") or helps.get(f.name, "")
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        inner = args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
        options: dict = {"dest": f.name, "default": None}
        if inner is bool:
            options["action"] = argparse.BooleanOptionalAction
            shown = "on" if default else "off"
        elif typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0]
            options.update(nargs=len(typing.get_args(inner)), type=item, metavar="X")
            shown = " ".join(str(v) for v in default)
        elif typing.get_origin(inner) is list:
            item = typing.get_args(inner)[0]
            if f.name == "validation_prompts":
                options.update(action="append", type=item, metavar="PROMPT")
            elif item is int:  # 999 749 499 or 999,749,499
                options.update(nargs="+", type=_int_items, metavar="N")
            else:
                options.update(nargs="+", type=item, metavar="N")
            shown = " ".join(str(v) for v in default) if default else None
        else:
            options["type"] = inner if inner in (int, float, str) else str
            options["metavar"] = METAVARS.get(f.name) or METAVARS.get(options["type"])
            shown = default if default not in (None, "") else None
        if shown is not None:
            text = f"{text} (default: {shown})"
        p.add_argument(flag, help=text.replace("%", "%%"), **options)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distill a multi-step teacher into a one-step generator (WaDi)",
        description="VSD with a LoRaD student and a LoRaD fake score on one shared frozen base. "
        "Every knob of DistillConfig is a flag; flags override --config.",
    )
    p.add_argument("--config", help="YAML file of DistillConfig knobs; flags override it")
    _add_config_flags(p)
    p.add_argument(
        "--resume",
        help="'latest' (the newest complete checkpoint), step-N or a checkpoint folder; without "
        "--config the run's own config.yaml is used",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan per process (weights, adapters, optimizer; no activations) "
        "built on the meta device, and exit",
    )
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
    for key in (f.name for f in dataclasses.fields(DistillConfig)):
        value = getattr(args, key, None)
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = [x for part in value for x in part]  # --generator-timesteps 999,749 499
        if value is not None:
            base[key] = value
    return DistillConfig.from_dict(base)


def run(args) -> int:
    config = resolve_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.dry_run:
        from .plan import format_plan, plan_run

        print(format_plan(plan_run(config)))
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
