"""Token inversion in miniature: a token learned on the digits teacher, used by its one-step student.

The 16x16 digits miniature has no relations to learn (one centred digit per image, no
prepositions in its vocabulary), so this checks the part of ReVersion it can check: that
``wadi invert-relation`` learns a token from a few exemplars on the teacher, and that the
token works unchanged in the distilled one-step student.  Exemplars: the first
``--exemplars`` training images of ``--digit``, each captioned ``a handwritten digit <R>``;
the token starts from ``--init-word`` (``the``).  Then the teacher (25-step DDIM, CFG 1.5)
and the student (one step) are sampled with the same noise and three prompts: the digit's
own word (the upper bound), ``<R>`` as initialised (before training) and ``<R>`` learned.
Score: the share of samples the shipped evaluator classifies as ``--digit`` and the FD
against the held-out images of that digit; ms per image.

    .venv/bin/python benchmarks/relation_digits.py --student demo-output/run/final/pipeline \
        --out /tmp/relation_digits --threads 1

Writes ``OUT/relation_digits.json``, ``OUT/grid.png`` and the run folder ``OUT/run``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="exported digits student pipeline")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--digit", type=int, default=4)
    parser.add_argument("--exemplars", type=int, default=10)
    parser.add_argument("--init-word", default="the")
    parser.add_argument("--steps", type=int, default=300, help="inversion steps")
    parser.add_argument("--samples", type=int, default=100, help="samples per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from PIL import Image

    from wadi._quiet import quiet_libraries
    from wadi.backbones import load_backbone
    from wadi.backbones.sampling import sample_multistep
    from wadi.cli import main as wadi
    from wadi.generators import OneStep
    from wadi.relation import add_token_embeddings, read_embedding
    from wadi.toy import TEACHER_DIR
    from wadi.toy.data import load_digits_split
    from wadi.toy.evaluate import evaluate_images, save_grid
    from wadi.toy.prompts import DIGIT_WORDS

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    exemplars = out / "exemplars"
    exemplars.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = load_digits_split()
    chosen = (train_y == args.digit).nonzero()[: args.exemplars, 0]
    for k, i in enumerate(chosen.tolist()):
        pixels = ((train_x[i, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(exemplars / f"{k:02d}.png")
    captions = out / "captions.txt"
    captions.write_text("a handwritten digit <R>\n" * len(chosen))

    command = [
        "invert-relation", "--base", str(TEACHER_DIR), "--images", str(exemplars),
        "--prompts", str(captions), "--output-dir", str(out / "run"), "--init-word",
        args.init_word, "--max-steps", str(args.steps), "--batch-size", "4",
        "--gradient-accumulation-steps", "1", "--seed",
        str(args.seed), "--checkpoint-every", str(args.steps), "--device", "cpu", "--overwrite",
    ]  # fmt: skip
    t0 = time.perf_counter()
    assert wadi(command) == 0
    invert_seconds = time.perf_counter() - t0
    token, learned = read_embedding(out / "run" / "final" / "embedding.safetensors")

    teacher, student = load_backbone(TEACHER_DIR), load_backbone(args.student)
    init = teacher.tokenizer(args.init_word, add_special_tokens=False).input_ids[0]
    before = teacher.text_encoder.get_input_embeddings().weight[init].detach().clone()
    info = json.loads((Path(args.student) / "wadi_export.json").read_text())
    n = args.samples
    z = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(args.seed + 1))
    reference = test_x[test_y == args.digit]
    word = f"a handwritten digit {DIGIT_WORDS[args.digit]}"

    def with_token(vector):
        for backbone in (teacher, student):
            table = backbone.text_encoder.get_input_embeddings().weight
            if token in backbone.tokenizer.get_vocab():
                with torch.no_grad():
                    table[backbone.tokenizer.convert_tokens_to_ids(token)] = vector
            else:
                add_token_embeddings(backbone.tokenizer, backbone.text_encoder, {token: vector})

    @torch.no_grad()
    def teacher_25(prompt):
        cond = teacher.encode_prompts([prompt] * n)
        null = teacher.encode_prompts([""]).expand(n)
        return teacher.decode(sample_multistep(teacher, cond, null, z, 25, 1.5)).clamp(-1, 1)

    @torch.no_grad()
    def student_1(prompt):
        cond = student.encode_prompts([prompt] * n)
        x0 = OneStep(999, info["alpha_bar_T"]).sample(student, z, cond)
        return student.decode(x0).float().clamp(-1, 1)

    rows, grid = {}, {"exemplars": train_x[chosen][:10]}
    for label, vector, prompt in [
        (f"'{DIGIT_WORDS[args.digit]}'", None, word),
        ("<R> before", before, "a handwritten digit <R>"),
        ("<R> learned", learned, "a handwritten digit <R>"),
    ]:
        if vector is not None:
            with_token(vector)
        for name, fn, nfe in (
            ("teacher 25 steps", teacher_25, 50),
            ("student 1 step", student_1, 1),
        ):
            t0 = time.perf_counter()
            images = fn(prompt)
            seconds = time.perf_counter() - t0
            scores = evaluate_images(images, [args.digit] * n, reference=reference)
            key = f"{name}, {label}"
            rows[key] = {
                "prompt": prompt,
                f"share_classified_{args.digit}": scores["accuracy"],
                f"fd_vs_heldout_{args.digit}": scores["fd"],
                "nfe": nfe,
                "ms_per_image": 1000 * seconds / n,
            }
            grid[f"{name.split()[0]} {label}"] = images[:10]
            r = rows[key]
            print(
                f"{key:<36} share {r[f'share_classified_{args.digit}']:.3f}  "
                f"FD {r[f'fd_vs_heldout_{args.digit}']:7.2f}  {r['ms_per_image']:.2f} ms/img",
                flush=True,
            )
    save_grid(grid, out / "grid.png")
    summary = json.loads((out / "run" / "final" / "summary.json").read_text())
    report = {
        "rows": rows,
        "digit": args.digit,
        "exemplars": len(chosen),
        "samples": n,
        "command": "wadi " + " ".join(command),
        "invert_seconds": invert_seconds,
        "invert_summary": summary,
        "student": args.student,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "relation_digits.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"inversion: {args.steps} steps in {invert_seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
