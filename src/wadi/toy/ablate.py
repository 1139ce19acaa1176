"""``wadi ablate``: the paper's adapter ablation in miniature, on the digits teacher.

Every run distills the shipped teacher with the demo's recipe, changing only the student
adapter (LoRaD, PEFT LoRA, PEFT DoRA, DoRA with its magnitude frozen, full fine-tune of the
same layers) or the LoRaD rank, for several seeds.  Budgets: ``equal-rank`` (every adapter
at the demo's rank) and/or ``equal-count`` (LoRA/DoRA at the rank whose trainable count is
nearest LoRaD's).  With ``lr_grid`` each case first runs seed ``seeds[0]`` at every grid
learning rate, keeps the rate with the lowest final FD, and runs the other seeds at it.  During training the student's one-step FD and accuracy are measured every
``eval_every`` steps (own noise, training RNG untouched) for the raw student and for its
EMA (what the demo exports), so FD-vs-step curves come out too.  Runs can go in parallel
processes (``jobs``), each with its own thread count; each reports its peak resident memory
above what it held once the model was loaded.  Writes ``ablation.json`` and
``fd_vs_step.png``; each finished run also leaves ``result.json`` in its own folder, and a
rerun with the same folder reuses every run whose settings match, so a protocol longer than
one sitting completes in several (``report_only`` summarises what has finished so far).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from wadi.files import atomic_file, write_json

from .demo import DemoConfig, distill_config, write_prompts
from .evaluate import balanced_digits, evaluate_images, noise
from .prompts import prompt_for


@dataclasses.dataclass
class AblationConfig:
    out_dir: str = "ablation-output"
    adapters: tuple[str, ...] = ("lorad", "lora", "dora", "full")
    budgets: tuple[str, ...] = ("equal-rank",)  # and/or "equal-count"
    lr_grid: tuple[float, ...] = ()  # per case: pick the best on seeds[0], then run the rest
    lorad_ranks: tuple[int, ...] = ()  # extra LoRaD ranks for the rank sweep
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    eval_every: int = 100
    samples: int = 300
    lr_overrides: dict[str, float] = dataclasses.field(default_factory=dict)  # adapter -> lr
    jobs: int = 1  # runs in parallel processes
    report_only: bool = False  # summarise the runs finished in out_dir, train nothing
    threads: int | None = None  # torch threads per run
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)

    def validate(self) -> None:
        from wadi.distill.config import ADAPTERS as known

        for budget in self.budgets:
            if budget not in BUDGETS:
                raise ValueError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
        if any(not lr > 0 for lr in self.lr_grid):
            raise ValueError(f"every learning rate of the grid must be positive: {self.lr_grid}")
        for adapter in self.adapters:
            if adapter not in known:
                raise ValueError(f"unknown adapter {adapter!r}; choose from {', '.join(known)}")
        for adapter, lr in self.lr_overrides.items():
            if adapter not in self.adapters:
                raise ValueError(
                    f"learning rate given for {adapter!r}, which is not among the adapters run "
                    f"({', '.join(self.adapters)})"
                )
            if not lr > 0:
                raise ValueError(f"learning rate for {adapter!r} must be positive, got {lr}")
        if self.jobs < 1 or self.steps < 1 or self.eval_every < 1 or not self.seeds:
            raise ValueError("jobs, steps and eval_every must be >= 1 and seeds non-empty")


BUDGETS = ("equal-rank", "equal-count")


def trainable_count(adapter: str, rank: int, demo: DemoConfig) -> int:
    """Trainable student parameters of ``adapter`` at ``rank`` on the demo's teacher."""
    from wadi.backbones import load_backbone
    from wadi.distill.roles import Roles

    backbone = load_backbone(demo.teacher_dir, dtype=torch.float32)
    roles = Roles(backbone, adapter=adapter, student_rank=rank, fake_rank=1)
    return roles.parameter_counts()["student"]


def equal_count_rank(adapter: str, demo: DemoConfig) -> int:
    """The rank of ``adapter`` whose trainable count is nearest LoRaD's at the demo's rank
    (counts are affine in the rank, so two probes give the line)."""
    target = trainable_count("lorad", demo.student_rank, demo)
    one, two = trainable_count(adapter, 1, demo), trainable_count(adapter, 2, demo)
    per_rank = two - one
    return max(1, round((target - (one - per_rank)) / per_rank))


