"""``wadi ablate``: the paper's adapter ablation in miniature, on the digits teacher.

Every run distills the shipped teacher with the demo's recipe, changing only the student
adapter (LoRaD, PEFT LoRA, PEFT DoRA, full fine-tune) or the LoRaD rank, for several
seeds.  During training the student's one-step FD and accuracy are measured every
``eval_every`` steps (own noise, training RNG untouched), so FD-vs-step curves come out
too.  Writes ``ablation.json`` and ``fd_vs_step.png``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from wadi.files import write_text

from .demo import DemoConfig, distill_config, write_prompts
from .evaluate import balanced_digits, evaluate_images, noise
from .prompts import prompt_for


@dataclasses.dataclass
class AblationConfig:
    out_dir: str = "ablation-output"
    adapters: tuple[str, ...] = ("lorad", "lora", "dora", "full")
    lorad_ranks: tuple[int, ...] = ()  # extra LoRaD ranks for the rank sweep
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    eval_every: int = 100
    samples: int = 300
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)


def runs(cfg: AblationConfig) -> list[dict]:
    """(adapter, rank) cases times seeds, same budget for all."""
    cases = [(a, cfg.demo.student_rank) for a in cfg.adapters]
    cases += [("lorad", r) for r in cfg.lorad_ranks if r != cfg.demo.student_rank]
    return [{"adapter": a, "rank": r, "seed": s} for a, r in cases for s in cfg.seeds]


def _student_metrics(context: dict, samples: int) -> dict:
    from wadi.backbones import one_step

    backbone, roles = context["backbone"], context["roles"]
    digits = balanced_digits(samples)
    z = noise(samples, 12345)
    cond = backbone.encode_prompts([prompt_for(d) for d in digits])
    with torch.no_grad(), roles.student():
        x = one_step(backbone, z, cond, context["alpha_bar_T"]).float().clamp(-1, 1)
    return evaluate_images(x, digits)


def run_one(case: dict, cfg: AblationConfig, prompts: Path) -> dict:
    from wadi.distill import train

    demo = dataclasses.replace(
        cfg.demo,
        out_dir=str(Path(cfg.out_dir) / f"{case['adapter']}-r{case['rank']}-s{case['seed']}"),
        adapter=case["adapter"],
        student_rank=case["rank"],
        seed=case["seed"],
        steps=cfg.steps,
        progress=False,
    )
    dcfg = distill_config(demo, prompts).replace(export_pipeline=False, checkpoint_every=cfg.steps)
    curve = []

    def measure(step, context):
        curve.append({"step": step, **_student_metrics(context, cfg.samples)})

    start = time.perf_counter()
    result = train(dcfg, overwrite=True, callback=measure, callback_every=cfg.eval_every)
    trainable = sum(v.numel() for v in result.student_state.values())
    return {
        **case,
        "curve": curve,
        "fd": curve[-1]["fd"],
        "accuracy": curve[-1]["accuracy"],
        "trainable": trainable,
        "seconds_per_step": result.seconds_per_step,
        "wall_seconds": time.perf_counter() - start,
    }


def summarize(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["adapter"], r["rank"]), []).append(r)
    rows = []
    for (adapter, rank), rs in groups.items():
        fds = [r["fd"] for r in rs]
        rows.append(
            {
                "adapter": adapter,
                "rank": rank,
                "seeds": len(rs),
                "fd_mean": statistics.fmean(fds),
                "fd_std": statistics.pstdev(fds) if len(fds) > 1 else 0.0,
                "accuracy_mean": statistics.fmean(r["accuracy"] for r in rs),
                "trainable": rs[0]["trainable"],
                "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in rs),
            }
        )
    return rows


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(f"{r['adapter']} r{r['rank']}", []).append(r)
    for label, rs in groups.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        mean = [statistics.fmean(r["curve"][i]["fd"] for r in rs) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("student 1-step FD (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| adapter | rank | seeds | FD mean | FD std | accuracy | trainable | s/step |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapter']} | {r['rank']} | {r['seeds']} | {r['fd_mean']:.1f} | {r['fd_std']:.1f} | "
            f"{r['accuracy_mean']:.3f} | {r['trainable']:,} | {r['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def run_ablation(cfg: AblationConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(out / "prompts.txt")
    results = []
    for case in runs(cfg):
        results.append(run_one(case, cfg, prompts))
        print(
            f"wadi ablate: {case} FD {results[-1]['fd']:.1f} accuracy {results[-1]['accuracy']:.3f}"
        )
    rows = summarize(results)
    report = {"rows": rows, "runs": results, "config": dataclasses.asdict(cfg)}
    write_text(out / "ablation.json", json.dumps(report, indent=2) + "\n")
    plot_curves(results, out / "fd_vs_step.png")
    return report
