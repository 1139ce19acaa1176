"""What DMD2's GAN term adds per step, next to the fake-score forward it is compared with.

Timed side by side in one process, interleaved, median of ``--repeats``:

  fake_forward        fake score eps(x_t), no grad (what the generator step already runs)
  fake_train          fake-score loss forward + backward (the fake step, without GAN)
  gan_generator       GAN generator loss forward + backward into x_t (stops at the bottleneck)
  gan_generator_full  the same with the whole denoiser run (what stopping saves)
  gan_discriminator   classifier loss forward + backward, real and fake batches together

    python benchmarks/gan_cost.py                     # tiny SD teacher, CPU
    python benchmarks/gan_cost.py --arch small --resolution 32   # a 4-level U-Net, pixel space
    python benchmarks/gan_cost.py --teacher PATH --device cuda --batch 4 --resolution 512
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def small_backbone(device, dtype):
    """A random 4-level SD-like U-Net without VAE or text encoder (``train_step.py``'s small)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from wadi.backbones import SDUNetBackbone

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128, 128, 128), cross_attention_dim=128,
        attention_head_dim=8, layers_per_block=1, norm_num_groups=32,
    ).to(device).requires_grad_(False)  # fmt: skip
    if dtype != torch.float32:
        unet.to(dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return SDUNetBackbone(
        denoiser=unet, scheduler=scheduler, text_encoder=None, tokenizer=None, vae=None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="pipeline folder (default: tiny SD)")
    parser.add_argument(
        "--arch", default="tiny", choices=["tiny", "small"],
        help="without --teacher: tiny SD (make_tiny_sd) or a random 4-level U-Net (64-128 wide)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from wadi.backbones import load_backbone
    from wadi.distill.gan import GANTerm, capture_bottleneck, generator_gan_loss
    from wadi.distill.losses import add_noise, fake_score_loss
    from wadi.distill.roles import Roles
    from wadi.testing import make_tiny_sd

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    if args.teacher is None and args.arch == "small":
        backbone = small_backbone(device, dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            teacher = args.teacher or make_tiny_sd(f"{tmp}/sd")
            backbone = load_backbone(teacher, dtype=dtype, device=device)
    roles = Roles(backbone)
    roles.train()
    term = GANTerm.for_backbone(backbone)
    fake_params = roles.fake_parameters() + term.parameters()

    torch.manual_seed(0)
    b, side = args.batch, backbone.latent_size(args.resolution)
    shape = (b, backbone.latent_channels, side, side)
    if backbone.text_encoder is None:
        from wadi.backbones import TextCondition

        width = backbone.denoiser.config.cross_attention_dim
        cond = TextCondition(torch.randn(b, 77, width, device=device, dtype=dtype))
    else:
        cond = backbone.encode_prompts(["a photo of a cat"] * b).to(device=device, dtype=dtype)
    t = torch.randint(20, 980, (b,), device=device)
    alpha_bar = backbone.alphas_cumprod().to(device)[t]
    x0 = torch.randn(shape, device=device, dtype=dtype)
    eps = torch.randn_like(x0)
    x_t = add_noise(x0, eps, alpha_bar)

    def clear():
        for p in fake_params:
            p.grad = None

    def fake_forward():
        with torch.no_grad(), roles.fake():
            backbone.predict_eps(x_t, t, cond)

    def fake_train():
        clear()
        with roles.fake():
            fake_score_loss(backbone.predict_eps(x_t, t, cond), eps, alpha_bar).backward()

    def gan_generator():
        clear()
        x = x_t.detach().requires_grad_(True)
        with roles.fake():
            term.generator_loss(backbone, x, t, cond, roles.fake).backward()

    def gan_generator_full():
        clear()
        x = x_t.detach().requires_grad_(True)
        with roles.fake():
            with capture_bottleneck(backbone.denoiser) as cap:
                backbone.predict(x, t, cond)
            (term.weight * generator_gan_loss(term.head(cap.features))).backward()

    def gan_discriminator():
        clear()
        with roles.fake():
            term.discriminator_loss(backbone, x_t, x_t.flip(0), t, cond, roles.fake).backward()

    variants = {
        "fake_forward": fake_forward,
        "fake_train": fake_train,
        "gan_generator": gan_generator,
        "gan_generator_full": gan_generator_full,
        "gan_discriminator": gan_discriminator,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    median = {name: statistics.median(v) for name, v in times.items()}
    base = median["fake_forward"]
    result = {
        "teacher": args.teacher
        or {"tiny": "tiny SD (make_tiny_sd)", "small": "small U-Net"}[args.arch],
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.machine()})",
        "threads": args.threads,
        "dtype": args.dtype,
        "batch": b,
        "latent": list(shape[1:]),
        "repeats": args.repeats,
        "median_ms": {k: round(v * 1e3, 3) for k, v in median.items()},
        "ratio_to_fake_forward": {k: round(v / base, 2) for k, v in median.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
