"""``wadi invert-relation``: learn a ReVersion relation token from exemplar images."""

from __future__ import annotations

from pathlib import Path

from wadi.argtypes import positive_int as _positive

#: flags with a RelationConfig field of the same name (dashes for underscores)
FIELDS = (
    "base", "images", "prompts", "output_dir", "token", "init_word", "max_steps", "resolution",
    "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "contrastive_weight", "temperature",
    "num_positives", "focal_alpha", "seed", "checkpoint_every", "keep_checkpoints", "dtype",
    "device",
)  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "invert-relation",
        help="learn a relation token <R> from exemplar images (ReVersion) for teacher and student",
        description=(
            "ReVersion (Huang et al., 2023) on the teacher: learn only the embedding of a new "
            "token (default <R>) from images sharing a relation, with the denoising loss, the "
            "relation-steering contrastive loss (towards prepositions, away from the caption's "
            "other words) and relation-focal timestep sampling.  Writes "
            "OUTPUT/final/embedding.safetensors (diffusers' load_textual_inversion format); use "
            "it with wadi generate --embedding."
        ),
    )
    p.add_argument("--base", metavar="MODEL", help="the teacher: a diffusers SD 1.x/2.x folder")
    p.add_argument("--images", metavar="DIR", help="folder of exemplar images (.png/.jpg/.webp)")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="captions with the token: .txt, one line per image in file-name order, or .json "
        '{"image.png": "cat <R> wall" or [captions]}',
    )
    p.add_argument("--output-dir", metavar="DIR", help="run folder (checkpoints, final/)")
    p.add_argument("--token", default=None, help="the new token (default <R>)")
    p.add_argument("--init-word", default=None, help="one-token word the row starts from (and)")
    p.add_argument(
        "--max-steps", type=_positive, default=None, help="optimizer steps (ReVersion: 3000)"
    )
    p.add_argument("--resolution", type=_positive, default=None, help="image side (base's own)")
    p.add_argument("--batch-size", type=_positive, default=None, help="images per micro-batch (2)")
    p.add_argument(
        "--gradient-accumulation-steps",
        type=_positive,
        default=None,
        help="micro-batches per optimizer step (4: ReVersion's batch of 8)",
    )
    p.add_argument("--learning-rate", type=float, default=None, help="AdamW lr of the row (2e-3)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (1e-2)")
    p.add_argument(
        "--contrastive-weight",
        type=float,
        default=None,
        help="weight of the relation-steering loss (ReVersion 0.01; 0 = off)",
    )
    p.add_argument("--temperature", type=float, default=None, help="InfoNCE temperature (0.07)")
    p.add_argument(
        "--num-positives", type=int, default=None, help="prepositions per image per step (4)"
    )
    p.add_argument(
        "--focal-alpha",
        type=float,
        default=None,
        help="relation-focal sampling f(t) = (1 - a cos(pi t/T))/T (0.5; 0 = uniform)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (0)")
    p.add_argument("--checkpoint-every", type=_positive, default=None, help="steps (500)")
    p.add_argument("--keep-checkpoints", type=_positive, default=None, help="how many (2)")
    p.add_argument("--dtype", default=None, help="frozen base: fp32 (default), fp16 or bf16")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="latest|step-N|PATH",
        help="continue the run in --output-dir (its own settings unless given again)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _config(args):
    from .invert import CONFIG_NAME, RelationConfig

    given = {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
    if not args.output_dir:
        raise ValueError("--output-dir is required (the run folder)")
    saved = Path(args.output_dir) / CONFIG_NAME
    if args.resume and saved.is_file():
        config = RelationConfig.load(saved)
        for key, value in given.items():
            setattr(config, key, value)
    else:
        missing = [f"--{k}" for k in ("base", "images", "prompts") if k not in given]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (a new run)")
        config = RelationConfig(**given)
    config.progress = not args.no_progress
    return config


def _run(args) -> int:
    from .invert import invert_relation

    config = _config(args)
    result = invert_relation(config, resume=args.resume, overwrite=args.overwrite)
    print(
        f"learned {result.token} in {result.steps} steps; wrote {result.embedding_path} "
        f'(wadi generate --embedding {result.embedding_path} --prompt "... {result.token} ...")'
    )
    return 0