def cases(cfg: AblationConfig) -> list[dict]:
    """The (adapter, rank, budget) cases, without seeds or learning rates."""
    out, seen = [], set()
    for budget in cfg.budgets:
        for adapter in cfg.adapters:
            rank = cfg.demo.student_rank
            if budget == "equal-count" and adapter in ("lora", "dora", "dora-fixed"):
                rank = equal_count_rank(adapter, cfg.demo)
            if (adapter, rank) not in seen:  # LoRaD and full are the same under both budgets
                seen.add((adapter, rank))
                out.append({"adapter": adapter, "rank": rank, "budget": budget})
    for r in cfg.lorad_ranks:
        if ("lorad", r) not in seen:
            seen.add(("lorad", r))
            out.append({"adapter": "lorad", "rank": r, "budget": "rank sweep"})
    return out


def runs(cfg: AblationConfig) -> list[dict]:
    """Cases times seeds, at each adapter's learning rate (no grid)."""
    return [
        {**c, "seed": s, "lr_student": _lr(cfg, c["adapter"])}
        for c in cases(cfg)
        for s in cfg.seeds
    ]


def _lr(cfg: AblationConfig, adapter: str) -> float:
    return cfg.lr_overrides.get(adapter, cfg.demo.lr_student)


def student_metrics(context: dict, samples: int, use_ema: bool = False) -> dict:
    """FD and accuracy of the student's samples through the run's generator (own noise,
    seed 12345).

    ``use_ema``: measure with the EMA tensors swapped in (then swapped back).
    """
    backbone, roles = context["backbone"], context["roles"]
    digits = balanced_digits(samples)
    z = noise(samples, 12345)
    cond = backbone.encode_prompts([prompt_for(d) for d in digits])
    live = roles.student_named_state()
    saved = {}
    if use_ema:
        saved = {k: v.detach().clone() for k, v in live.items()}
        for k, v in context["ema"].items():
            live[k].data.copy_(v)
    try:
        with torch.no_grad(), roles.student():
            x = context["generator"].sample(backbone, z, cond, torch.Generator().manual_seed(1))
            x = x.float().clamp(-1, 1)
    finally:
        for k, v in saved.items():
            live[k].data.copy_(v)
    return evaluate_images(x, digits)


def _reset_peak_memory() -> None:
    """Restart VmHWM from the current RSS (Linux), so each run's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _memory_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _run_demo(case: dict, cfg: AblationConfig) -> DemoConfig:
    """The demo configuration of one run; its ``out_dir`` is the run's folder."""
    lr = case.get("lr_student", _lr(cfg, case["adapter"]))
    return dataclasses.replace(
        cfg.demo,
        out_dir=str(
            Path(cfg.out_dir) / f"{case['adapter']}-r{case['rank']}-lr{lr:g}-s{case['seed']}"
        ),
        adapter=case["adapter"],
        student_rank=case["rank"],
        seed=case["seed"],
        steps=cfg.steps,
        lr_student=lr,
        progress=False,
    )


def run_settings(demo: DemoConfig, cfg: AblationConfig) -> dict:
    """Everything the numbers of the run ``demo`` depend on (not where it is written, nor
    its thread count): a finished run is reused only when these match."""
    settings = dataclasses.asdict(demo)
    for key in ("out_dir", "progress"):
        settings.pop(key)
    return {"demo": settings, "eval_every": cfg.eval_every, "samples": cfg.samples}


RESULT_FILE = "result.json"


