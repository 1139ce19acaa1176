"""The backbone interface: one loaded teacher behind a small, uniform API.

The training loop, sampling and export only talk to :class:`Backbone`; each
architecture (SD U-Net, PixArt DiT, ...) is a subclass that knows how to call
its denoiser, encode prompts and write a stock diffusers pipeline.  The frozen
denoiser exists once: LoRaD adapters (student, fake score) attach to it and
the teacher is the same module with adapters disabled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import TextCondition
from .parametrization import Parametrization, from_scheduler

__all__ = ["TextCondition", "Backbone", "eps_from_model_output"]


def eps_from_model_output(
    output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str
) -> Tensor:
    """Convert a denoiser output to the noise ``eps`` (method.md section 3).

    ``alpha_bar`` holds abar_t per sample (shape ``(B,)``, any float dtype).
    v-prediction: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``;
    sample prediction: ``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``.
    """
    if prediction_type == "epsilon":
        return output
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alpha_bar = alpha_bar.to(device=x_t.device, dtype=torch.float64).reshape(shape)
    sqrt_a = alpha_bar.sqrt().to(x_t.dtype)
    sqrt_1ma = (1.0 - alpha_bar).sqrt().to(x_t.dtype)
    if prediction_type == "v_prediction":
        return sqrt_a * output + sqrt_1ma * x_t
    if prediction_type == "sample":
        return (x_t - sqrt_a * output) / sqrt_1ma
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample"
    )


class Backbone:
    """One loaded teacher (see module docstring).  Subclasses implement the ``_`` hooks."""

    kind: str = ""
    student_preset: str = ""
    fake_preset: str = ""
    denoiser_folder: str = ""  # "unet" / "transformer"
    denoiser_class: str = ""  # the diffusers class in that folder
    supported: str = ""  # what this class loads, for error messages
    optional_t5: bool = False  # load_backbone(t5=False) may leave its T5 out (SD3)
    t5_note: str = ""  # why not, for the error of t5=False

    def __init__(
        self,
        *,
        denoiser: nn.Module,
        scheduler: Any,
        text_encoder: nn.Module | None,
        tokenizer: Any,
        vae: nn.Module | None,
        path: Path | None = None,
    ):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.path = path

    # ---- detection and loading (registry hooks) ----
    @classmethod
    def accepts(cls, denoiser_config: dict) -> bool:
        """Whether this class handles a denoiser with this ``config.json``."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return f"{cls.kind} ({cls.supported})"

    @classmethod
    def from_folder(
        cls, path: Path, *, dtype: torch.dtype, device, load_text_encoder: bool
    ) -> Backbone:
        """Load denoiser, scheduler, optional VAE and (optionally) text parts from ``path``."""
        import diffusers

        from .loading import load_scheduler, load_vae

        denoiser = getattr(diffusers, cls.denoiser_class).from_pretrained(
            path, subfolder=cls.denoiser_folder, torch_dtype=dtype
        )
        text_encoder = tokenizer = None
        if load_text_encoder:
            text_encoder, tokenizer = cls._read_text_parts(path, dtype, device)
        return cls(
            denoiser=denoiser.to(device),
            scheduler=load_scheduler(path),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=load_vae(path, dtype, device),
            path=path,
        )

    # ---- shapes and schedule ----
    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.parametrization.prediction_type

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def latent_size(self, resolution: int) -> int:
        """Side of the latent grid for an image of ``resolution`` pixels."""
        factor = self.vae_scale_factor
        if resolution <= 0 or resolution % factor:
            raise ValueError(
                f"resolution {resolution} must be a positive multiple of the VAE factor {factor}"
            )
        return resolution // factor

    @property
    def parametrization(self) -> Parametrization:
        """How this teacher's output relates to x0 and eps (from its scheduler)."""
        param = self.__dict__.get("_parametrization")
        if param is None:
            param = self.__dict__["_parametrization"] = from_scheduler(self.scheduler)
        return param

    def alphas_cumprod(self) -> Tensor:
        """abar_t for t = 0..T-1, float64, exactly the values the scheduler uses."""
        return torch.as_tensor(self.scheduler.alphas_cumprod).to(torch.float64)

    # ---- text ----
    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "this backbone was loaded with load_text_encoder=False; use precomputed "
                "embeddings (wadi embed) or load it with the text encoder"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        with torch.no_grad():
            return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> TextCondition:
        raise NotImplementedError

    # ---- denoiser ----
    def _timesteps(self, t, batch: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.is_floating_point():
            t = t.round()
        t = t.to(torch.long)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}"
            )
        return t

    def _model_output(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """Raw denoiser output (same channels as ``x_t``) for timesteps ``t`` of shape (B,)."""
        raise NotImplementedError

    def predict(self, x_t: Tensor, t, cond: TextCondition) -> Tensor:
        """The denoiser's prediction in its own parametrization (eps, v, x0 or velocity).

        PixArt's learned-variance half is already dropped; generators convert with
        :attr:`parametrization`.
        """
        if len(cond) != x_t.shape[0]:
            raise ValueError(f"{len(cond)} conditions for a batch of {x_t.shape[0]} latents")
        ts = self._timesteps(t, x_t.shape[0])
        return self._model_output(x_t, ts, cond.to(device=x_t.device, dtype=x_t.dtype))

    def predict_eps(
        self, x_t: Tensor, t, cond: TextCondition, *, alpha_bar: float | Tensor | None = None
    ) -> Tensor:
        """Noise prediction eps(x_t, t, c); v-/sample-prediction teachers are converted.

        ``alpha_bar`` overrides abar_t in that conversion (the one-step
        generator uses its own abar_T); by default it is the scheduler's.
        """
        if len(cond) != x_t.shape[0]:
            raise ValueError(f"{len(cond)} conditions for a batch of {x_t.shape[0]} latents")
        ts = self._timesteps(t, x_t.shape[0])
        cond = cond.to(device=x_t.device, dtype=x_t.dtype)
        out = self._model_output(x_t, ts, cond)
        if self.prediction_type == "epsilon":
            return out
        if alpha_bar is None:
            return self.parametrization.to_eps(out, x_t, ts).to(out.dtype)
        else:
            alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).expand(x_t.shape[0])
        return eps_from_model_output(out, x_t, alpha_bar, self.prediction_type)

    def predict_eps_cfg(
        self,
        x_t: Tensor,
        t,
        cond: TextCondition,
        null_cond: TextCondition,
        scale: float,
        *,
        alpha_bar: float | Tensor | None = None,
    ) -> Tensor:
        """Classifier-free guidance in ONE batched call: ``m(null) + s * (m(c) - m(null))``."""
        b = x_t.shape[0]
        ts = self._timesteps(t, b)
        both = TextCondition.cat([null_cond.expand(b).to(cond.device), cond])
        if alpha_bar is not None and torch.as_tensor(alpha_bar).ndim:
            alpha_bar = torch.as_tensor(alpha_bar).repeat(2)
        eps = self.predict_eps(torch.cat([x_t, x_t]), ts.repeat(2), both, alpha_bar=alpha_bar)
        eps_null, eps_cond = eps.chunk(2)
        return eps_null + scale * (eps_cond - eps_null)

    # ---- images ----
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1], ``(B, C, H, W)``; the identity in pixel space."""
        if self.vae is None:
            return latents
        vae = self.vae
        scaled = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            scaled = scaled + shift
        with torch.no_grad():
            images = vae.decode(scaled, return_dict=False)[0]
        return images.clamp(-1, 1)

    # ---- export (wadi.backbones.export.save_pipeline calls these) ----
    def _pipeline_components(self, denoiser: nn.Module, scheduler) -> tuple[type | None, dict]:
        """``(pipeline class or None for pixel space, components)`` for export."""
        raise NotImplementedError

    def _load_text_parts(self) -> tuple[Any, Any]:
        """Text encoder and tokenizer, loaded from ``path`` if this backbone has none in memory."""
        if self.text_encoder is not None and self.tokenizer is not None:
            return self.text_encoder, self.tokenizer
        if self.path is None:
            raise ValueError(
                "the backbone has no text encoder and no source folder to load one from"
            )
        return self._read_text_parts(self.path, self.dtype, "cpu")

    @classmethod
    def _read_text_parts(cls, path: Path, dtype, device):
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, path={str(self.path)!r}, "
            f"prediction_type={self.prediction_type!r}, latent_channels={self.latent_channels}, "
            f"pixel_space={self.vae is None})"
        )
