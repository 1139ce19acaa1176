"""Time and peak memory of one WaDi iteration on the real SDXL or FLUX.1-dev denoiser.

The denoiser is built from its published config with random weights (no download), in
the run's dtype on the device; student and fake score are the presets' LoRaD adapters
(``sdxl-unet-*`` ranks 256/32, ``flux-*`` ranks 128/32), trained by AdamW in fp32 as in
``wadi distill``.  Text conditions are random tensors of the real shapes (the text
encoders and the VAE are not part of an iteration).  Prints one markdown row and a JSON
line; a run that fails (out of memory included) prints the error as its row.

    python benchmarks/backbone_step.py --arch flux --device cuda --precision bf16   # GPU
    python benchmarks/backbone_step.py --arch flux-tiny --steps 1 --warmup 0        # CPU check
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (fields that differ from the
#: UNet2DConditionModel defaults); the same dict is checked in tests/backbones/test_sdxl.py
SDXL_BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
#: black-forest-labs/FLUX.1-dev transformer/config.json: the class defaults plus guidance
FLUX_DEV = dict(guidance_embeds=True)

#: the same layouts, small enough for a CPU check of this script
SDXL_TINY = dict(
    SDXL_BASE_UNET,
    sample_size=8,
    block_out_channels=(32, 64),
    transformer_layers_per_block=(1, 1),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,
)
FLUX_TINY = dict(
    guidance_embeds=True,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
#: arch: (family, denoiser config, text tokens, text width, pooled width, VAE factor, px)
ARCHS = {
    "sdxl": ("sdxl", SDXL_BASE_UNET, 77, 2048, 1280, 8, 1024),
    "flux": ("flux", FLUX_DEV, 512, 4096, 768, 8, 1024),
    "sdxl-tiny": ("sdxl", SDXL_TINY, 8, 32, 16, 2, 16),
    "flux-tiny": ("flux", FLUX_TINY, 8, 32, 16, 2, 16),
}


def _vae_stub(factor: int):
    """What the backbones read of a VAE outside decoding: its downsampling factor."""
    levels = factor.bit_length()  # factor 2**(levels - 1)
    return SimpleNamespace(config=SimpleNamespace(block_out_channels=(1,) * levels))


def build(arch: str, device, dtype):
    """``(backbone, cond, null)`` for ``arch``, denoiser weights random in ``dtype``."""
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        UNet2DConditionModel,
    )

    from wadi.backbones import FluxBackbone, SDXLBackbone, TextCondition

    family, config, tokens, width, pooled, factor, _ = ARCHS[arch]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the run's dtype, on the device: fast
    try:
        with torch.device(device):
            if family == "sdxl":
                denoiser = UNet2DConditionModel(**config)
            else:
                denoiser = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    denoiser.requires_grad_(False).eval()
    parts = dict(text_encoder=None, tokenizer=None, vae=_vae_stub(factor))
    if family == "sdxl":  # SDXL base 1.0's scheduler_config.json (eps prediction)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )
        backbone = SDXLBackbone(denoiser=denoiser, scheduler=scheduler, **parts)
    else:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        backbone = FluxBackbone(denoiser=denoiser, scheduler=scheduler, **parts)

    def condition(batch: int):
        extras = {}
        if family == "sdxl":
            extras["time_ids"] = backbone.time_ids(batch).to(device)
        return TextCondition(
            torch.randn(batch, tokens, width, device=device),
            pooled=torch.randn(batch, pooled, device=device),
            extras=extras,
        )

    return backbone, condition


def run(args) -> dict:
    from wadi.distill import DistillConfig, Roles
    from wadi.distill.iteration import WaDiIteration
    from wadi.distill.objectives import VSD
    from wadi.distill.optim import OptimizerStep
    from wadi.generators import OneStep

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    t0 = time.perf_counter()
    backbone, condition = build(args.arch, device, dtype)
    resolution = args.resolution or ARCHS[args.arch][6]
    backbone.resolution = resolution  # SDXL's time ids, FLUX's shift
    guidance = 3.5 if ARCHS[args.arch][0] == "flux" else 4.5
    if getattr(backbone, "guidance_embeds", False):
        backbone.guidance = guidance
    roles = Roles(backbone, "lorad")
    if args.gradient_checkpointing:
        roles.enable_gradient_checkpointing()
    roles.train()
    config = DistillConfig(
        teacher="bench",
        batch_size=args.batch,
        resolution=resolution,
        guidance_scale=guidance,
        mixed_precision="no" if args.precision == "fp32" else args.precision,
        progress=False,
    )
    optimizers = {
        "student": OptimizerStep(
            "student", roles.student_parameters(), config.lr_student, config, device
        ),
        "fake": OptimizerStep("fake", roles.fake_parameters(), config.lr_fake, config, device),
    }
    latent = backbone.latent_size(resolution)
    shape = (args.batch, backbone.latent_channels, latent, latent)
    cond, null = condition(args.batch), condition(1)
    autocast = functools.partial(
        torch.autocast, device.type, dtype=dtype, enabled=args.precision != "fp32"
    )
    iteration = WaDiIteration(backbone, roles, VSD(), OneStep(999), config, autocast, optimizers)
    build_s = time.perf_counter() - t0
    g = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, finite = [], True
    for step in range(args.warmup + args.steps):
        t1 = time.perf_counter()
        result = iteration(cond, null, shape, g, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        finite = finite and bool(result.ok)
        if step >= args.warmup:
            times.append(time.perf_counter() - t1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    counts = roles.parameter_counts()
    return {
        "arch": args.arch,
        "precision": args.precision,
        "batch": args.batch,
        "resolution": resolution,
        "tokens_or_latent": list(shape),
        "base_params": counts["base"],
        "student_params": counts["student"],
        "fake_params": counts["fake"],
        "build_s": round(build_s, 1),
        "ms": statistics.median(times) * 1e3,
        "peak_gib": peak / 2**30,
        "finite": finite,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="flux-tiny", choices=sorted(ARCHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: native)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    head = (
        f"| {args.arch} | {args.precision} | batch {args.batch} | "
        f"{args.resolution or ARCHS[args.arch][6]} px | ckpt {args.gradient_checkpointing} |"
    )
    print(f"# {name}, torch {torch.__version__}, {args.steps} timed after {args.warmup} warm-up")
    try:
        row = run(args)
    except torch.cuda.OutOfMemoryError as err:
        print(f"{head} out of memory: {str(err).splitlines()[0][:200]} |")
        return 3
    except Exception as err:  # noqa: BLE001 - a benchmark row, not a crash of the whole check
        print(f"{head} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]} |")
        return 1
    print(
        f"{head} {row['ms']:.0f} ms/iteration | peak {row['peak_gib']:.1f} GiB | base "
        f"{row['base_params'] / 1e9:.2f}B, student {row['student_params'] / 1e6:.0f}M, fake "
        f"{row['fake_params'] / 1e6:.0f}M | finite {row['finite']} | built in {row['build_s']} s |"
    )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
