"""DreamBooth with LoRaD, LoRA and DoRA on the digits miniature: teach the shipped teacher a
new glyph (a drawn cross, none of 0-9) from 5 images and a new token, at equal trainable budget.

Per adapter and seed: ``wadi finetune`` (the library call) with prior preservation on the
teacher's own samples of "a handwritten digit", then the tuned model (``final/pipeline``) is
scored with the shipped evaluator:

* nearest-exemplar distance: for each sample of the instance prompt, the distance in
  evaluator features to the closest of the 5 exemplars (mean over samples; lower = closer
  to the glyph); for scale, the same for the untuned teacher and for real held-out digits;
* prior degradation: FD against the held-out digits and prompt accuracy of samples of
  "a handwritten digit <0-9>" (25 DDIM steps, CFG 1.5 as ``wadi toy`` scores the teacher).

    .venv/bin/python benchmarks/dreambooth_digits.py --out /tmp/db --steps 200 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

INSTANCE = "a handwritten digit sks"
CLASS = "a handwritten digit"


def cross_glyphs(n: int, seed: int = 123) -> torch.Tensor:
    """``n`` drawn crosses (an X of two thick strokes), jittered, (n, 1, 16, 16) in [-1, 1]."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float64) + 0.5
    out = []
    for _ in range(n):
        cx, cy = 8 + g.uniform(-0.8, 0.8), 8 + g.uniform(-0.8, 0.8)
        arm, width = g.uniform(4.5, 6.0), g.uniform(1.6, 2.3)
        ink = np.zeros((16, 16))
        for base in (math.pi / 4, 3 * math.pi / 4):
            a = base + g.uniform(-0.15, 0.15)
            dx, dy = math.cos(a), math.sin(a)
            px, py = xx - cx, yy - cy
            along = np.clip(px * dx + py * dy, -arm, arm)
            dist = np.hypot(px - along * dx, py - along * dy)
            ink = np.maximum(ink, np.clip(width / 2 + 0.5 - dist, 0, 1))
        out.append(ink * 2 - 1)
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


def save_glyphs(images: torch.Tensor, folder: Path) -> Path:
    from wadi.images import save_png, to_pil

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_pil(images)):
        save_png(image, folder / f"cross{i}.png")
    return folder


@torch.no_grad()
def samples(backbone, prompts: list[str], seed: int, steps=25, guidance=1.5) -> torch.Tensor:
    from wadi.backbones.sampling import sample_multistep
    from wadi.toy.evaluate import noise

    z = noise(len(prompts), seed)
    null = backbone.encode_prompts([""]).expand(len(prompts))
    x0 = sample_multistep(backbone, backbone.encode_prompts(prompts), null, z, steps, guidance)
    return backbone.decode(x0).float().clamp(-1, 1)


def nearest_exemplar(images: torch.Tensor, exemplars: torch.Tensor) -> float:
    from wadi.toy.evaluate import evaluator_features

    f, e = evaluator_features(images), evaluator_features(exemplars)
    d = np.sqrt(((f[:, None, :] - e[None, :, :]) ** 2).sum(-1))
    return float(d.min(1).mean())


def score(backbone, exemplars, n_glyph: int, n_digits: int, seed: int) -> dict:
    from wadi.toy.evaluate import balanced_digits, evaluate_images
    from wadi.toy.prompts import prompt_for

    glyph = samples(backbone, [INSTANCE] * n_glyph, seed + 1000)
    digits = balanced_digits(n_digits)
    prior = samples(backbone, [prompt_for(d) for d in digits], seed)
    metrics = evaluate_images(prior, digits)
    return {
        "nearest": nearest_exemplar(glyph, exemplars),
        "fd": metrics["fd"],
        "accuracy": metrics["accuracy"],
        "glyph": glyph[:10],
    }


def trainable(teacher: str, adapter: str, rank: int) -> int:
    from wadi.backbones import load_backbone
    from wadi.finetune.roles import FinetuneRoles

    backbone = load_backbone(teacher)
    return FinetuneRoles(backbone, adapter, rank).parameter_counts()["student"]


def budgets(teacher: str, lora_rank: int) -> tuple[dict, dict]:
    """Ranks and trainable counts at equal budget: LoRaD's rank is the one whose count
    (linear in the rank) is closest to LoRA's at ``lora_rank``; DoRA adds its magnitudes."""
    lora = trainable(teacher, "lora", lora_rank)
    per_rank = trainable(teacher, "lorad", 1)
    ranks = {"lorad": max(1, round(lora / per_rank)), "lora": lora_rank, "dora": lora_rank}
    counts = {"lorad": ranks["lorad"] * per_rank, "lora": lora}
    counts["dora"] = trainable(teacher, "dora", lora_rank)
    return ranks, counts


