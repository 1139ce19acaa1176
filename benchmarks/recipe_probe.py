"""Probe a change to the digits demo's recipe: FD of the raw student and its EMA every N steps.

    python benchmarks/recipe_probe.py fu3 --distill '{"fake_updates": 3}'
    python benchmarks/recipe_probe.py conv --demo '{"include_conv": true, "fake_rank": 16}'
    python benchmarks/recipe_probe.py gan --gan 0.05          # DMD2's GAN term on real digits
    python benchmarks/recipe_probe.py ema --ema-decays 0.95,0.98,0.995,0.998

``--demo`` changes :class:`wadi.toy.demo.DemoConfig` fields, ``--distill`` fields of the
:class:`wadi.distill.DistillConfig` it builds.  Prints one line per measurement (300 one-step
samples, own noise, the training RNG untouched) and writes them to ``OUT/NAME/log.txt``.
The probes in docs/ablation.md ran two at a time with ``--threads 1``.

``--ema-decays`` keeps further EMAs of the student beside the run's own (``ema_decay``) and
measures each at every point: the EMA never feeds back into training, so one run gives
what one run per decay would (same seed, same student).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from wadi.argtypes import comma_list, unit_interval


def write_real_digits(folder: Path) -> Path:
    """The training split's digits as 16x16 greyscale PNGs (the GAN term's real images)."""
    from PIL import Image

    from wadi.toy.data import load_digits_split

    folder.mkdir(parents=True, exist_ok=True)
    train_x = load_digits_split()[0]
    for i, x in enumerate(train_x):
        pixels = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--demo", default="{}", help="JSON of DemoConfig changes")
    parser.add_argument("--distill", default="{}", help="JSON of DistillConfig changes")
    parser.add_argument("--out", default="/tmp/wadi-probes")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--gan", type=float, default=0.0, help="GAN weight; the real images are training digits"
    )
    parser.add_argument(
        "--ema-decays",
        default="",
        type=comma_list(unit_interval),
        help="further EMA decays to measure (comma list)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decays = args.ema_decays

    from wadi.distill import train
    from wadi.distill.hooks import EMA
    from wadi.toy.ablate import student_metrics
    from wadi.toy.demo import DemoConfig, distill_config, write_prompts

    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    demo = dataclasses.replace(
        DemoConfig(), out_dir=str(out), progress=False, **json.loads(args.demo)
    )
    changes = json.loads(args.distill)
    if args.gan:
        changes.update(gan_weight=args.gan, real_images=str(write_real_digits(out / "real")))
    config = distill_config(demo, write_prompts(out / "prompts.txt")).replace(
        export_pipeline=False, **changes
    )
    log = (out / "log.txt").open("w")

    start = time.perf_counter()
    extra: dict[float, EMA] = {}

    def measure(step, context):
        # called every step when extra EMAs are kept (they update here, after the run's own)
        if decays:
            if step == 0:
                extra.update({d: EMA(context["roles"].student_named_state(), d) for d in decays})
            else:
                for ema in extra.values():
                    ema.update(context["roles"].student_named_state())
            if step % args.every:
                return
        raw = student_metrics(context, args.samples)
        elapsed = time.perf_counter() - start
        line = f"{args.name} step {step} ({elapsed:.0f} s) raw FD {raw['fd']:.1f} acc {raw['accuracy']:.3f}"
        emas = {"ema": context["ema"], **{f"ema {d:g}": e.tensors for d, e in extra.items()}}
        for label, tensors in emas.items():
            if tensors is not None and step > 0:
                m = student_metrics({**context, "ema": tensors}, args.samples, use_ema=True)
                line += f" | {label} FD {m['fd']:.1f} acc {m['accuracy']:.3f}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    every = 1 if decays else args.every
    result = train(config, overwrite=True, callback=measure, callback_every=every)
    print(f"{args.name}: {result.seconds_per_step:.2f} s/step, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
