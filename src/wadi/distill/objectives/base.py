"""The objective protocol: a generator loss and the fake score's denoising loss."""

from __future__ import annotations

import torch
from torch import Tensor

from wadi.backbones.parametrization import Parametrization

from ..losses import fake_score_loss

__all__ = ["Objective", "distill_loss"]


def distill_loss(x0: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean((x0 - stopgrad(x0 - grad))^2)``: its gradient on x0 is ``grad / x0.numel()``.

    The usual way to feed a score-distillation direction ``grad`` (not a loss's
    gradient itself) through autograd into the student.
    """
    grad = torch.nan_to_num(grad.detach())
    x0f = x0.to(grad.dtype)
    return 0.5 * torch.mean((x0f - (x0f - grad).detach()) ** 2)


class Objective:
    """What the generator and the fake score minimise (see the package docstring).

    Shapes: latents ``(B, C, H, W)``, ``t`` ``(B,)`` integer steps; ``eps_real`` and
    ``eps_fake`` are the guided noise predictions of teacher and fake score at
    ``(x_t, t)``, without gradient.
    """

    name = ""

    def generator_loss(
        self,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        eps_real: Tensor,
        eps_fake: Tensor,
        param: Parametrization,
    ) -> Tensor:
        raise NotImplementedError

    def fake_loss(self, eps_pred: Tensor, eps: Tensor, t: Tensor, param: Parametrization) -> Tensor:
        """The fake score's denoising loss ``mean(abar_t (eps_pred - eps)^2)`` (method.md step 5)."""
        return fake_score_loss(eps_pred, eps, param.abar_equivalent(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