def run_seed(args, seed: int) -> dict:
    """References and every adapter's run for one seed; written to OUT/results-seedS.json."""
    from wadi.backbones import load_backbone
    from wadi.finetune import FinetuneConfig, finetune
    from wadi.images import save_image_grid
    from wadi.toy import TEACHER_DIR

    out = Path(args.out)
    teacher = str(TEACHER_DIR)
    exemplars = cross_glyphs(5)
    glyph_dir = save_glyphs(exemplars, out / f"glyph-seed{seed}")
    ranks, counts = budgets(teacher, args.lora_rank)
    base = score(load_backbone(teacher), exemplars, args.glyph_samples, args.digit_samples, seed)
    grid = {"exemplars": exemplars, "teacher": base.pop("glyph")[:5]}
    result = {"seed": seed, "ranks": ranks, "counts": counts, "teacher": base, "runs": {}}
    for adapter in args.adapters:
        run = out / "runs" / f"{adapter}-seed{seed}"
        config = FinetuneConfig(
            base=teacher, images=str(glyph_dir), instance_prompt=INSTANCE,
            class_prompt=CLASS, prior_images=args.prior_images, prior_guidance=1.5,
            output_dir=str(run), adapter=adapter, rank=ranks[adapter],
            max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
            seed=seed, checkpoint_every=args.steps, progress=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        finetune(config, overwrite=True)
        seconds = time.perf_counter() - t0
        row = score(
            load_backbone(run / "final" / "pipeline"), exemplars, args.glyph_samples,
            args.digit_samples, seed,
        )  # fmt: skip
        grid[adapter] = row.pop("glyph")[:5]
        row["seconds"] = seconds
        result["runs"][adapter] = row
        print(f"{adapter} seed {seed}: {json.dumps(row)}", flush=True)
    save_image_grid(torch.cat(list(grid.values())), out / f"grid-seed{seed}.png", nrow=5, scale=4)
    result["grid_rows"] = list(grid)
    (out / f"results-seed{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(out: Path) -> str:
    """The table over every OUT/results-seed*.json (mean ± sd over seeds)."""
    from wadi.toy.data import load_digits_split
    from wadi.toy.evaluate import evaluator_features

    results = [json.loads(p.read_text()) for p in sorted(out.glob("results-seed*.json"))]
    if not results:
        raise SystemExit(f"no results-seed*.json in {out}")

    def stat(values, fmt="{:.2f}"):
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"

    def cells(rows):
        return (
            f"{stat([r['nearest'] for r in rows])} | {stat([r['fd'] for r in rows])} | "
            f"{stat([r['accuracy'] for r in rows], '{:.3f}')}"
        )

    lines = [
        "| model | rank | trainable | nearest-exemplar dist. (glyph prompt) | FD 0-9 | "
        "accuracy 0-9 | train s |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (untuned) | - | 0 | {cells([r['teacher'] for r in results])} | - |",
    ]
    for a in results[0]["runs"]:
        rows = [r["runs"][a] for r in results]
        lines.append(
            f"| {a} | {results[0]['ranks'][a]} | {results[0]['counts'][a]:,} | {cells(rows)} "
            f"| {stat([r['seconds'] for r in rows], '{:.0f}')} |"
        )
    exemplars = cross_glyphs(5)
    _, _, test_x, _ = load_digits_split()
    e = evaluator_features(exemplars)
    d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1)) + np.diag([np.inf] * len(e))
    lines.append(
        f"\nseeds {[r['seed'] for r in results]}. For scale: real held-out digits lie "
        f"{nearest_exemplar(test_x[:100], exemplars):.2f} from the nearest exemplar, an "
        f"exemplar {float(d.min(1).mean()):.2f} from its nearest other exemplar."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--adapters", nargs="+", default=["lorad", "lora", "dora"])
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA/DoRA rank; LoRaD's matches")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prior-images", type=int, default=30)
    p.add_argument("--glyph-samples", type=int, default=20)
    p.add_argument("--digit-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="only print the table of OUT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.report:
        for seed in args.seeds:
            run_seed(args, seed)
    table = report(out)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wall time of this call: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
