"""``wadi embed``: precompute text embeddings for a prompt file."""

from __future__ import annotations

from wadi.argtypes import positive_int as _positive


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="precompute text embeddings (and T5 masks) into sharded safetensors",
        description=(
            "Encode every prompt of a prompt file with the teacher's text encoder, exactly as "
            "training and inference do, into sharded safetensors plus index.json, so "
            "training can run without the text encoder in memory."
        ),
    )
    p.add_argument("--teacher", required=True, help="diffusers pipeline folder of the teacher")
    p.add_argument("--prompts", required=True, help="prompt file: .txt, .jsonl, .csv or .parquet")
    p.add_argument(
        "--out", required=True, help="output folder (created; must not exist or be empty)"
    )
    p.add_argument("--column", default=None, help="csv/parquet column or JSON key (dotted)")
    p.add_argument("--shard-size", type=_positive, default=4096, help="prompts per shard file")
    p.add_argument("--batch-size", type=_positive, default=64, help="prompts per encoder call")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", help="text encoder dtype: fp32, fp16, bf16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from wadi.devices import resolve_device, warn_if_half_on_cpu
    from wadi.paths import check_output_folder, check_output_separate

    device = resolve_device(args.device)  # before anything loads
    check_output_folder(args.out, overwrite=args.overwrite)
    check_output_separate(args.out, args.teacher, args.prompts)

    from wadi.backbones.export import parse_dtype

    from .embeddings import EmbeddingStore, embed_prompts

    dtype = parse_dtype(args.dtype)
    warn_if_half_on_cpu(device, dtype, "wadi embed")
    out = embed_prompts(
        args.teacher,
        args.prompts,
        args.out,
        column=args.column,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=dtype,
        device=device,
        overwrite=args.overwrite,
    )
    store = EmbeddingStore(out)
    print(f"wrote {len(store)} prompt embeddings {store.index['embeds_shape']} to {out}")
    return 0
