"""Multi-step teacher sampling (DDIM with classifier-free guidance), for baselines and checks."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Backbone, TextCondition

__all__ = ["sample_multistep", "ddim_scheduler"]


def ddim_scheduler(backbone: Backbone, steps: int):
    """A DDIM scheduler on the teacher's noise schedule, fed eps predictions, ``steps`` steps.

    Trailing spacing, so the first step starts at t = 999 from pure noise.
    """
    from diffusers import DDIMScheduler

    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    scheduler = DDIMScheduler.from_config(
        backbone.scheduler.config,
        prediction_type="epsilon",  # backbone.predict_eps already converted v / x0
        timestep_spacing="trailing",
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=False,
        steps_offset=1,
        trained_betas=torch.as_tensor(backbone.scheduler.betas).tolist(),
    )
    scheduler.set_timesteps(int(steps))
    return scheduler


@torch.no_grad()
def sample_multistep(
    backbone: Backbone,
    cond: TextCondition,
    null_cond: TextCondition,
    z: Tensor,
    steps: int = 25,
    guidance: float = 3.0,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from noise ``z``; returns the x0 latents of the last step.

    ``guidance`` > 1 runs cond and null in one batched call per step
    (:meth:`Backbone.predict_eps_cfg`); ``guidance == 1`` runs the conditional model only.
    """
    scheduler = ddim_scheduler(backbone, steps)
    x = z
    x0 = z
    for t in scheduler.timesteps:
        t_int = int(t)
        if guidance == 1.0:
            eps = backbone.predict_eps(x, t_int, cond)
        else:
            eps = backbone.predict_eps_cfg(x, t_int, cond, null_cond, guidance)
        out = scheduler.step(eps, t, x, eta=0.0)
        x, x0 = out.prev_sample, out.pred_original_sample
    return x0
