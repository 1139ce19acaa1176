"""Stable Diffusion 3 / 3.5 MMDiT teachers (``StableDiffusion3Pipeline`` layout), flow matching.

Prompts are encoded exactly as ``StableDiffusion3Pipeline.encode_prompt`` does: both
CLIP encoders (tokens padded to the first tokenizer's ``model_max_length``) give their
penultimate hidden states, joined along the feature axis and zero-padded to the
transformer's ``joint_attention_dim``; the T5 embeddings (``max_sequence_length`` 256
tokens) follow along the token axis.  ``cond.pooled`` is the two CLIP projections
joined (768 + 1280 = 2048 for SD3).  There is no attention mask (the MMDiT attends to
every token, padding included, as in the stock pipeline).

T5 is optional, as in the stock pipeline: a folder without ``text_encoder_3`` (or
``SD3Backbone.load_t5 = False`` before loading, which keeps the 4.7B-parameter T5 off
the device) encodes the T5 part as zeros of ``(B, 256, joint_attention_dim)``, which is
what ``StableDiffusion3Pipeline`` does when ``text_encoder_3`` is ``None``; the export
then writes a pipeline without it.

The null condition is ``encode_prompts([""])``, the stock negative prompt, and wadi's
CFG (on eps, an affine map of the velocity) equals the stock velocity CFG.  The
transformer predicts the velocity ``v = eps - x0`` of the shifted flow-matching path
(:class:`~wadi.backbones.parametrization.FlowMatchingParametrization`, shift 3.0) and
takes ``sigma * 1000`` as its timestep.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, TextCondition
from .loading import load_scheduler, load_text_encoder, load_vae

__all__ = ["SD3Backbone", "SD3_MAX_T5_TOKENS"]

#: the stock pipeline's ``max_sequence_length``
SD3_MAX_T5_TOKENS = 256

_CLIP_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class SD3Backbone(Backbone):
    kind = "sd3"
    student_preset = "sd3-student"
    fake_preset = "sd3-fake"
    denoiser_folder = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    supported = "SD3Transformer2DModel of SD3/SD3.5 (flow matching)"
    max_sequence_length = SD3_MAX_T5_TOKENS
    #: load text_encoder_3 (T5) when the folder has it; False encodes the T5 part as zeros
    #: (per instance: ``load_backbone(path, t5=False)``, wadi distill --no-t5)
    load_t5 = True
    optional_t5 = True

    def __init__(
        self,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3=None,
        **parts,
    ) -> None:
        super().__init__(**parts)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer_3 = tokenizer_3

    # ---- detection and loading ----
    @classmethod
    def accepts(cls, denoiser_config: dict) -> bool:
        return denoiser_config.get("_class_name") == "SD3Transformer2DModel"

    @classmethod
    def from_folder(
        cls,
        path: Path,
        *,
        dtype: torch.dtype,
        device,
        load_text_encoder: bool,
        t5: bool | None = None,
    ) -> SD3Backbone:
        """As :meth:`Backbone.from_folder`, plus the second CLIP and (optionally) T5.

        ``t5=False`` (default: :attr:`load_t5`) leaves T5 out here and in exports, as
        ``StableDiffusion3Pipeline(text_encoder_3=None, tokenizer_3=None)`` does."""
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype
        )
        t5 = cls.load_t5 if t5 is None else bool(t5)
        text: dict = dict.fromkeys((*_CLIP_PARTS, "text_encoder_3", "tokenizer_3"))
        if load_text_encoder:
            text.update(cls._read_text_parts(path, dtype, device, t5=t5))
            for name in ("text_encoder_2", "text_encoder_3"):
                if text[name] is not None:
                    text[name].requires_grad_(False).eval()
        backbone = cls(
            denoiser=transformer.to(device),
            scheduler=load_scheduler(path),
            vae=load_vae(path, dtype, device),
            path=path,
            **text,
        )
        backbone.load_t5 = t5  # an export without text encoders in memory reads the same
        return backbone

    @staticmethod
    def has_t5(path: Path) -> bool:
        return (Path(path) / "text_encoder_3" / "config.json").is_file()

    @classmethod
    def _read_text_parts(cls, path: Path, dtype, device, t5: bool = True) -> dict:
        """The text parts of ``path`` by name; T5's are ``None`` without ``text_encoder_3``."""

        path = Path(path)
        needed = [
            "text_encoder/config.json",
            "tokenizer",
            "text_encoder_2/config.json",
            "tokenizer_2",
        ]
        if t5 and (path / "text_encoder_3").exists():  # present: then it must be whole
            needed += ["text_encoder_3/config.json", "tokenizer_3"]
        missing = [n for n in needed if not (path / n).exists()]
        if missing:
            raise ValueError(
                f"SD3 teacher {path} is incomplete: {', '.join(missing)} missing; SD3 needs both "
                "CLIP text encoders and tokenizers (T5 is optional: give the whole "
                "StableDiffusion3Pipeline folder)"
            )
        parts: dict = {"text_encoder_3": None, "tokenizer_3": None}
        folders = [(f, "CLIPTextModelWithProjection") for f in ("text_encoder", "text_encoder_2")]
        if t5 and cls.has_t5(path):
            folders.append(("text_encoder_3", "T5EncoderModel"))
        for folder, default in folders:
            tokenizer = folder.replace("text_encoder", "tokenizer")
            parts[folder], parts[tokenizer] = load_text_encoder(
                path, default, dtype, device, folder=folder
            )
        return parts

    def _text_parts(self) -> dict:
        """All text parts, from memory or (export without text encoders) from ``path``."""
        names = (*_CLIP_PARTS, "text_encoder_3", "tokenizer_3")
        parts = {n: getattr(self, n) for n in names}
        if all(parts[n] is not None for n in _CLIP_PARTS):
            return parts
        if self.path is None:
            raise ValueError(
                "the backbone has no text encoders and no source folder to load them from"
            )
        return self._read_text_parts(self.path, self.dtype, "cpu", t5=self.load_t5)

    # ---- shapes ----
    def latent_size(self, resolution: int) -> int:
        """As :meth:`Backbone.latent_size`; the latent side must also tile the patches."""
        patch = int(self.denoiser.config.patch_size)
        factor = patch * self.vae_scale_factor
        if resolution <= 0 or resolution % factor:
            raise ValueError(
                f"SD3 resolution {resolution} must be a positive multiple of {factor} (VAE "
                f"factor {self.vae_scale_factor} x the transformer's patch size {patch})"
            )
        return resolution // self.vae_scale_factor

    # ---- text ----
    def _encode(self, prompts: list[str]) -> TextCondition:
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("this SD3 backbone has no text_encoder_2/tokenizer_2 to encode with")
        hidden, pooled = [], []
        max_length = self.tokenizer.model_max_length  # the stock pipeline's, for both CLIPs
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            device = next(encoder.parameters()).device
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            )
            out = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            if out[0].ndim != 2:
                raise ValueError(
                    "SD3's CLIP text encoders must return projected pooled embeddings "
                    "(CLIPTextModelWithProjection)"
                )
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        dtype = next(self.text_encoder.parameters()).dtype
        device = hidden[0].device
        clip = torch.cat([h.to(device=device, dtype=dtype) for h in hidden], dim=-1)
        t5 = self._encode_t5(prompts, device, dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5.to(clip)], dim=-2)
        pooled = torch.cat([p.to(device) for p in pooled], dim=-1)
        return TextCondition(embeds, pooled=pooled)

    def _encode_t5(self, prompts: list[str], device, dtype) -> Tensor:
        if self.text_encoder_3 is None:  # the stock pipeline's zeros
            width = int(self.denoiser.config.joint_attention_dim)
            return torch.zeros(
                (len(prompts), self.max_sequence_length, width), device=device, dtype=dtype
            )
        tokens = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        encoder = self.text_encoder_3
        return encoder(tokens.input_ids.to(next(encoder.parameters()).device))[0].to(device)

    # ---- denoiser ----
    def _model_output(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        if cond.pooled is None:
            raise ValueError(
                "SD3 needs pooled text embeddings in the condition; encode the prompts with "
                "this backbone (precomputed embeddings without them cannot condition SD3)"
            )
        patch = int(self.denoiser.config.patch_size)
        if x_t.shape[-2] % patch or x_t.shape[-1] % patch:
            factor = patch * self.vae_scale_factor
            raise ValueError(
                f"SD3 latents of {x_t.shape[-2]}x{x_t.shape[-1]} are not divisible by the "
                f"transformer's patch size {patch}; use a resolution that is a multiple of "
                f"{factor} px"
            )
        return self.denoiser(
            hidden_states=x_t,
            timestep=self.parametrization.model_timestep(t),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    # ---- export ----
    def _pipeline_components(self, denoiser: nn.Module, scheduler):
        from diffusers import StableDiffusion3Pipeline

        if self.vae is None:
            raise ValueError("an SD3 teacher without vae/ cannot be exported as a pipeline")
        text = self._text_parts()
        components = dict(
            transformer=denoiser,
            scheduler=scheduler,
            vae=self.vae,
            image_encoder=None,
            feature_extractor=None,
            **text,
        )
        return StableDiffusion3Pipeline, components
