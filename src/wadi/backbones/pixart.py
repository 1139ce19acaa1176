"""PixArt-alpha DiT teachers: T5 text with an attention mask, learned-sigma output.

Prompts are encoded exactly as ``PixArtAlphaPipeline.encode_prompt`` does
(T5 tokens padded to 120, attention mask kept and passed to the DiT), without
caption cleaning (pass ``clean_caption=False`` to the stock pipeline; it is
off anyway when bs4/ftfy are not installed).  The transformer predicts eps
and a variance: the variance half is dropped.  Resolution and aspect-ratio
conditioning is added when the model has it (the 1024 px model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, TextCondition
from .loading import load_text_encoder

__all__ = ["PixArtBackbone", "PIXART_MAX_TOKENS", "upcast_output_head"]

#: the stock pipeline's ``max_sequence_length``
PIXART_MAX_TOKENS = 120


def _to_float32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def upcast_output_head(transformer: nn.Module) -> nn.Module:
    """Run a 16-bit PixArt's final norm and ``proj_out`` in float32 (in place).

    The one-step x0 multiplies eps's error by ``1/sqrt(abar_T) = 157``; a bf16
    output layer rounds eps to 8 significant bits.  The final LayerNorm gets its input
    in fp32 and ``proj_out`` is kept in fp32 (LoRaD and merge work on it as on any
    Linear), so eps leaves the network in fp32.  Measured in
    ``benchmarks/pixart_bf16_x0.py``.
    """
    if transformer.proj_out.weight.dtype == torch.float32:
        return transformer
    transformer.proj_out.float()
    if not getattr(transformer.norm_out, "_wadi_fp32", False):
        transformer.norm_out.register_forward_pre_hook(_to_float32)
        transformer.norm_out._wadi_fp32 = True
    return transformer


class PixArtBackbone(Backbone):
    kind = "pixart"
    student_preset = "pixart-student"
    fake_preset = "pixart-fake"
    denoiser_folder = "transformer"
    denoiser_class = "PixArtTransformer2DModel"
    supported = "PixArtTransformer2DModel of PixArt-alpha"
    t5_note = "PixArt's only text encoder is its T5"
    max_tokens = PIXART_MAX_TOKENS

    def __init__(self, **parts) -> None:
        super().__init__(**parts)
        if self.dtype in (torch.float16, torch.bfloat16):
            upcast_output_head(self.denoiser)  # eps leaves the DiT in fp32 (see the function)

    @classmethod
    def accepts(cls, denoiser_config: dict) -> bool:
        return denoiser_config.get("_class_name") == "PixArtTransformer2DModel"

    @classmethod
    def _read_text_parts(cls, path: Path, dtype, device):
        return load_text_encoder(path, "T5EncoderModel", dtype, device)

    @property
    def learned_sigma(self) -> bool:
        return int(self.denoiser.config.out_channels) == 2 * self.latent_channels

    def _encode(self, prompts: list[str]) -> TextCondition:
        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        embeds = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return TextCondition(embeds, mask)

    def _added_conditions(self, x_t: Tensor) -> dict:
        if not getattr(self.denoiser, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        batch, _, h, w = x_t.shape
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        resolution = torch.tensor([height, width]).repeat(batch, 1)
        aspect_ratio = torch.tensor([float(height / width)]).repeat(batch, 1)
        return {
            "resolution": resolution.to(device=x_t.device, dtype=x_t.dtype),
            "aspect_ratio": aspect_ratio.to(device=x_t.device, dtype=x_t.dtype),
        }

    def _model_output(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        out = self.denoiser(
            x_t,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            timestep=t,
            added_cond_kwargs=self._added_conditions(x_t),
            return_dict=False,
        )[0]
        if self.learned_sigma:
            out = out[:, : self.latent_channels]
        return out

    def _pipeline_components(self, denoiser: nn.Module, scheduler):
        from diffusers import PixArtAlphaPipeline

        if self.vae is None:
            raise ValueError(
                "a pixel-space PixArt teacher cannot be exported as a PixArtAlphaPipeline"
            )
        text_encoder, tokenizer = self._load_text_parts()
        components = dict(
            vae=self.vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=denoiser,
            scheduler=scheduler,
        )
        return PixArtAlphaPipeline, components
