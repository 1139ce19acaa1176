"""Cost of the two shipped digits teachers' U-Nets, side by side: forward and forward+backward.

    python benchmarks/teacher_cost.py --threads 2
    python benchmarks/teacher_cost.py --threads 1 --batches 16,32 --clock cpu   # on a busy machine

Batch 16 at 16x16 with 16-token text conditions (the demo's shapes), median of ``--repeats``
timed calls after two warm-up calls each; prints ms per call and the attention teacher's
ratio to the shipped one.  ``--batches`` times each teacher at several batch sizes and
prints each size's cost relative to the first (does a larger batch use idle cores?).
``--clock cpu`` counts the process's CPU time instead of wall time: with one thread it
is the work done, whatever else runs on the machine.  docs/ablation.md sections 7 and 9
quote it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wadi.argtypes import comma_list, positive_int


def time_calls(fn, repeats: int, clock=time.perf_counter) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--batches", default="16", type=comma_list(positive_int), help="batch sizes (comma list)"
    )
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = args.batches
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    from diffusers import UNet2DConditionModel

    from wadi.toy import ATTN_TEACHER_DIR, TEACHER_DIR

    rows = {}
    for name, folder in (("shipped", TEACHER_DIR), ("attention", ATTN_TEACHER_DIR)):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        n = sum(p.numel() for p in unet.parameters())
        for b in batches:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(b, 1, 16, 16, generator=gen)
            cond = torch.randn(b, 16, 64, generator=gen)
            t = torch.full((b,), 500)
            with torch.no_grad():
                fwd = time_calls(lambda u=unet, x=x, t=t, c=cond: u(x, t, c), args.repeats, clock)
            both = time_calls(
                lambda u=unet, x=x, t=t, c=cond: u(x, t, c).sample.sum().backward(),
                args.repeats,
                clock,
            )
            rows[name, b] = (n, fwd, both)
    print(f"{'teacher':<11}{'batch':>6}{'parameters':>12}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for (name, b), (n, fwd, both) in rows.items():
        print(f"{name:<11}{b:>6}{n:>12,}{fwd:>12.1f}{both:>12.1f}")
    b0 = batches[0]
    (_, f0, w0), (_, f1, w1) = rows["shipped", b0], rows["attention", b0]
    print(
        f"attention / shipped at batch {b0}: forward {f1 / f0:.2f}x, forward+backward {w1 / w0:.2f}x"
    )
    for name in ("shipped", "attention"):
        for b in batches[1:]:
            (_, fa, wa), (_, fb, wb) = rows[name, b0], rows[name, b]
            print(
                f"{name} batch {b} / batch {b0}: forward {fb / fa:.2f}x, "
                f"forward+backward {wb / wa:.2f}x (samples {b / b0:.2f}x)"
            )
    print(f"threads {torch.get_num_threads()}, clock {args.clock}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
