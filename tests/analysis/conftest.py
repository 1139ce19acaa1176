"""Tiny diffusers U-Nets on disk, built from a config (nothing downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "unet"
    tiny_unet(0).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, teacher_dir):
    """The teacher with every Linear/Conv2d weight nudged: a small rotation and a smaller rescale."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(teacher_dir).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                w = module.weight
                noise = torch.randn(w.shape, generator=gen) * w.abs().mean() * 0.05
                scale = 1 + 0.002 * torch.randn((w.shape[0],) + (1,) * (w.ndim - 1), generator=gen)
                w.copy_((w + noise) * scale)
    path = tmp_path_factory.mktemp("student") / "unet"
    model.save_pretrained(path, safe_serialization=True)
    return path
