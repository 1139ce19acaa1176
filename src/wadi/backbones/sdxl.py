"""Stable Diffusion XL U-Net teachers (``StableDiffusionXLPipeline`` layout), eps or v-prediction.

Prompts are encoded exactly as ``StableDiffusionXLPipeline.encode_prompt`` does:
each prompt goes through both CLIP encoders (tokens padded to each tokenizer's
``model_max_length``), the penultimate hidden states of the two are joined along
the feature axis (768 + 1280 = 2048 for SDXL base) and the pooled, projected
output of ``text_encoder_2`` is ``cond.pooled``.  The U-Net's micro-conditioning
``add_time_ids`` (original size, crop top-left (0, 0), target size) goes in
``cond.extras["time_ids"]``, for a square image of :attr:`SDXLBackbone.resolution`
pixels (the stock pipeline's default: ``sample_size`` x VAE factor = 1024).

The null condition.  With ``force_zeros_for_empty_prompt`` (SDXL base's
``model_index.json`` sets it; the pipeline's default is on) the stock pipeline
guides against ALL-ZERO prompt and pooled embeddings when no negative prompt is
given, and SDXL was trained with zeroed text for its unconditional dropout.  So
wadi's null condition, ``encode_prompts([""])``, is zeros too when the flag is on:
every prompt that is exactly ``""`` is encoded as zeros (time ids unchanged), and
wadi's CFG is the stock pipeline's ``pipe(prompt, guidance_scale=s)``.  With the
flag off, ``""`` goes through the encoders like any prompt (the stock negative).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, TextCondition
from .loading import load_scheduler, load_text_encoder, load_vae, read_json

__all__ = ["SDXLBackbone"]

_TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _native_resolution(unet: nn.Module, factor: int) -> int:
    size = unet.config.sample_size
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) * factor


class SDXLBackbone(Backbone):
    kind = "sdxl"
    student_preset = "sdxl-unet-student"
    fake_preset = "sdxl-unet-fake"
    denoiser_folder = "unet"
    denoiser_class = "UNet2DConditionModel"
    supported = "UNet2DConditionModel of SDXL (text_time conditioning), eps or v-prediction"

    def __init__(
        self,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
        **parts,
    ) -> None:
        super().__init__(**parts)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        #: image side the time ids of :meth:`encode_prompts` describe (default: native size)
        self.resolution = _native_resolution(self.denoiser, self.vae_scale_factor)

    # ---- detection and loading ----
    @classmethod
    def accepts(cls, denoiser_config: dict) -> bool:
        # the two sizes of the added embedding are set in every real SDXL config; a config
        # with "text_time" and without them cannot even be built
        return (
            denoiser_config.get("_class_name") == "UNet2DConditionModel"
            and denoiser_config.get("addition_embed_type") == "text_time"
            and denoiser_config.get("addition_time_embed_dim") is not None
            and denoiser_config.get("projection_class_embeddings_input_dim") is not None
        )

    @classmethod
    def from_folder(
        cls, path: Path, *, dtype: torch.dtype, device, load_text_encoder: bool
    ) -> SDXLBackbone:
        """As :meth:`Backbone.from_folder`, plus ``text_encoder_2``/``tokenizer_2`` and the
        pipeline's ``force_zeros_for_empty_prompt`` (from ``model_index.json``)."""
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        text = dict.fromkeys(_TEXT_PARTS)
        if load_text_encoder:
            text = dict(zip(_TEXT_PARTS, cls._read_text_parts(path, dtype, device)))
            text["text_encoder_2"].requires_grad_(False).eval()
        backbone = cls(
            denoiser=unet.to(device),
            scheduler=load_scheduler(path),
            vae=load_vae(path, dtype, device),
            path=path,
            force_zeros_for_empty_prompt=cls._force_zeros(path),
            **text,
        )
        if backbone.text_encoder_2 is not None:
            backbone._check_added_embedding()
        return backbone

    @staticmethod
    def _force_zeros(path: Path) -> bool:
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return True  # the stock pipeline's default
        return bool(read_json(index).get("force_zeros_for_empty_prompt", True))

    @classmethod
    def _read_text_parts(cls, path: Path, dtype, device):
        """``(text_encoder, tokenizer, text_encoder_2, tokenizer_2)`` from ``path``."""

        path = Path(path)
        needed = [
            "text_encoder/config.json",
            "tokenizer",
            "text_encoder_2/config.json",
            "tokenizer_2",
        ]
        missing = [n for n in needed if not (path / n).exists()]
        if missing:
            raise ValueError(
                f"SDXL teacher {path} is incomplete: {', '.join(missing)} missing; SDXL needs "
                "both text encoders and tokenizers (give the whole StableDiffusionXLPipeline "
                "folder)"
            )
        parts = []
        for folder, default in (
            ("text_encoder", "CLIPTextModel"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
        ):
            parts += load_text_encoder(path, default, dtype, device, folder=folder)
        return tuple(parts)

    def _load_text_parts(self):
        """All four text parts, from memory or (export without text encoders) from ``path``."""
        parts = (self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2)
        if all(p is not None for p in parts):
            return parts
        if self.path is None:
            raise ValueError(
                "the backbone has no text encoders and no source folder to load them from"
            )
        return self._read_text_parts(self.path, self.dtype, "cpu")

    def _check_added_embedding(self) -> None:
        """The U-Net's added embedding must take 6 time ids plus ``text_encoder_2``'s pooled width
        (the check ``StableDiffusionXLPipeline._get_add_time_ids`` makes)."""
        config = self.denoiser.config
        passed = 6 * int(config.addition_time_embed_dim) + int(
            self.text_encoder_2.config.projection_dim
        )
        expected = self.denoiser.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"SDXL U-Net expects an added embedding of {expected} but 6 time ids x "
                f"{config.addition_time_embed_dim} + text_encoder_2 projection_dim "
                f"{self.text_encoder_2.config.projection_dim} = {passed}; the teacher's "
                "configs do not match"
            )

    # ---- text ----
    def time_ids(self, batch: int, height: int | None = None, width: int | None = None) -> Tensor:
        """``add_time_ids`` ``(batch, 6)`` float32: original size, crop (0, 0), target size,
        all ``(height, width)`` (default: :attr:`resolution`), as the stock pipeline's default."""
        height = self.resolution if height is None else int(height)
        width = height if width is None else int(width)
        row = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return row.repeat(batch, 1)

    def _encode(self, prompts: list[str]) -> TextCondition:
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("this SDXL backbone has no text_encoder_2/tokenizer_2 to encode with")
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            device = next(encoder.parameters()).device
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            out = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output of encoder 2
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError(
                "text_encoder_2 returned no pooled embedding; SDXL needs a "
                "CLIPTextModelWithProjection there"
            )
        embeds = torch.cat([h.to(hidden[-1]) for h in hidden], dim=-1)
        pooled = pooled.to(embeds.device)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            if bool(empty.any()):
                embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = self.time_ids(len(prompts)).to(embeds.device)
        return TextCondition(embeds, pooled=pooled, extras={"time_ids": time_ids})

    # ---- denoiser ----
    def _model_output(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        if cond.pooled is None or "time_ids" not in cond.extras:
            raise ValueError(
                "SDXL needs pooled text embeddings and time_ids in the condition; encode the "
                "prompts with this backbone (precomputed embeddings without them cannot "
                "condition SDXL)"
            )
        size = (x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor)
        if size != (self.resolution, self.resolution):
            raise ValueError(
                f"SDXL latents of {size[0]}x{size[1]} px but the backbone's resolution (the "
                f"time ids' image size) is {self.resolution}; set backbone.resolution = "
                f"{size[0]} before encoding prompts"
            )
        added = {"text_embeds": cond.pooled, "time_ids": cond.extras["time_ids"]}
        return self.denoiser(
            x_t,
            t,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    # ---- images ----
    def decode(self, latents: Tensor) -> Tensor:
        """As :meth:`Backbone.decode`; an fp16 VAE with ``force_upcast`` (SDXL's overflows in
        fp16) decodes in fp32, as the stock pipeline does, and is put back in fp16 after."""
        vae = self.vae
        if vae is None or not getattr(vae.config, "force_upcast", False):
            return super().decode(latents)
        if next(vae.parameters()).dtype != torch.float16:
            return super().decode(latents)
        vae.float()  # float()/half(), not to(dtype): diffusers warns on every to(dtype)
        try:
            return super().decode(latents)
        finally:
            vae.half()

    # ---- export ----
    def _pipeline_components(self, denoiser: nn.Module, scheduler):
        from diffusers import StableDiffusionXLPipeline

        if self.vae is None:
            raise ValueError("an SDXL teacher without vae/ cannot be exported as a pipeline")
        text_encoder, tokenizer, text_encoder_2, tokenizer_2 = self._load_text_parts()
        components = dict(
            vae=self.vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=denoiser,
            scheduler=scheduler,
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        return StableDiffusionXLPipeline, components
