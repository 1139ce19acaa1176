"""Tiny diffusers denoisers built from configs (offline, 8 px latents)."""

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel


def tiny_unet(linear_projection=True, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=linear_projection,
    ).eval()


def tiny_pixart(seed=0):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=8,
        caption_channels=12,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()


def unet_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500])[:batch],
        encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
    )


def pixart_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500])[:batch],
        encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def randomize_adapter(model, name, scale=0.3, seed=0):
    """Give an adapter non-zero angles (A is zero at init)."""
    from wadi.lorad import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name)[0::2]:
            p.copy_(torch.randn(p.shape, generator=g) * scale)
