"""Norm vs direction on the digits miniature's students, and the swap test (docs/analysis.md).

For every student (a run's ``final/`` folder of any adapter kind, or an exported pipeline):
export it (EMA weights where the run kept them), ``wadi analyze`` it against the shipped
teacher with both swaps, then score the student and its two swaps in one step with the
demo's evaluator (FD against the held-out digits, accuracy; the same digits and noise for
all).  Prints two tables: the weight analysis (norm change, direction as ``1 - cos`` and as
the angle, both ratios) and the swap test.

    python benchmarks/analysis_digits.py OUT NAME=RUN_OR_PIPELINE [NAME=...] [--samples 500]

e.g. ``lorad=demo-output/run/final lora=ablation-output/lora-r16-lr0.001-s0/final``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from wadi.backbones import load_backbone
from wadi.toy.demo import TEACHER_DIR, one_step_images
from wadi.toy.evaluate import balanced_digits, evaluate_images, noise


def wadi(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "wadi.cli", *args], check=True)


def pipeline_of(source: Path, out: Path) -> Path:
    """An exported pipeline for ``source`` (a run's final/ is exported with its EMA)."""
    if (source / "model_index.json").is_file():
        return source
    target = out / "pipeline"
    if not target.exists():
        ema = ["--ema"] if (source / "ema.safetensors").is_file() else []
        wadi("export", "--checkpoint", str(source), "--out", str(target), *ema)
    return target


def one_step_score(pipeline: Path, samples: int) -> dict:
    backbone = load_backbone(pipeline, dtype=torch.float32)
    abar = float(backbone.scheduler.alphas_cumprod[999])
    digits = balanced_digits(samples)
    images = one_step_images(backbone, digits, noise(samples, 1), abar)
    return evaluate_images(images, digits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("students", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows, swaps = [], []
    teacher_score = one_step_score(TEACHER_DIR, args.samples)
    for item in args.students:
        name, _, path = item.partition("=")
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        pipe = pipeline_of(Path(path), out)
        analysis = out / "analysis"
        if not (analysis / "report.json").is_file():
            wadi(
                "analyze", str(TEACHER_DIR), str(pipe), "--out", str(analysis),
                "--swap", "norm", "--swap", "direction", "--quiet",
            )  # fmt: skip
        report = json.loads((analysis / "report.json").read_text())
        s = report["summary"]
        changed = [x for x in report["layers"] if x["residual_relative_norm"] > 0]
        angle_changed = sum(x["angle_mean"] for x in changed) / max(1, len(changed))
        norm_changed = sum(x["norm_change_mean"] for x in changed) / max(1, len(changed))
        rows.append(
            (name, s["layers_count"], len(changed), s["norm_change_mean"],
             s["direction_change_mean"], s["angle_mean"], s["ratio"], s["angle_ratio"],
             norm_changed, angle_changed)
        )  # fmt: skip
        for label, folder in (("student", pipe), ("teacher norms", analysis / "swap-norm"),
                              ("teacher directions", analysis / "swap-direction")):  # fmt: skip
            score = one_step_score(folder, args.samples)
            swaps.append((name, label, score["fd"], score["accuracy"]))
    print(
        f"teacher, 1 step: FD {teacher_score['fd']:.1f}, accuracy {teacher_score['accuracy']:.3f}"
    )
    print(
        "| student | layers | changed | norm % | 1-cos % | angle % | (1-cos)/norm | angle/norm "
        "| norm % (changed) | angle % (changed) |"
    )
    print("|---" * 10 + "|")
    for r in rows:
        cells = [r[0], str(r[1]), str(r[2])] + [
            "-" if v is None else (f"{v:.4f}" if abs(v) < 1e3 else f"{v:.3g}") for v in r[3:]
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    print("| student | model | FD (1 step) | accuracy |")
    print("|---|---|---|---|")
    for name, label, fd, acc in swaps:
        print(f"| {name} | {label} | {fd:.1f} | {acc:.3f} |")
    print(f"({args.samples} samples each; {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
