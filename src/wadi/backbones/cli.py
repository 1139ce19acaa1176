"""``wadi export`` (merge a student adapter into a stock pipeline) and ``wadi generate``."""

from __future__ import annotations

from wadi.argtypes import positive_int as _positive
from wadi.argtypes import unit_interval as _unit_interval


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge a LoRaD student adapter into a stock diffusers pipeline folder",
        description=(
            "Load the teacher, merge the student adapter, and write a self-contained diffusers "
            "pipeline (StableDiffusionPipeline / PixArtAlphaPipeline) with a 1-step DDIM "
            "scheduler: pipe(prompt, num_inference_steps=1, guidance_scale=1.0) reproduces "
            "wadi's one-step generator."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="a run's final/ or checkpoints/step-* folder (any adapter)"
    )
    src.add_argument("--teacher", help="diffusers pipeline folder of the teacher (with --adapter)")
    p.add_argument("--adapter", help="student LoRaD adapter folder (with --teacher)")
    p.add_argument("--ema", action="store_true", help="with --checkpoint: export the EMA weights")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument(
        "--alpha-bar-T",
        type=_unit_interval,
        default=None,
        help="abar at t=999 the student was trained with (default: the teacher's scheduler)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="saved weights: fp32, fp16 or bf16 (default: the teacher's stored dtype); "
        "fp16/bf16 folders use the stock variant names (variant='fp16')",
    )
    p.add_argument(
        "--format",
        default="diffusers",
        choices=("diffusers", "single-file", "lora"),
        help="diffusers: pipeline folder (default); single-file: one .safetensors in the "
        "original SD layout (A1111, ComfyUI) plus NAME.scheduler.json; lora: the student as "
        "a LoRA on its teacher (--lora-rank, --lora-keys)",
    )
    p.add_argument(
        "--lora-rank", default="full", help="with --format lora: a rank, or 'full' (exact; default)"
    )
    p.add_argument(
        "--lora-keys",
        default="peft",
        choices=("peft", "kohya"),
        help="with --format lora: peft (diffusers load_lora_weights) or kohya (ComfyUI, A1111)",
    )
    p.add_argument(
        "--scores",
        action="append",
        metavar="FILE",
        help="a scores.json of `wadi eval score` on this student's images: its numbers go into "
        "the model card (repeatable)",
    )
    p.add_argument(
        "--base-model",
        metavar="ORG/NAME",
        help="the teacher's Hub id for the card's base_model (default: known only for a teacher "
        "in the Hugging Face cache)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="after the export, upload it to this Hub model repo (created if needed; needs "
        "network and a token)",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.add_argument(
        "--token", default=None, help="with --push-to-hub: Hub token (default: HF_TOKEN or login)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_export)

    g = subparsers.add_parser(
        "generate",
        help="sample PNGs in one step (exported pipeline or teacher + adapter)",
        description=(
            "One-step samples from an exported pipeline folder (stock diffusers) or from a "
            "teacher plus student adapter; the teacher alone with --steps 25 --guidance 3 "
            "gives multi-step DDIM baselines.  Noise of prompt i is seeded seed + i."
        ),
    )
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="exported pipeline folder (wadi export)")
    source.add_argument("--teacher", help="diffusers pipeline folder of the teacher")
    g.add_argument("--adapter", default=None, help="student LoRaD adapter (with --teacher)")
    text = g.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    text.add_argument("--prompts", help="prompt file: .txt, .jsonl, .csv or .parquet")
    g.add_argument("--column", default=None, help="csv/parquet column or JSON key of --prompts")
    g.add_argument("--limit", type=_positive, default=None, help="first N prompts only")
    g.add_argument("--out", required=True, help="output folder for the PNGs")
    g.add_argument("--seed", type=int, default=0, help="noise of prompt i uses seed + i")
    g.add_argument("--batch-size", type=_positive, default=4, help="images per network call")
    g.add_argument("--steps", type=_positive, default=1, help="1 (student) or more (teacher DDIM)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale for --steps > 1 (3.0)")
    g.add_argument("--resolution", type=_positive, default=None, help="image side in pixels")
    g.add_argument(
        "--redilate",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|SPEC",
        help=(
            "above the native resolution: re-dilate the deep blocks' convolutions by "
            "resolution/native (ScaleCrafter); SPEC = blocks, e.g. down_blocks.1,mid_block,"
            "up_blocks.0 (NAME:D for a block's own dilation); auto = the deepest quarter"
        ),
    )
    g.add_argument(
        "--disperse",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|SPEC",
        help=(
            "above the native resolution: ScaleCrafter's dispersed convolution, the blocks' "
            "3x3 kernels replaced by least-squares 5x5 ones (blocks as --redilate); alone it "
            "disperses by resolution/native, with --redilate by 2 and dilates by the rest"
        ),
    )
    g.add_argument("--alpha-bar-T", type=_unit_interval, default=None, help="see wadi export")
    g.add_argument(
        "--controlnet",
        action="append",
        metavar="CN_DIR",
        help="a ControlNetModel folder trained for the teacher (repeatable, with --control-image)",
    )
    g.add_argument(
        "--control-image",
        action="append",
        metavar="IMG",
        help="the condition of the matching --controlnet (resized to the image size)",
    )
    g.add_argument(
        "--controlnet-scale",
        action="append",
        type=float,
        metavar="S",
        help="conditioning scale: one for all ControlNets or one each (1.0; 0 = no control)",
    )
    g.add_argument(
        "--embedding",
        action="append",
        metavar="FILE",
        help="a learned token (wadi invert-relation's embedding.safetensors; repeatable)",
    )
    g.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    g.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    g.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (as a whole)"
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.set_defaults(func=_generate)


def _export(args) -> int:
    from .export_formats import export

    if args.checkpoint is None and not args.adapter:
        raise ValueError("--teacher needs --adapter (a student LoRaD adapter folder)")
    fmt = getattr(args, "format", "diffusers")
    if (args.private or args.token) and not args.push_to_hub:
        raise ValueError("--private and --token go with --push-to-hub REPO_ID; add it or drop them")
    out, info = export(
        args.out,
        fmt=fmt,
        teacher=args.teacher,
        adapter=args.adapter,
        checkpoint=args.checkpoint,
        use_ema=args.ema,
        alpha_bar_T=args.alpha_bar_T,
        dtype=args.dtype,
        overwrite=args.overwrite,
        lora_rank=getattr(args, "lora_rank", "full"),
        lora_keys=getattr(args, "lora_keys", "peft"),
        base_model=getattr(args, "base_model", None),
        scores=getattr(args, "scores", None),
        repo_id=getattr(args, "push_to_hub", None),
    )
    if fmt == "single-file":
        print(f"wrote single-file checkpoint to {out}; sample it with {info['summary']}")
    elif fmt == "lora":
        print(
            f"wrote LoRA ({info['keys']} keys, rank {info['rank']}, {info['layers']} layers) to "
            f"{out}; relative weight error {info['relative_to_change']:.3g} of the student's change"
        )
    else:
        print(f"wrote pipeline to {out}")
    if getattr(args, "push_to_hub", None):
        from .model_card import push_to_hub

        if fmt == "diffusers":
            paths, card = [out], None
        else:
            from .export_single_file import note_path

            paths = [out, *([note_path(out)] if fmt == "single-file" else [])]
            card = info["card"]
        url = push_to_hub(
            paths, args.push_to_hub, card=card, private=args.private, token=args.token
        )
        print(f"uploaded to {url}")
    return 0


def _generate(args) -> int:
    from wadi.devices import resolve_device, warn_if_half_on_cpu
    from wadi.paths import check_output_folder, check_output_separate

    device = resolve_device(args.device)  # before anything loads
    if args.adapter and not args.teacher:
        raise ValueError("--adapter goes with --teacher (an exported --pipeline is already merged)")
    check_output_folder(args.out, overwrite=args.overwrite)
    check_output_separate(args.out, args.pipeline, args.teacher, args.adapter, args.prompts)

    from .export import parse_dtype
    from .generate import generate_images

    dtype = parse_dtype(args.dtype)
    warn_if_half_on_cpu(device, dtype, "wadi generate")
    if args.prompts:
        from wadi.data.prompts import load_prompts

        # every line is one image: image i is line i, duplicates included
        prompts = load_prompts(
            args.prompts, column=args.column, unique=False, column_flag="--column"
        )
    else:
        prompts = [p.strip() for p in args.prompt]
        if not all(prompts):
            raise ValueError("--prompt is empty; give each --prompt some text")
    if args.limit:
        prompts = prompts[: args.limit]
    written = generate_images(
        prompts,
        args.out,
        pipeline=args.pipeline,
        teacher=args.teacher,
        adapter=args.adapter,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
        guidance=args.guidance,
        resolution=args.resolution,
        redilate=args.redilate,
        disperse=args.disperse,
        controlnets=args.controlnet,
        control_images=args.control_image,
        controlnet_scales=args.controlnet_scale,
        embeddings=args.embedding,
        alpha_bar_T=args.alpha_bar_T,
        device=device,
        dtype=dtype,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} images to {args.out}")
    return 0
