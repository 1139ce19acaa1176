"""Cost of the two shipped digits teachers' U-Nets, side by side: forward and forward+backward.

    python benchmarks/teacher_cost.py --threads 2

Batch 16 at 16x16 with 16-token text conditions (the demo's shapes), median of ``--repeats``
timed calls after two warm-up calls each; prints ms per call and the attention teacher's
ratio to the shipped one.  docs/ablation.md section 7 quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_calls(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    from wadi.toy import ATTN_TEACHER_DIR, TEACHER_DIR

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 16, 16, generator=gen)
    cond = torch.randn(16, 16, 64, generator=gen)
    t = torch.full((16,), 500)
    rows = {}
    for name, folder in (("shipped", TEACHER_DIR), ("attention", ATTN_TEACHER_DIR)):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        with torch.no_grad():
            fwd = time_calls(lambda u=unet: u(x, t, cond), args.repeats)
        both = time_calls(lambda u=unet: u(x, t, cond).sample.sum().backward(), args.repeats)
        rows[name] = (sum(p.numel() for p in unet.parameters()), fwd, both)
    print(f"{'teacher':<11}{'parameters':>12}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for name, (n, fwd, both) in rows.items():
        print(f"{name:<11}{n:>12,}{fwd:>12.1f}{both:>12.1f}")
    (_, f0, b0), (_, f1, b1) = rows["shipped"], rows["attention"]
    print(f"attention / shipped: forward {f1 / f0:.2f}x, forward+backward {b1 / b0:.2f}x")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
