"""The VSD losses of WaDi as pure functions (method.md section 4).

Shapes: latents ``(B, C, H, W)``; ``alpha_bar`` holds abar_t per sample ``(B,)``.
All reductions are in float32 (or float64 when the inputs are float64).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_sample(alpha_bar: Tensor, like: Tensor) -> Tensor:
    dtype = torch.promote_types(like.dtype, torch.float32)
    return alpha_bar.to(device=like.device, dtype=dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
    a = _per_sample(alpha_bar, x0)
    return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)


def guided(eps_null: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``m(null) + s * (m(c) - m(null))``."""
    return eps_null + scale * (eps_cond - eps_null)


def vsd_gradient(eps_real: Tensor, eps_fake: Tensor, alpha_bar: Tensor) -> Tensor:
    """``g = nan_to_num((1 - abar_t) * (eps_real - eps_fake))``, the VSD direction on x0."""
    a = _per_sample(alpha_bar, eps_real)
    g = (1 - a) * (eps_real.to(a.dtype) - eps_fake.to(a.dtype))
    return torch.nan_to_num(g)


def generator_loss(x0: Tensor, eps_real: Tensor, eps_fake: Tensor, alpha_bar: Tensor) -> Tensor:
    """``0.5 * mean((x0 - stopgrad(x0 - g))^2)``: its gradient on x0 is ``g / x0.numel()``."""
    g = vsd_gradient(eps_real.detach(), eps_fake.detach(), alpha_bar)
    x0f = x0.to(g.dtype)
    target = (x0f - g).detach()
    return 0.5 * torch.mean((x0f - target) ** 2)


def fake_score_loss(eps_pred: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """``mean((sqrt(abar_t) * (eps_fake - eps))^2)``: denoising loss of the fake score."""
    a = _per_sample(alpha_bar, eps_pred)
    return torch.mean((a.sqrt() * (eps_pred.to(a.dtype) - eps.to(a.dtype))) ** 2)


def sample_timesteps(
    batch: int, t_min: int, t_max: int, generator: torch.Generator, device
) -> Tensor:
    """Integer timesteps uniform on ``{t_min, ..., t_max}`` (both ends included)."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=device)
