"""``wadi finetune``: DreamBooth with LoRaD, LoRA or DoRA, from a YAML config and/or flags."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

#: help per FinetuneConfig field (the shared knobs keep wadi distill's help where it fits)
HELP = {
    "base": "the model to tune: a local diffusers pipeline folder (a teacher or multi-step base)",
    "images": "folder of the subject's images (PNG/JPEG/WebP, nothing else)",
    "instance_prompt": 'prompt of the subject\'s images, with a rare token: "a photo of sks dog"',
    "class_prompt": 'class prompt for prior preservation, e.g. "a photo of a dog" (default: off)',
    "prior_images": "class images the base generates for the prior (cached in OUTPUT/class-images)",
    "prior_weight": "weight of the prior-preservation loss",
    "prior_steps": "DDIM steps of the base per class image",
    "prior_guidance": "CFG scale of the class images",
    "output_dir": "where checkpoints, class-images/ and final/ go (the run folder)",
    "adapter": "lorad, lora or dora, on the layers of the backbone's student preset",
    "rank": "adapter rank",
    "include_conv": "lorad only: also rotate the Conv2d kernels of the preset's blocks",
    "t_min": "smallest timestep of the denoising loss",
    "t_max": "largest timestep of the denoising loss",
    "resolution": "image side in pixels (default: the base's native size)",
    "batch_size": "instance images per micro-batch (as many class images beside them)",
    "max_steps": "training steps",
    "learning_rate": "adapter learning rate",
    "checkpoint_every": "steps between checkpoints",
    "export_pipeline": "write final/pipeline, the tuned model merged (--no-export: skip)",
}


def register(subparsers) -> None:
    from wadi.distill.cli import _add_config_flags

    from .config import FinetuneConfig

    p = subparsers.add_parser(
        "finetune",
        help="teach a base model a subject from a few images (DreamBooth with LoRaD)",
        description="DreamBooth: the denoising loss in the base's parametrization on the "
        "subject's images, prior preservation on class images the base generates itself, a "
        "LoRaD (or LoRA / DoRA) adapter on the denoiser. The adapter lands in "
        "OUTPUT/final/adapter, the merged model in OUTPUT/final/pipeline (sample it with "
        "`wadi generate --teacher OUTPUT/final/pipeline --steps 25 --guidance 3`).",
    )
    p.add_argument("--config", help="YAML file of FinetuneConfig knobs; flags override it")
    _add_config_flags(p, FinetuneConfig, HELP)
    p.add_argument(
        "--resume",
        help="'latest', step-N or a checkpoint folder; without --config the run's own "
        "config.yaml is used",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
    p.set_defaults(func=run)


def resolve_config(args):
    """Defaults <- ``--config`` (or, resuming without one, the run's config.yaml) <- flags."""
    from .config import FinetuneConfig

    own = Path(args.output_dir) / "config.yaml" if args.output_dir else None
    if args.config:
        base = FinetuneConfig.load(args.config).to_dict()
    elif args.resume and own is not None and own.is_file():
        base = FinetuneConfig.load(own).to_dict()
        base["output_dir"] = args.output_dir
    elif args.resume and not args.base:
        out = args.output_dir or FinetuneConfig().output_dir
        raise ValueError(
            f"{out} holds no wadi finetune run (no config.yaml) to resume; check --output-dir"
        )
    else:
        base = FinetuneConfig().to_dict()
    for key in (f.name for f in dataclasses.fields(FinetuneConfig)):
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return FinetuneConfig.from_dict(base)


def run(args) -> int:
    config = resolve_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from .dreambooth import finetune

    try:
        result = finetune(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        out = Path(config.output_dir)
        if os.environ.get("RANK", "0") == "0" and (out / "config.yaml").is_file():
            print(
                "wadi finetune: interrupted; continue with: wadi finetune --output-dir "
                f"{out} --resume latest",
                file=sys.stderr,
            )
        raise
    if result.final_dir is not None:
        rate = f"{result.seconds_per_step:.3f} s/step" if result.steps_run else "nothing left"
        print(
            f"wadi finetune: {result.steps} steps ({result.steps_run} run now), {rate}; adapter "
            f"in {result.final_dir / 'adapter'}"
        )
    return 0
