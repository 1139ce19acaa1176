"""How much a 16-bit PixArt one-step x0 is off, and what an fp32 output head buys.

PixArt's linear schedule gives abar_T = 4.04e-5 at t = 999, so the one-step
``x0 = (z - sqrt(1 - abar_T) eps) / sqrt(abar_T)`` multiplies any error in eps by
157.  Prints the RMS error of x0 against the same model in fp32 for: the exact eps
rounded to bf16, the bf16 model as stored, and the bf16 model with wadi's fp32 head
(``wadi.backbones.pixart.upcast_output_head``).  Tiny random PixArt, CPU, seconds.

    python benchmarks/pixart_bf16_x0.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from wadi.backbones import load_backbone
from wadi.backbones.pixart import upcast_output_head
from wadi.generators import OneStep
from wadi.testing import make_tiny_pixart


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def main() -> None:
    diffusers_logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_pixart(Path(tmp) / "pixart", sample_size=16)
        ref = load_backbone(folder, dtype=torch.float32)
        prompts = ["a red cube", "a blue ball", "two cats", "a house"] * 4
        cond = ref.encode_prompts(prompts)
        z = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
        gen = OneStep(999)
        a = gen.alpha_bar(ref)
        paper = OneStep(999, 0.0047)  # the published scripts' constant: 14.6x, not 157x
        with torch.no_grad():
            x_paper_ref = paper.sample(ref, z, cond)
            x_ref = gen.sample(ref, z, cond)
            eps = ref.predict_eps(z, 999, cond)
            x_round = (z - (1 - a) ** 0.5 * eps.bfloat16().float()) / a**0.5
            rows = [("exact eps rounded to bf16", rms(x_round - x_ref))]
            for head in (False, True):
                b = load_backbone(folder, dtype=torch.bfloat16)
                if head:
                    upcast_output_head(b.denoiser)
                x = gen.sample(b, z.bfloat16(), cond.to(dtype=torch.bfloat16))
                name = "bf16 model, fp32 output head" if head else "bf16 model as stored"
                rows.append((name, rms(x.float() - x_ref)))
            b = load_backbone(folder, dtype=torch.bfloat16)
            x = paper.sample(b, z.bfloat16(), cond.to(dtype=torch.bfloat16))
            rows.append(("bf16 model, alpha_bar_T 0.0047", rms(x.float() - x_paper_ref)))
    print(f"abar_T = {a:.3g}, 1/sqrt(abar_T) = {a**-0.5:.0f}, x0 RMS (fp32) = {rms(x_ref):.3f}")
    print(f"{'variant':32s} {'x0 RMS error':>12s}")
    for name, err in rows:
        print(f"{name:32s} {err:12.4f}")


if __name__ == "__main__":
    main()
