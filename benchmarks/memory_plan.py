"""The --dry-run memory plan for the real architectures (built on the meta device).

Prints, per backbone, GiB per process for the resident parts (frozen base in bf16,
adapters and their fp32 gradients and AdamW moments; no EMA, no activations) at 1 and 8
processes, the 8-process column with the frozen denoiser sharded by ``--fsdp`` (FSDP2's
padded shards; the adapters stay whole), and the largest block gathered while it runs.
Architectures from their published config.json files; text encoders and
VAEs built from their configs on the meta device too.

    python benchmarks/memory_plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "backbones"))


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def text_and_vae():
    """Parameter counts of the public text encoders and VAEs, from their configs."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    with torch.device("meta"):
        clip_l = _count(
            CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    intermediate_size=3072,
                    projection_dim=768,
                )
            )
        )
        clip_g = _count(
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=1280,
                    num_hidden_layers=32,
                    num_attention_heads=20,
                    intermediate_size=5120,
                    projection_dim=1280,
                    hidden_act="gelu",
                )
            )
        )
        t5 = _count(
            T5EncoderModel(
                T5Config(
                    d_model=4096,
                    d_ff=10240,
                    num_layers=24,
                    num_heads=64,
                    d_kv=64,
                    vocab_size=32128,
                    feed_forward_proj="gated-gelu",
                )
            )
        )
        blocks = dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        vae4 = _count(AutoencoderKL(latent_channels=4, **blocks))
        vae16 = _count(AutoencoderKL(latent_channels=16, **blocks))
    return {"clip_l": clip_l, "clip_g": clip_g, "t5": t5, "vae4": vae4, "vae16": vae16}  # fmt: skip


def main() -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from test_flux import FLUX_DEV
    from test_sd3 import SD3_MEDIUM, SD35_LARGE
    from test_sdxl import SDXL_BASE_UNET

    from wadi.backbones.flux import FluxBackbone
    from wadi.backbones.sd import SDUNetBackbone
    from wadi.backbones.sd3 import SD3Backbone
    from wadi.backbones.sdxl import SDXLBackbone
    from wadi.distill import DistillConfig
    from wadi.distill.plan import plan_for_denoiser

    parts = text_and_vae()
    sd15 = dict(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280))
    archs = [
        ("SD1.5", SDUNetBackbone, lambda: UNet2DConditionModel(**sd15), "clip_l", "vae4"),
        ("SDXL base 1.0", SDXLBackbone, lambda: UNet2DConditionModel(**SDXL_BASE_UNET),
         ("clip_l", "clip_g"), "vae4"),
        ("SD3-medium", SD3Backbone, lambda: SD3Transformer2DModel(**SD3_MEDIUM),
         ("clip_l", "clip_g", "t5"), "vae16"),
        ("SD3.5-large", SD3Backbone, lambda: SD3Transformer2DModel(**SD35_LARGE),
         ("clip_l", "clip_g", "t5"), "vae16"),
        ("FLUX.1-dev", FluxBackbone, lambda: FluxTransformer2DModel(**FLUX_DEV),
         ("clip_l", "t5"), "vae16"),
    ]  # fmt: skip
    config = DistillConfig(teacher="plan", mixed_precision="bf16")
    gib = 1024**3
    print(
        "| backbone | base params | student / fake trained | base GiB (bf16) | "
        "adapters+grads+AdamW GiB | total GiB, 1 process | 8 processes, --fsdp | "
        "+ largest block gathered |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, cls, build, text, vae in archs:
        with torch.device("meta"):
            denoiser = build()
        text = (text,) if isinstance(text, str) else text
        plan = plan_for_denoiser(
            denoiser, cls, config,
            text_encoder_params=sum(parts[t] for t in text), vae_params=parts[vae],
        )  # fmt: skip
        base = plan.denoiser + plan.text_encoders + plan.vae
        trained = plan.student + plan.fake + plan.gradients + plan.optimizer
        print(
            f"| {name} | {plan.base_params / 1e9:.2f}B | {plan.student_params / 1e6:.1f}M / "
            f"{plan.fake_params / 1e6:.1f}M | {base / gib:.2f} | {trained / gib:.2f} | "
            f"{plan.total() / gib:.2f} | {plan.total(8) / gib:.2f} | "
            f"{plan.largest_block / gib:.2f} |"
        )


if __name__ == "__main__":
    main()
