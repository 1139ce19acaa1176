"""torch.compile of the shared denoiser on the digits miniature: seconds per WaDi iteration.

Builds the demo's run (``wadi.toy.demo`` recipe) with ``compile`` off and on, runs a few
warm-up iterations (compilation happens there), then times iterations, each variant in
its own process so their memory and caches are their own.

    python benchmarks/compile_speed.py --backends none aot_eager inductor --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(backend: str, steps: int, warmup: int, threads: int) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(threads)
    from wadi.distill.run import build_run
    from wadi.toy.demo import DemoConfig, distill_config, write_prompts

    with tempfile.TemporaryDirectory() as tmp:
        demo = dataclasses.replace(DemoConfig(), out_dir=f"{tmp}/run", progress=False)
        config = distill_config(demo, write_prompts(Path(tmp) / "p.txt")).replace(
            export_pipeline=False,
            compile=backend != "none",
            compile_backend=backend if backend != "none" else "inductor",
        )
        run, config = build_run(config, torch.device("cpu"), 0, 1, None, False)
        times = []
        start = time.perf_counter()
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            cond = run.data.get(list(range(config.batch_size)))
            run.iteration(cond, run.null_cond, run.shape, run.rng, step)
            if step == warmup - 1:
                compile_s = time.perf_counter() - start
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    return {"backend": backend, "s_per_step": statistics.median(times), "warmup_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["none", "aot_eager", "inductor"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.warmup, args.threads)))
        return
    rows = []
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--one", backend, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            rows.append({"backend": backend, "error": out.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next(
        (r["s_per_step"] for r in rows if r["backend"] == "none" and "error" not in r), None
    )
    print("| backend | s / iteration | speed-up vs eager | warm-up (incl. compile) s |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | failed: {r['error'][:80]} | | |")
            continue
        ratio = f"{base / r['s_per_step']:.2f}x" if base else "-"
        print(f"| {r['backend']} | {r['s_per_step']:.3f} | {ratio} | {r['warmup_s']:.0f} |")


if __name__ == "__main__":
    main()
