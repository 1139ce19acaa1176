"""Variational Score Distillation as WaDi uses it (method.md section 4).

``g = (1 - abar_t) (eps_real - eps_fake)``: SwiftBrush's weighting, so the generator
moves x0 along the difference of the two scores, scaled to the noise level.
"""

from __future__ import annotations

from torch import Tensor

from wadi.backbones.parametrization import Parametrization

from ..losses import generator_loss
from .base import Objective

__all__ = ["VSD"]


class VSD(Objective):
    name = "vsd"

    def generator_loss(self, x0, x_t, t, eps_real, eps_fake, param: Parametrization) -> Tensor:
        return generator_loss(x0, eps_real, eps_fake, param.abar_equivalent(t))
