"""FLUX.1 teachers (``FluxPipeline`` layout): FLUX.1-dev (guidance-distilled) and FLUX.1-schnell.

Prompts are encoded exactly as ``FluxPipeline.encode_prompt`` does: ``cond.embeds`` are
the T5 (``text_encoder_2``) hidden states of ``max_sequence_length`` 512 tokens, no mask
(the transformer attends to the padding, as in the stock pipeline), and ``cond.pooled``
is CLIP's (``text_encoder``) pooled output.  The rotary position ids are built here as
the stock pipeline builds them (text ids all zero; image ids ``(0, row, column)`` of the
2x2 patch grid), and the latents are packed into 2x2 patches inside the backbone, so
generators and the training loop see ordinary ``(B, 16, H, W)`` latents.  T5 is
required: FLUX has no T5-less mode.

The schedule.  The transformer predicts the velocity of the flow-matching path and takes
``sigma`` as its timestep (it multiplies by 1000 itself).  FLUX.1-dev's scheduler uses
dynamic shifting: the stock pipeline shifts sigma by ``exp(mu)`` with ``mu`` linear in
the number of image tokens, which is exactly the static shift ``exp(mu)`` of
:class:`~wadi.backbones.parametrization.FlowMatchingParametrization`.  The backbone's
:attr:`parametrization` is that path for :attr:`FluxBackbone.resolution` (default: the
stock 1024 px).  One step from pure noise (t = 999, sigma 1) is ``x0 = z - v`` at any
resolution; for other generator steps set ``resolution`` to the sampling size before
sampling or exporting, so the stock call at that size uses the same sigmas.  FLUX.1-schnell
has a static schedule (shift 1) and no guidance input.

Guidance (FLUX.1-dev, ``guidance_embeds=True``).  FLUX.1-dev is guidance-distilled: the
stock pipeline runs ONE pass with the guidance scale fed to an embedding, no
unconditional branch.  So in wadi:

- :meth:`predict_eps_cfg` (the teacher's and the fake score's guided eps in VSD/DMD) is
  one pass with guidance = the CFG ``scale`` (the run's ``guidance_scale``); the null
  condition is not used;
- every plain :meth:`predict` / :meth:`predict_eps` (the student's samples, the fake
  score's regression loss) takes guidance = :attr:`FluxBackbone.guidance`, default 3.5,
  the stock pipeline's default; the export records ``guidance_scale`` = that value in
  the stock call, so ``pipe(prompt, **pipeline_call)`` reproduces the student.

Run with ``guidance_scale`` equal to :attr:`guidance` (3.5) to have the fake score trained
and queried at the same guidance input.  FLUX.1-schnell keeps the two-pass CFG of
:class:`Backbone` (the stock pipeline's ``true_cfg_scale`` with ``negative_prompt=""``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Backbone, TextCondition
from .loading import load_scheduler, load_text_encoder, load_vae
from .parametrization import FlowMatchingParametrization, Parametrization

__all__ = ["FluxBackbone", "FLUX_MAX_T5_TOKENS", "calculate_shift"]

#: the stock pipeline's ``max_sequence_length``
FLUX_MAX_T5_TOKENS = 512
#: ``FluxPipeline.default_sample_size`` (latent pixels; x VAE factor 8 = 1024 px)
FLUX_DEFAULT_SAMPLE_SIZE = 128

_TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` of FLUX's dynamic shifting for ``image_seq_len`` tokens (``FluxPipeline``'s)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class FluxBackbone(Backbone):
    kind = "flux"
    student_preset = "flux-student"
    fake_preset = "flux-fake"
    denoiser_folder = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    supported = "FluxTransformer2DModel of FLUX.1-dev/schnell (flow matching)"
    max_sequence_length = FLUX_MAX_T5_TOKENS
    t5_note = "FLUX needs its T5: text_encoder_2 gives all of its token embeddings"

    def __init__(
        self, *, text_encoder_2: nn.Module | None = None, tokenizer_2=None, **parts
    ) -> None:
        super().__init__(**parts)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        #: image side the dynamic-shift schedule is built for (stock default 1024 px)
        self.resolution = FLUX_DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        #: guidance input of plain predictions (student, fake regression); None without it
        self.guidance: float | None = 3.5 if self.guidance_embeds else None

    # ---- detection and loading ----
    @classmethod
    def accepts(cls, denoiser_config: dict) -> bool:
        return denoiser_config.get("_class_name") == "FluxTransformer2DModel"

    @classmethod
    def from_folder(
        cls, path: Path, *, dtype: torch.dtype, device, load_text_encoder: bool
    ) -> FluxBackbone:
        """As :meth:`Backbone.from_folder`, plus T5 (``text_encoder_2``/``tokenizer_2``)."""
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype
        )
        text = dict.fromkeys(_TEXT_PARTS)
        if load_text_encoder:
            text = dict(zip(_TEXT_PARTS, cls._read_text_parts(path, dtype, device)))
            text["text_encoder_2"].requires_grad_(False).eval()
        return cls(
            denoiser=transformer.to(device),
            scheduler=load_scheduler(path),
            vae=load_vae(path, dtype, device),
            path=path,
            **text,
        )

    @classmethod
    def _read_text_parts(cls, path: Path, dtype, device):
        """``(text_encoder, tokenizer, text_encoder_2, tokenizer_2)`` from ``path``."""

        path = Path(path)
        needed = ["text_encoder/config.json", "tokenizer"]
        needed += ["text_encoder_2/config.json", "tokenizer_2"]
        missing = [n for n in needed if not (path / n).exists()]
        t5 = path / "text_encoder_2"
        if not missing and not any(t5.glob("*.safetensors")) and not any(t5.glob("*.bin")):
            missing = ["the T5 weights (text_encoder_2/*.safetensors)"]
        if missing:
            raise ValueError(
                f"FLUX teacher {path} is incomplete: {', '.join(missing)} missing; FLUX needs "
                "CLIP (text_encoder) and T5 (text_encoder_2) with their tokenizers (give the "
                "whole FluxPipeline folder)"
            )
        parts = []
        for folder, default in (
            ("text_encoder", "CLIPTextModel"),
            ("text_encoder_2", "T5EncoderModel"),
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

    # ---- shapes and schedule ----
    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # 2x2 patches packed

    def latent_size(self, resolution: int) -> int:
        """As :meth:`Backbone.latent_size`; the 2x2 packing needs an even latent side."""
        factor = 2 * self.vae_scale_factor
        if resolution <= 0 or resolution % factor:
            raise ValueError(
                f"FLUX resolution {resolution} must be a positive multiple of {factor} "
                f"(VAE factor {self.vae_scale_factor} x the 2x2 latent packing)"
            )
        return resolution // self.vae_scale_factor

    def image_seq_len(self, resolution: int | None = None) -> int:
        """Image tokens of a square ``resolution`` (default :attr:`resolution`) image."""
        side = self.latent_size(self.resolution if resolution is None else resolution) // 2
        return side * side

    def mu(self, resolution: int | None = None) -> float:
        """The stock pipeline's dynamic-shift ``mu`` for a square ``resolution`` image."""
        config = self.scheduler.config
        return calculate_shift(
            self.image_seq_len(resolution),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    @property
    def parametrization(self) -> Parametrization:
        """The flow path; with dynamic shifting, the one of :attr:`resolution` (shift e^mu)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return super().parametrization
        cached = self.__dict__.get("_flux_param")
        if cached is not None and cached[0] == self.resolution:
            return cached[1]
        mu = self.mu()
        # diffusers' time_shift(mu, 1, s): exponential e^mu s / (1 + (e^mu - 1) s), linear
        # the same with mu; both are the static shift of FlowMatchingParametrization
        linear = config.get("time_shift_type", "exponential") == "linear"
        shift = mu if linear else math.exp(mu)
        param = FlowMatchingParametrization(int(config.get("num_train_timesteps", 1000)), shift)
        self.__dict__["_flux_param"] = (self.resolution, param)
        return param

    # ---- text ----
    def _encode(self, prompts: list[str]) -> TextCondition:
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("this FLUX backbone has no T5 (text_encoder_2/tokenizer_2)")
        clip = self.text_encoder
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(clip.parameters()).device
        pooled = clip(tokens.input_ids.to(device), output_hidden_states=False).pooler_output
        t5 = self.text_encoder_2
        tokens = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = t5(tokens.input_ids.to(next(t5.parameters()).device))[0]
        return TextCondition(embeds, pooled=pooled.to(embeds.device))

    # ---- denoiser ----
    @staticmethod
    def _image_ids(height: int, width: int, device, dtype) -> Tensor:
        """``(height * width, 3)`` rotary ids ``(0, row, column)`` of the packed patch grid."""
        ids = torch.zeros(height, width, 3)
        ids[..., 1] = torch.arange(height)[:, None]
        ids[..., 2] = torch.arange(width)[None, :]
        return ids.reshape(height * width, 3).to(device=device, dtype=dtype)

    def _forward(self, x_t: Tensor, t: Tensor, cond: TextCondition, guidance) -> Tensor:
        if cond.pooled is None:
            raise ValueError(
                "FLUX needs pooled CLIP embeddings in the condition; encode the prompts with "
                "this backbone (precomputed embeddings without them cannot condition FLUX)"
            )
        b, c, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(
                f"FLUX latents of {h}x{w} cannot be packed into 2x2 patches; use a resolution "
                f"that is a multiple of {2 * self.vae_scale_factor} px"
            )
        packed = x_t.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(b, (h // 2) * (w // 2), 4 * c)
        param = self.parametrization
        timestep = param.model_timestep(t).to(x_t.dtype) / param.num_train_timesteps
        if self.guidance_embeds:
            value = self.guidance if guidance is None else guidance
            guidance = torch.full((b,), float(value), device=x_t.device, dtype=torch.float32)
        else:
            guidance = None
        out = self.denoiser(
            hidden_states=packed,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=self._image_ids(h // 2, w // 2, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        out = out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    def _model_output(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        return self._forward(x_t, t, cond, None)

    def predict_eps_cfg(
        self,
        x_t: Tensor,
        t,
        cond: TextCondition,
        null_cond: TextCondition,
        scale: float,
        *,
        alpha_bar=None,
    ) -> Tensor:
        """FLUX.1-dev: ONE pass with guidance = ``scale`` (guidance-distilled; ``null_cond``
        unused).  Without a guidance embedding (schnell): the two-pass CFG of the base."""
        if not self.guidance_embeds:
            return super().predict_eps_cfg(x_t, t, cond, null_cond, scale, alpha_bar=alpha_bar)
        if alpha_bar is not None:
            raise ValueError("alpha_bar applies to DDPM schedules, not to FLUX's flow matching")
        if len(cond) != x_t.shape[0]:
            raise ValueError(f"{len(cond)} conditions for a batch of {x_t.shape[0]} latents")
        ts = self._timesteps(t, x_t.shape[0])
        out = self._forward(x_t, ts, cond.to(device=x_t.device, dtype=x_t.dtype), scale)
        return self.parametrization.to_eps(out, x_t, ts).to(out.dtype)

    # ---- export ----
    def _pipeline_components(self, denoiser: nn.Module, scheduler):
        from diffusers import FluxPipeline

        if self.vae is None:
            raise ValueError("a FLUX teacher without vae/ cannot be exported as a pipeline")
        text_encoder, tokenizer, text_encoder_2, tokenizer_2 = self._load_text_parts()
        components = dict(
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=denoiser,
            image_encoder=None,
            feature_extractor=None,
        )
        return FluxPipeline, components
