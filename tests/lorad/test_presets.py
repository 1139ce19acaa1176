"""The presets reproduce the paper's trainable counts on the real architectures (meta device)."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from wadi.lorad import attach, count_adapter_parameters, lorad_layers, preset


def sd15():
    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8,
    )


def sd21():
    return UNet2DConditionModel(
        sample_size=96,
        cross_attention_dim=1024,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )


def pixart_xl2():
    return PixArtTransformer2DModel(
        sample_size=128,
        num_layers=28,
        attention_head_dim=72,
        num_attention_heads=16,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=1152,
        caption_channels=4096,
        norm_type="ada_norm_single",
        use_additional_conditions=True,
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


@pytest.mark.parametrize(
    "build, student, fake, n_student, base_total",
    [
        (sd15, 83.80, 9.38, 182, 859.52),
        (sd21, 94.43, 9.51, 214, 865.91),
        (pixart_xl2, 81.22, 20.13, None, None),
    ],
)
def test_paper_trainable_counts(build, student, fake, n_student, base_total):
    with torch.device("meta"):
        model = build()
    total = sum(p.numel() for p in model.parameters())
    family = "pixart" if isinstance(model, PixArtTransformer2DModel) else "sd-unet"
    attach(model, preset(f"{family}-student"), "student")
    attach(model, preset(f"{family}-fake"), "fake")
    assert round(count_adapter_parameters(model, "student") / 1e6, 2) == student
    assert round(count_adapter_parameters(model, "fake") / 1e6, 2) == fake
    if n_student is not None:
        assert sum("student" in layer.lorad_A for _, layer in lorad_layers(model)) == n_student
        assert round(total / 1e6, 2) == base_total
    if build is sd15:  # the paper: 9.74 % of the U-Net
        share = 100 * count_adapter_parameters(model, "student") / total
        assert share == pytest.approx(9.74, abs=0.02)


def test_unknown_preset():
    with pytest.raises(KeyError, match="choose one of"):
        preset("sdxl-student")
