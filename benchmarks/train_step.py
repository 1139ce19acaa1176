"""Time and peak memory of one WaDi iteration: wadi vs the published approach, same config.

  wadi       one frozen U-Net; student and fake score are LoRaD adapters on it
             (custom autograd Function); teacher = adapters off
  published  three U-Net copies (teacher, fake, student); LoRaD as forward hooks
             that discard the layer's own matmul and build the rotated weight
             with autograd (re-created here; see method.md section 7)

Both run the same iteration code (wadi.distill.iteration.WaDiIteration), same
loss, same batch, same seeds.  Each variant runs in its own process so peak
memory is its own (CUDA: max_memory_allocated; CPU: peak RSS).

    python benchmarks/train_step.py                      # CPU, small U-Net
    python benchmarks/train_step.py --arch sd15 --device cuda --precision fp16 --batch 2 --resolution 512
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from published_lorad import add_hook_lorad

ARCHS = {
    # block_out_channels, cross_attention_dim, attention_head_dim, layers_per_block
    "small": dict(block_out_channels=(64, 128, 128, 128), cross_attention_dim=128, attention_head_dim=8,
                  layers_per_block=1, norm_num_groups=32),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
}  # fmt: skip


def build_backbone(arch: str, device, dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from wadi.backbones.sd import SDUNetBackbone

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, **ARCHS[arch]).to(dtype)
    unet.requires_grad_(False)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    backbone = SDUNetBackbone(
        denoiser=unet, scheduler=scheduler, text_encoder=None, tokenizer=None, vae=None
    )
    return backbone


def hook_adapters(model: nn.Module, preset_name: str) -> list[nn.Parameter]:
    from wadi.lorad import preset

    config = preset(preset_name)
    params = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and config.matches(name):
            params += add_hook_lorad(module, config.rank)
    return params


class PublishedRoles:
    """Three copies of the U-Net, swapped into the backbone per role."""

    adapter = "published"

    def __init__(self, backbone):
        self.backbone = backbone
        self.teacher_model = backbone.denoiser
        self.fake_model = copy.deepcopy(self.teacher_model)
        self.student_model = copy.deepcopy(self.teacher_model)
        self._fake = hook_adapters(self.fake_model, "sd-unet-fake")
        self._student = hook_adapters(self.student_model, "sd-unet-student")

    def student_parameters(self):
        return self._student

    def fake_parameters(self):
        return self._fake

    def _use(self, model):
        @contextlib_contextmanager
        def ctx():
            self.backbone.denoiser = model
            try:
                yield model
            finally:
                self.backbone.denoiser = self.teacher_model

        return ctx

    def teacher(self):
        return self._use(self.teacher_model)()

    def fake(self):
        return self._use(self.fake_model)()

    def student(self):
        return self._use(self.student_model)()


def contextlib_contextmanager(fn):
    import contextlib

    return contextlib.contextmanager(fn)


def _current_rss() -> int:
    """Resident memory now (bytes): the baseline subtracted from the CPU peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(args) -> dict:
    from wadi.backbones.base import TextCondition
    from wadi.distill import DistillConfig, Roles
    from wadi.distill.iteration import WaDiIteration
    from wadi.distill.objectives import VSD
    from wadi.distill.optim import OptimizerStep
    from wadi.generators import OneStep

    device = torch.device(args.device)
    start_rss = _current_rss()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    backbone = build_backbone(args.arch, device, dtype)
    if args.variant == "wadi":
        roles = Roles(backbone, "lorad")
    else:
        roles = PublishedRoles(backbone)
    if args.gradient_checkpointing:
        for m in {
            id(x): x for x in (backbone.denoiser, getattr(roles, "student_model", None))
        }.values():
            if m is not None:
                m.enable_gradient_checkpointing()
                m.train()
    config = DistillConfig(
        teacher="bench", batch_size=args.batch, resolution=args.resolution,
        mixed_precision="no" if args.precision == "fp32" else args.precision, progress=False,
    )  # fmt: skip
    optimizers = {
        "student": OptimizerStep(
            "student", roles.student_parameters(), config.lr_student, config, device
        ),
        "fake": OptimizerStep("fake", roles.fake_parameters(), config.lr_fake, config, device),
    }
    latent = args.resolution // 8
    shape = (args.batch, 4, latent, latent)
    g = torch.Generator(device).manual_seed(0)
    cross = ARCHS[args.arch]["cross_attention_dim"]
    cond = TextCondition(torch.randn(args.batch, 77, cross, device=device))
    null = TextCondition(torch.randn(1, 77, cross, device=device))
    autocast = functools.partial(
        torch.autocast, device.type, dtype=dtype, enabled=args.precision != "fp32"
    )
    trainable = sum(p.numel() for p in roles.student_parameters()) + sum(
        p.numel() for p in roles.fake_parameters()
    )

    iteration = WaDiIteration(
        backbone, roles, VSD(), OneStep(999, 0.0047), config, autocast, optimizers
    )

    def one(step):
        iteration(cond, null, shape, g, step)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        one(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    return {
        "variant": args.variant,
        "ms": statistics.median(times) * 1e3,
        "peak": peak,
        "trainable": trainable,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="small", choices=sorted(ARCHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--resolution", type=int, default=128, help="pixels (latent = resolution / 8)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each variant")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variant", choices=["wadi", "published"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine()
    )
    print(f"# device {args.device} ({name}), torch {torch.__version__}, arch {args.arch}, {args.precision}, "
          f"batch {args.batch}, {args.resolution}px, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.rounds} alternating rounds, gradient checkpointing {args.gradient_checkpointing}")  # fmt: skip
    results = {"wadi": [], "published": []}
    for _ in range(args.rounds):
        for variant in ("published", "wadi"):
            cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{variant} failed:\n{out.stderr[-2000:]}")
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {
        v: {
            "ms": statistics.median(r["ms"] for r in rs),
            "peak": max(r["peak"] for r in rs),
            "trainable": rs[0]["trainable"],
        }
        for v, rs in results.items()
    }
    peak_kind = "peak GPU MiB" if args.device == "cuda" else "peak RSS above start MiB"
    print(f"| variant | ms / iteration | {peak_kind} | trainable (student + fake) |")
    print("|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['ms']:.1f} | {r['peak'] / 2**20:.0f} | {r['trainable']:,} |")
    w, p = rows["wadi"], rows["published"]
    print(f"wadi / published: time {w['ms'] / p['ms']:.3f}x (target <= 0.75), "
          f"peak memory {w['peak'] / p['peak']:.3f}x (target <= 0.6)")  # fmt: skip


if __name__ == "__main__":
    main()
