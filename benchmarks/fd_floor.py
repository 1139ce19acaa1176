"""The digits miniature's FD yardsticks: real digits against real digits, and with noise added.

    python benchmarks/fd_floor.py --threads 1

FD (the shipped classifier's penultimate features, against the 360 held-out digits) of
training digits: the first N, and N drawn at random as `wadi demo` draws its floor (for a
few seeds), at N = 300 and 500 (FD is biased upwards for small sets).  Then the first 500
with Gaussian noise of a few standard deviations added (seed 0, clamped to [-1, 1]): what
a given FD looks like.  docs/ablation.md section 1 quotes it; evaluation only, seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from wadi.argtypes import comma_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--seeds",
        default="0,1,2",
        type=comma_list(int),
        help="seeds of the random draws (comma list)",
    )
    parser.add_argument(
        "--stds", default="0.1,0.3,0.6", type=comma_list(float), help="noise standard deviations"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from wadi.toy.data import load_digits_split
    from wadi.toy.evaluate import evaluate_images, real_digits_floor

    start = time.perf_counter()
    train_x, train_y, _, _ = load_digits_split()
    print(f"{len(train_x)} training digits; FD against the held-out ones")
    print(f"{'training digits':<34} {'N':>4} {'FD':>7} {'accuracy':>9}")
    for n in (300, 500):
        m = evaluate_images(train_x[:n], train_y[:n])
        print(f"{'first N':<34} {n:>4} {m['fd']:>7.2f} {m['accuracy']:>9.3f}")
        for seed in args.seeds:
            m = real_digits_floor(n, seed)  # wadi demo's floor line at that seed
            label = f"random N, seed {seed}"
            print(f"{label:<34} {n:>4} {m['fd']:>7.2f} {m['accuracy']:>9.3f}")
    print()
    print(f"{'first 500 + Gaussian noise (seed 0)':<34} {'std':>4} {'FD':>7} {'accuracy':>9}")
    x = train_x[:500]
    for std in args.stds:
        gen = torch.Generator().manual_seed(0)
        noisy = (x + std * torch.randn(x.shape, generator=gen)).clamp(-1.0, 1.0)
        m = evaluate_images(noisy, train_y[:500])
        print(f"{'':<34} {std:>4} {m['fd']:>7.2f} {m['accuracy']:>9.3f}")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
