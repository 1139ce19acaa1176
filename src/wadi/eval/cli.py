"""``wadi eval generate | score | convert-inception``: the evaluation harness on the command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def register(subparsers) -> None:
    from wadi.eval.protocol import PROTOCOLS

    parser = subparsers.add_parser(
        "eval",
        help="generate images for a captions file and score FID / CLIP / precision-recall",
        description="Evaluation on the COCO protocol of method.md section 6 (or a custom one).",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 1)
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    protocols = ", ".join(f"{k} ({v.description})" for k, v in PROTOCOLS.items())

    def common(p):
        p.add_argument(
            "--captions",
            required=True,
            help="captions: .txt (one per line), "
            ".json list, or a COCO captions_val20xx.json annotation file",
        )
        p.add_argument(
            "--protocol",
            default="coco2014-30k",
            choices=sorted(PROTOCOLS),
            help=f"one of: {protocols}",
        )
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    gen = sub.add_parser(
        "generate",
        help="one image per caption from a diffusers pipeline folder "
        "(latent or pixel space: a teacher or an exported student)",
    )
    common(gen)
    gen.add_argument(
        "--model",
        required=True,
        help="local diffusers pipeline folder (an exported one-step student or a teacher)",
    )
    gen.add_argument("--output-dir", required=True, help="images go here as {index:05d}.png")
    gen.add_argument("--steps", type=int, default=1, help="sampling steps (1 for a student)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="CFG scale; <= 1 disables guidance (student: 0; SD teacher: 3)",
    )
    gen.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="square image side in pixels (default: the model's own, 512 for SD1.5, "
        "16 for the digits teacher)",
    )
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument(
        "--dtype",
        default=None,
        help="float16 / bfloat16 / float32 (default: float16 on GPU, float32 on CPU)",
    )
    gen.set_defaults(func=_generate)

    score = sub.add_parser("score", help="FID, precision/recall and CLIP score of an image folder")
    common(score)
    score.add_argument("--images", required=True, help="folder written by `wadi eval generate`")
    score.add_argument("--reference", help="reference image folder (val2014 / val2017)")
    score.add_argument(
        "--metrics",
        default="fid,pr,clip",
        help="comma list of fid, pr, clip, pickscore, hpsv2 (--pickscore / --hpsv2 add theirs)",
    )
    score.add_argument(
        "--extractor",
        default="inception",
        help="features for FID and precision/recall: inception or digits",
    )
    score.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="FID Inception-v3 safetensors (see `wadi eval convert-inception`); "
        "default ~/.cache/wadi/pt_inception-2015-12-05.safetensors",
    )
    score.add_argument(
        "--extractor-weights",
        type=Path,
        default=None,
        help="weights of another --extractor (digits: an evaluator folder; "
        "default: the one shipped with wadi)",
    )
    score.add_argument(
        "--inception-resize",
        default="clean",
        choices=["clean", "pytorch-fid"],
        help="how images reach 299 px: clean-fid's PIL bicubic (default, the "
        "field's COCO numbers) or pytorch-fid's torch bilinear",
    )
    score.add_argument("--clip-model", type=Path, help="local transformers CLIP folder")
    score.add_argument(
        "--open-clip-model",
        help="open_clip model name, e.g. ViT-g-14 "
        "(needs open_clip installed and --open-clip-weights)",
    )
    score.add_argument("--open-clip-weights", type=Path, help="local open_clip .safetensors file")
    score.add_argument(
        "--pickscore",
        type=Path,
        help="adds PickScore: local folder of yuvalkirstain/PickScore_v1 (config.json, "
        "model.safetensors)",
    )
    score.add_argument(
        "--hpsv2",
        type=Path,
        help="adds HPSv2: its open_clip state dict converted to .safetensors (docs/eval.md)",
    )
    score.add_argument(
        "--clip-h",
        type=Path,
        help="local laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder (config + processor, no "
        "weights needed): HPSv2's architecture and the processor of both",
    )
    score.add_argument(
        "--resize",
        type=int,
        default=None,
        help="square side after centre crop (default: the protocol's 256; 0 keeps the crop size)",
    )
    score.add_argument("--k", type=int, default=3, help="neighbours of precision/recall")
    score.add_argument(
        "--pr-extractor",
        default=None,
        help="features of precision/recall alone: vgg16 (Kynkaanniemi et al.'s VGG-16 fc2, "
        "needs --pr-extractor-weights) or another extractor; default: --extractor's",
    )
    score.add_argument(
        "--pr-extractor-weights",
        type=Path,
        default=None,
        help="weights of --pr-extractor (vgg16: torchvision's vgg16-397923af.pth converted "
        "to .safetensors, docs/eval.md)",
    )
    score.add_argument(
        "--cache-dir", type=Path, default=Path("~/.cache/wadi/eval"), help="reference feature cache"
    )
    score.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument("--workers", type=int, default=4, help="image decoding threads")
    score.add_argument("--device", default=None, help="default: cuda when available")
    score.add_argument("--output", type=Path, help="result JSON (default IMAGES/scores.json)")
    score.add_argument(
        "--model-card",
        action="store_true",
        help="add the numbers to the README.md model card of the `wadi export` folder the "
        "images came from (it must still hold the same weights)",
    )
    score.set_defaults(func=_score)

    conv = sub.add_parser(
        "convert-inception",
        help="one-time conversion of pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
    )
    conv.add_argument("source", type=Path, help="the downloaded .pth file")
    conv.add_argument(
        "target",
        type=Path,
        nargs="?",
        default=Path("~/.cache/wadi/pt_inception-2015-12-05.safetensors"),
    )
    conv.add_argument("--debug", action="store_true")
    conv.set_defaults(func=_convert)


def _captions(args):
    from wadi.eval.protocol import get_protocol, load_captions

    protocol = get_protocol(args.protocol)
    return protocol, load_captions(args.captions, protocol)


def _generate(args: argparse.Namespace) -> int:
    from wadi.eval.generate import generate_images

    protocol, captions = _captions(args)
    record = generate_images(
        args.model,
        captions,
        args.output_dir,
        steps=args.steps,
        guidance=args.guidance,
        resolution=args.resolution,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        protocol=protocol.name,
    )
    print(
        f"{len(captions)} images in {args.output_dir} "
        f"({record['skipped_finished']} were already there)"
    )
    return 0


def _score(args: argparse.Namespace) -> int:
    from wadi.eval.extractors import load_extractor
    from wadi.eval.paths import check_output_file
    from wadi.eval.score import METRICS, save_record, score_images

    images = Path(args.images).expanduser()
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    # refuse a bad output location before hours of feature extraction, not after
    output = check_output_file(args.output or images / "scores.json")
    if getattr(args, "model_card", False) and not (images / "generation.json").is_file():
        raise ValueError(
            f"--model-card needs {images}/generation.json (images made by `wadi eval "
            "generate` from a `wadi export` folder); drop --model-card"
        )
    if not args.no_cache:
        cache = args.cache_dir.expanduser()
        if cache.exists() and not cache.is_dir():
            raise ValueError(
                f"--cache-dir {cache} is an existing file, not a folder; "
                "pass a folder or --no-cache"
            )
    protocol, captions = _captions(args)
    if args.resize is not None:
        protocol = protocol.with_resize(args.resize or None)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    metrics += tuple(
        m for m, given in (("pickscore", args.pickscore), ("hpsv2", args.hpsv2)) if given
    )
    metrics = tuple(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(
            f"unknown metric {bad[0]!r} in --metrics; choose from {', '.join(METRICS)}"
        )
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = clip = pr_extractor = None
    if {"fid", "pr"} & set(metrics) and not args.reference:
        raise ValueError("FID and precision/recall need --reference DIR (e.g. val2014)")
    if "pr" in metrics and args.pr_extractor and args.pr_extractor != args.extractor:
        pr_extractor = load_extractor(
            args.pr_extractor,
            weights=(
                args.pr_extractor_weights or args.inception_weights
                if args.pr_extractor == "inception"
                else args.pr_extractor_weights
            ),
            inception_resize=args.inception_resize,
            device=device,
        )
    if "fid" in metrics or ("pr" in metrics and pr_extractor is None):
        extractor = load_extractor(
            args.extractor,
            weights=(
                args.inception_weights if args.extractor == "inception" else args.extractor_weights
            ),
            inception_resize=args.inception_resize,
            device=device,
        )
        if args.resize is None and extractor.default_resize != protocol.resize:
            protocol = protocol.with_resize(extractor.default_resize)
    if "clip" in metrics:
        clip = load_extractor(
            "clip",
            folder=args.clip_model,
            open_clip_model=args.open_clip_model,
            open_clip_weights=args.open_clip_weights,
            device=device,
        )
    preference = {}
    if "pickscore" in metrics or "hpsv2" in metrics:
        from wadi.eval.preference import load_hpsv2, load_pickscore

        if "pickscore" in metrics:
            if args.pickscore is None:
                raise ValueError("pickscore needs --pickscore DIR (yuvalkirstain/PickScore_v1)")
            preference["pickscore"] = load_pickscore(args.pickscore, args.clip_h, device=device)
        if "hpsv2" in metrics:
            if args.hpsv2 is None:
                raise ValueError("hpsv2 needs --hpsv2 FILE (.safetensors, see docs/eval.md)")
            preference["hpsv2"] = load_hpsv2(args.hpsv2, args.clip_h, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        record = score_images(
            args.images,
            captions,
            protocol,
            reference_dir=args.reference,
            metrics=metrics,
            extractor=extractor,
            clip_extractor=clip,
            preference=preference,
            pr_extractor=pr_extractor,
            k=args.k,
            cache_dir=None if args.no_cache else args.cache_dir,
            batch_size=args.batch_size,
            workers=args.workers,
        )
    save_record(record, output)
    messages = []
    for w in caught:
        if w.category is UserWarning:  # ours (and plain library ones): one line each
            messages.append(str(w.message))
        else:  # deprecations and the like: shown as Python would have
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    messages += [record.get("reference", {}).get("warning")]
    for message in dict.fromkeys(m for m in messages if m):  # each once, in order
        print(f"wadi eval score: warning: {message}", file=sys.stderr)
    print(json.dumps(record["results"], indent=2))
    print(f"full record: {output}")
    if getattr(args, "model_card", False):
        from wadi.backbones.model_card import update_card_from_scores

        print(f"model card: {update_card_from_scores(output)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from wadi.eval.inception import convert_inception_weights, file_sha256

    out = convert_inception_weights(args.source, args.target)
    print(f"wrote {out} (sha256 {file_sha256(out)})")
    return 0
