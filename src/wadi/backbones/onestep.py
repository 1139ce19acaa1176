"""The one-step generator of method.md section 3.

``x0 = (z - sqrt(1 - abar_T) * eps(z, T, c)) / sqrt(abar_T)`` at the fixed
noise level ``T = 999``.  With ``abar_T`` read from the teacher's scheduler
this is exactly one step of a DDIM scheduler with trailing spacing, which is
what makes the exported pipeline reproduce it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Backbone, TextCondition

__all__ = ["alpha_bar_from_scheduler", "one_step", "x0_from_eps", "ALPHA_BAR_T_REFERENCE"]

#: the constant the published scripts hard-code (SD's scaled-linear schedule gives 0.00466)
ALPHA_BAR_T_REFERENCE = 0.0047


def alpha_bar_from_scheduler(scheduler, t: int = 999) -> float:
    """abar_t of a diffusers scheduler, as a Python float (exactly the value it stores)."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod)
    if not 0 <= t < alphas_cumprod.shape[0]:
        raise ValueError(f"t={t} is outside the scheduler's 0..{alphas_cumprod.shape[0] - 1}")
    return float(alphas_cumprod[t].to(torch.float64))


def check_alpha_bar(alpha_bar_T: float) -> float:
    """``alpha_bar_T`` as a float, with a one-line error if it is not in (0, 1)."""
    value = float(alpha_bar_T)
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise ValueError(f"alpha_bar_T must be in (0, 1), got {alpha_bar_T!r}")
    return value


def x0_from_eps(z: Tensor, eps: Tensor, alpha_bar_T: float) -> Tensor:
    """``(z - sqrt(1 - a) eps) / sqrt(a)`` with the coefficients computed in float64."""
    a = check_alpha_bar(alpha_bar_T)
    return (z - math.sqrt(1.0 - a) * eps) / math.sqrt(a)


def one_step(
    backbone: Backbone, z: Tensor, cond: TextCondition, alpha_bar_T: float, t: int = 999
) -> Tensor:
    """The student's sample from noise ``z`` in one network call (keeps the autograd graph).

    Shorthand for ``OneStep(t, alpha_bar_T).sample(backbone, z, cond)``
    (:mod:`wadi.generators`); the denoiser runs with whatever adapter is active.
    """
    from wadi.generators import OneStep

    return OneStep(t, check_alpha_bar(alpha_bar_T)).sample(backbone, z, cond)