def finished_run(case: dict, cfg: AblationConfig) -> dict | None:
    """The stored result of ``case`` in this ablation's folder when it was run with the
    same settings, else None, so an interrupted or extended ablation resumes."""
    import json

    demo = _run_demo(case, cfg)
    try:
        stored = json.loads((Path(demo.out_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    wanted = json.loads(json.dumps(run_settings(demo, cfg)))  # as stored: tuples are lists
    return stored if stored.get("settings") == wanted else None


def run_one(case: dict, cfg: AblationConfig, prompts: Path) -> dict:
    """One distillation run with FD curves; ``fd``/``accuracy`` are the exported weights'.
    The result is also written to the run's folder (``result.json``) for resuming."""
    from wadi.distill import train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    demo = _run_demo(case, cfg)
    lr = demo.lr_student
    dcfg = distill_config(demo, prompts).replace(export_pipeline=False, checkpoint_every=cfg.steps)
    curve = []
    rss_loaded = []

    def measure(step, context):
        if step == 0:
            _reset_peak_memory()
            # VmHWM is updated lazily and can read below VmRSS just after the reset; the
            # smaller of the two is the true start, so the peak above it is never negative
            rss, hwm = _memory_kib("VmRSS"), _memory_kib("VmHWM")
            rss_loaded.append(min(rss, hwm) if rss and hwm else rss)
        point = {"step": step, **student_metrics(context, cfg.samples)}
        if context.get("ema") is not None:
            ema = student_metrics(context, cfg.samples, use_ema=True)
            point.update(fd_ema=ema["fd"], accuracy_ema=ema["accuracy"])
        curve.append(point)

    start = time.perf_counter()
    result = train(dcfg, overwrite=True, callback=measure, callback_every=cfg.eval_every)
    trainable = sum(v.numel() for v in result.student_state.values())
    peak = _memory_kib("VmHWM")
    exported = "_ema" if "fd_ema" in curve[-1] else ""
    result = {
        **case,
        "lr_student": lr,
        "curve": curve,
        "fd": curve[-1]["fd" + exported],
        "accuracy": curve[-1]["accuracy" + exported],
        "fd_raw": curve[-1]["fd"],
        "trainable": trainable,
        "seconds_per_step": result.seconds_per_step,
        # Linux reads RSS counters with a per-thread lag of up to 64 pages (0.25 MiB), so a
        # run that adds less than that can read slightly negative: it is 0 at this resolution
        "peak_mib_over_loaded": (
            max(0.0, (peak - rss_loaded[0]) / 1024) if peak is not None and rss_loaded[0] else None
        ),
        "wall_seconds": time.perf_counter() - start,
        "settings": run_settings(demo, cfg),
    }
    write_json(Path(demo.out_dir) / RESULT_FILE, result)
    return result


def _run_in_child(args) -> dict:
    from wadi._quiet import quiet_libraries

    quiet_libraries()  # a spawned process starts with the libraries' bars and notes back on
    case, cfg, prompts = args
    return run_one(case, cfg, prompts)


def summarize(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("chosen", True):  # grid runs at a rate not chosen are kept out of the rows
            groups.setdefault((r["adapter"], r["rank"]), []).append(r)
    rows = []
    for (adapter, rank), rs in groups.items():
        fds = [r["fd"] for r in rs]
        rows.append(
            {
                "adapter": adapter,
                "rank": rank,
                "budget": rs[0].get("budget", "equal-rank"),
                "seeds": len(rs),
                "fd_mean": statistics.fmean(fds),
                "fd_std": statistics.pstdev(fds) if len(fds) > 1 else 0.0,
                "fd_raw_mean": statistics.fmean(r["fd_raw"] for r in rs),
                "accuracy_mean": statistics.fmean(r["accuracy"] for r in rs),
                "lr_student": rs[0]["lr_student"],
                "trainable": rs[0]["trainable"],
                "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in rs),
                "peak_mib": _mean_or_none([r["peak_mib_over_loaded"] for r in rs]),
            }
        )
    return rows


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


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
        # per step, the seeds' FD of the exported weights (EMA where measured; step 0 has none)
        per_step = [
            [p.get("fd_ema", p["fd"]) for p in points] for points in zip(*(r["curve"] for r in rs))
        ]
        (line,) = ax.plot(steps, [statistics.fmean(v) for v in per_step], marker="o", label=label)
        if len(rs) > 1:
            ax.fill_between(
                steps,
                [min(v) for v in per_step],
                [max(v) for v in per_step],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("student 1-step FD, EMA (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| adapter | rank | budget | student lr | seeds | FD mean | FD std | raw FD mean "
        "| accuracy | trainable | s/step | peak MiB |",
        "|---" * 12 + "|",
    ]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['adapter']} | {r['rank']} | {r['budget']} | {r['lr_student']:g} | {r['seeds']} | "
            f"{r['fd_mean']:.1f} | {r['fd_std']:.1f} | {r['fd_raw_mean']:.1f} | "
            f"{r['accuracy_mean']:.3f} | {r['trainable']:,} | {r['seconds_per_step']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def run_ablation(cfg: AblationConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out_dir)
    if cfg.report_only and not out.is_dir():
        raise ValueError(f"no ablation folder {out} to report on; run without --report-only first")
    out.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(out / "prompts.txt")
    results: list[dict] = []
    missing: list[dict] = []  # with report_only: the runs not finished yet

    if cfg.lr_grid:  # phase 1: every case at every grid rate on the first seed
        first = [
            {**c, "seed": cfg.seeds[0], "lr_student": lr} for c in cases(cfg) for lr in cfg.lr_grid
        ]
        grid = _run_all(first, cfg, prompts, results, missing)
        chosen = {}
        for r in grid:
            key = (r["adapter"], r["rank"])
            if key not in chosen or r["fd"] < chosen[key]["fd"]:
                chosen[key] = r
        for r in grid:
            r["chosen"] = chosen[(r["adapter"], r["rank"])] is r
        rest = [
            {**c, "seed": s, "lr_student": chosen[(c["adapter"], c["rank"])]["lr_student"]}
            for c in cases(cfg)
            if (c["adapter"], c["rank"]) in chosen  # a report can lack a case's whole grid
            for s in cfg.seeds[1:]
        ]
        _run_all(rest, cfg, prompts, results, missing, total=len(first) + len(rest))
    else:
        _run_all(runs(cfg), cfg, prompts, results, missing)
    if cfg.report_only and not results:
        raise ValueError(
            f"no run with these settings has finished in {out}; run without --report-only first"
        )
    rows = summarize(results)
    report = {"rows": rows, "runs": results, "config": dataclasses.asdict(cfg)}
    if cfg.report_only:
        report["not_run"] = missing
    write_json(out / "ablation.json", report)
    plot_curves([r for r in results if r.get("chosen", True)], out / "fd_vs_step.png")
    return report


def _label(case: dict) -> str:
    return (
        f"wadi ablate: {case['adapter']} r{case['rank']} lr {case['lr_student']:g} "
        f"seed {case['seed']}"
    )


def _run_all(
    todo: list[dict], cfg, prompts, results: list[dict], missing: list[dict], total=None
) -> list[dict]:
    """Run ``todo`` (serially or in ``cfg.jobs`` processes); append to ``results`` in order.
    Runs finished before are read back; with ``cfg.report_only`` the others go to
    ``missing`` instead of running."""
    total = total or len(todo)
    mine: list[dict] = []

    def done(result: dict, reused: bool = False) -> None:
        mine.append(result)
        results.append(result)
        print(
            f"{_label(result)}: FD {result['fd']:.1f} accuracy {result['accuracy']:.3f} "
            f"({len(results)}/{total}{', finished before: reused' if reused else ''})",
            flush=True,
        )

    pending = []
    for case in todo:
        stored = finished_run(case, cfg)
        if stored is None:
            pending.append(case)
        else:
            done(stored, reused=True)
    if cfg.report_only:
        for case in pending:
            print(f"{_label(case)}: not run yet, left out of the report", flush=True)
        missing.extend(pending)
        pending = []
    if cfg.jobs > 1 and len(pending) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(cfg.jobs, maxtasksperchild=1) as pool:
            for result in pool.imap_unordered(_run_in_child, [(c, cfg, prompts) for c in pending]):
                done(result)
    else:
        for case in pending:
            done(run_one(case, cfg, prompts))
    if len(todo) > 1:
        key = lambda r: (r["adapter"], r["rank"], r["lr_student"], r["seed"])  # noqa: E731
        order = {key(c): i for i, c in enumerate(todo)}
        mine.sort(key=lambda r: order[key(r)])
        results[len(results) - len(mine) :] = mine
    return mine
