"""Stable Diffusion 1.x / 2.x U-Net teachers (eps or v-prediction), also pixel-space ones.

Prompts are encoded exactly as ``StableDiffusionPipeline.encode_prompt``
does: CLIP tokens padded to ``model_max_length``, no attention mask on the
U-Net side (the text encoder gets one only if its config asks for it).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .base import Backbone, TextCondition
from .loading import load_text_encoder

__all__ = ["SDUNetBackbone"]


class SDUNetBackbone(Backbone):
    kind = "sd-unet"
    student_preset = "sd-unet-student"
    fake_preset = "sd-unet-fake"
    denoiser_folder = "unet"
    denoiser_class = "UNet2DConditionModel"
    supported = "UNet2DConditionModel of SD 1.x/2.x, eps or v-prediction, latent or pixel space"

    @classmethod
    def accepts(cls, denoiser_config: dict) -> bool:
        return (
            denoiser_config.get("_class_name") == "UNet2DConditionModel"
            and denoiser_config.get("addition_embed_type") is None  # SDXL: "text_time"
            and denoiser_config.get("class_embed_type") is None
            and denoiser_config.get("time_cond_proj_dim") is None
            and denoiser_config.get("encoder_hid_dim") is None
        )

    @classmethod
    def _read_text_parts(cls, path: Path, dtype, device):
        return load_text_encoder(path, "CLIPTextModel", dtype, device)

    def _encode(self, prompts: list[str]) -> TextCondition:
        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        embeds = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return TextCondition(embeds)

    def _model_output(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        return self.denoiser(x_t, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def _pipeline_components(self, denoiser: nn.Module, scheduler):
        from diffusers import StableDiffusionPipeline

        text_encoder, tokenizer = self._load_text_parts()
        components = dict(
            vae=self.vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        return StableDiffusionPipeline, components
