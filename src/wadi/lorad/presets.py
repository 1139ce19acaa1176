"""The paper's layer choices (method.md section 2) as ready LoRaD configs.

| preset            | rank | layers                                                        |
|-------------------|------|---------------------------------------------------------------|
| sd-unet-student   | 256  | every nn.Linear under down_blocks, mid_block, up_blocks       |
| sd-unet-fake      | 32   | the same minus proj_in, proj_out, time_emb_proj               |
| sdxl-unet-student | 256  | every nn.Linear under down_blocks, mid_block, up_blocks       |
| sdxl-unet-fake    | 32   | the same minus proj_in, proj_out, time_emb_proj               |
| pixart-student    | 128  | every nn.Linear except those under adaln_single               |
| pixart-fake       | 32   | every nn.Linear under transformer_blocks                      |
| sd3-student       | 128  | every nn.Linear under transformer_blocks                      |
| sd3-fake          | 32   | every nn.Linear under transformer_blocks                      |
| flux-student      | 128  | every nn.Linear under (single_)transformer_blocks             |
| flux-fake         | 32   | every nn.Linear under (single_)transformer_blocks             |
"""

from __future__ import annotations

import dataclasses

from .config import LoRaDConfig

_UNET_BLOCKS = r"(down_blocks|mid_block|up_blocks)\..+"
_FLUX_BLOCKS = r"(transformer_blocks|single_transformer_blocks)\..+"

PRESETS: dict[str, LoRaDConfig] = {
    "sd-unet-student": LoRaDConfig(rank=256, target_modules=_UNET_BLOCKS),
    "sd-unet-fake": LoRaDConfig(
        rank=32,
        target_modules=_UNET_BLOCKS,
        exclude_modules=["proj_in", "proj_out", "time_emb_proj"],
    ),
    # SDXL: the SD1.5 choice on SDXL's U-Net (its add_embedding stays frozen, as time_embedding)
    "sdxl-unet-student": LoRaDConfig(rank=256, target_modules=_UNET_BLOCKS),
    "sdxl-unet-fake": LoRaDConfig(
        rank=32,
        target_modules=_UNET_BLOCKS,
        exclude_modules=["proj_in", "proj_out", "time_emb_proj"],
    ),
    "pixart-student": LoRaDConfig(
        rank=128, target_modules=None, exclude_modules=r"adaln_single\..+"
    ),
    "pixart-fake": LoRaDConfig(rank=32, target_modules=r"transformer_blocks\..+"),
    # SD3/SD3.5: PixArt's fake-score choice (the MMDiT blocks, both streams) at both ranks
    "sd3-student": LoRaDConfig(rank=128, target_modules=r"transformer_blocks\..+"),
    "sd3-fake": LoRaDConfig(rank=32, target_modules=r"transformer_blocks\..+"),
    # FLUX.1: the same on both block stacks (double-stream and single-stream)
    "flux-student": LoRaDConfig(rank=128, target_modules=_FLUX_BLOCKS),
    "flux-fake": LoRaDConfig(rank=32, target_modules=_FLUX_BLOCKS),
}


def preset(name: str, **overrides) -> LoRaDConfig:
    """A fresh copy of preset ``name``, with fields such as ``rank`` overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown LoRaD preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def preset_names() -> list[str]:
    return sorted(PRESETS)
