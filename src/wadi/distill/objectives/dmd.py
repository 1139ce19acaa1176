"""Distribution Matching Distillation's generator gradient (DMD, Yin et al. 2024; DMD2).

In x0 space: ``grad = (x0_fake - x0_real) / mean|x0 - x0_real|``, the mean per sample
over all its elements.  The normalisation replaces VSD's ``1 - abar_t`` weight: each
sample's step has about unit size whatever its noise level.  Both x0 predictions come
from the eps predictions at ``(x_t, t)`` through the parametrization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wadi.backbones.parametrization import Parametrization

from .base import Objective, distill_loss

__all__ = ["DMD", "dmd_gradient"]


def dmd_gradient(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """The per-sample normalised DMD direction on ``x0`` (float32 or wider)."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, x0_real, x0_fake = x0.to(dtype), x0_real.to(dtype), x0_fake.to(dtype)
    dims = tuple(range(1, x0.ndim))
    scale = (x0 - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / scale)


class DMD(Objective):
    name = "dmd"

    def generator_loss(self, x0, x_t, t, eps_real, eps_fake, param: Parametrization) -> Tensor:
        x0_real = param.eps_to_x0(eps_real.detach(), x_t, t)
        x0_fake = param.eps_to_x0(eps_fake.detach(), x_t, t)
        return distill_loss(x0, dmd_gradient(x0.detach(), x0_real, x0_fake))
