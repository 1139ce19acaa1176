"""One WaDi iteration: a generator update, then the fake score's update(s) (method.md section 4).

Per process, batch of prompts ``c`` (``B x K`` of them with ``K``-step gradient
accumulation, processed ``B`` at a time):

1. ``x0 = G(z, c)``: the student's sample, with gradient (a multi-step student runs its
   first k steps without gradient first: backward simulation).
2. ``t ~ U{t_min..t_max}``, ``x_t`` = ``x0`` noised by the teacher's parametrization.
3. No gradient: teacher and fake score, both with CFG, at ``(x_t, t)``.
4. The objective's generator loss (VSD: ``(1 - abar_t)(eps_real - eps_fake)``; DMD:
   per-sample normalised x0 difference); clip, step.
5. The fake score's denoising loss on ``x0.detach()`` with fresh noise, ``t ~ U{0..999}``,
   10 % null prompts; step.  ``fake_updates = k > 1`` repeats this on fresh student
   samples (DMD2's two time-scale rule).

With DMD2's GAN term (``gan``, :mod:`wadi.distill.gan`) the generator also gets the
non-saturating loss of a classifier head on the fake score's bottleneck (its gradient
on x0 is taken inside the fake role, then fed to the student's backward, so each
backward runs in the role of its forward), and the fake score's update adds the
classifier loss on noised real images vs the student's samples.  The classifier is
unconditional (null prompt on both sides): real images come without captions.

Every random draw is made for the whole batch before it is split into micro-batches,
so ``B`` with ``K = 2`` computes what ``2B`` with ``K = 1`` does (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["WaDiIteration", "IterationResult"]


@dataclass
class IterationResult:
    loss_generator: float
    loss_fake: float
    ok_generator: bool
    ok_fake: bool
    grad_norm_student: float
    grad_norm_fake: float

    @property
    def ok(self) -> bool:
        return self.ok_generator and self.ok_fake


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class WaDiIteration:
    """Steps 1-5 of the module docstring over a backbone with student and fake roles.

    ``optimizers`` maps ``"student"`` and ``"fake"`` to
    :class:`~wadi.distill.optim.OptimizerStep`; ``autocast`` is a zero-argument context
    factory (mixed precision or a no-op).
    """

    def __init__(
        self,
        backbone,
        roles,
        objective,
        generator,
        config,
        autocast,
        optimizers,
        gan=None,
        real_latents: Tensor | None = None,
    ):
        self.backbone, self.roles = backbone, roles
        self.objective, self.generator = objective, generator
        self.config, self.autocast = config, autocast
        self.student, self.fake = optimizers["student"], optimizers["fake"]
        self.param = backbone.parametrization
        self.gan, self.real = gan, real_latents
        if gan is not None and (real_latents is None or not len(real_latents)):
            raise ValueError("the GAN term needs real images (--real-images DIR)")

    def _gan_gradient(self, x0: Tensor, eps: Tensor, t: Tensor, null_cond) -> Tensor:
        """d(GAN generator loss)/d x0 through the fake score, computed in the fake role."""
        leaf = x0.detach().float().requires_grad_(True)
        x_t = self.param.add_noise(leaf, eps, t)
        with self.autocast():
            loss = self.gan.generator_loss(
                self.backbone, x_t, t, null_cond.expand(len(x0)), self.roles.fake
            )
        with self.roles.fake():
            (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    def _timesteps(self, n, t_min, t_max, rng, device) -> Tensor:
        return self.param.sample_timesteps(n, t_min, t_max, rng, device)

    def __call__(self, cond, null_cond, shape, rng: torch.Generator, step: int) -> IterationResult:
        config, backbone, roles = self.config, self.backbone, self.roles
        n, micro = shape[0], config.batch_size
        parts = _chunks(n, micro)
        device = null_cond.device

        def scale(s: slice) -> float:  # a micro-batch's share of the batch mean (1.0 if whole)
            return (s.stop - s.start) / n

        # 1-4: generator update
        z = torch.randn(shape, generator=rng, device=device)
        k = self.generator.draw_step(rng, device)
        noises = self.generator.train_noises(k, z, rng)
        t = self._timesteps(n, config.generator_t_min, config.generator_t_max, rng, device)
        eps = torch.randn(shape, generator=rng, device=device)
        x0_all, loss_g = [], 0.0
        for s in parts:
            with self.autocast(), roles.student():
                x0 = self.generator.train_sample(
                    backbone, z[s], cond[s], k, noises=[e[s] for e in noises]
                )
            x_t = self.param.add_noise(x0.detach().float(), eps[s], t[s])
            with torch.no_grad(), self.autocast():
                with roles.teacher():
                    eps_real = backbone.predict_eps_cfg(
                        x_t, t[s], cond[s], null_cond, config.guidance_scale
                    )
                with roles.fake():
                    eps_fake = backbone.predict_eps_cfg(
                        x_t, t[s], cond[s], null_cond, config.guidance_scale
                    )
            loss = self.objective.generator_loss(x0, x_t, t[s], eps_real, eps_fake, self.param)
            loss_g += float(loss.detach()) * scale(s)
            if self.gan is not None:  # surrogate whose gradient on x0 is the GAN gradient
                grad = self._gan_gradient(x0, eps[s], t[s], null_cond)
                loss = loss + (x0.float() * torch.nan_to_num(grad)).sum()
            self.student.backward(loss * scale(s), roles.student)
            x0_all.append(x0.detach().float())
        ok_g, norm_g = self.student.step(step)

        # 5: fake-score update(s) on the student's samples
        x0 = torch.cat(x0_all)
        ok_f, norm_f, loss_f = True, float("nan"), 0.0
        for j in range(config.fake_updates):
            if j > 0:  # a fresh sample of the moved student, no gradient
                z = torch.randn(shape, generator=rng, device=device)
                k = self.generator.draw_step(rng, device)
                noises = self.generator.train_noises(k, z, rng)
                with torch.no_grad(), self.autocast(), roles.student():
                    x0 = torch.cat(
                        [
                            self.generator.train_sample(
                                backbone, z[s], cond[s], k, noises=[e[s] for e in noises]
                            ).float()
                            for s in parts
                        ]
                    )
            eps2 = torch.randn(shape, generator=rng, device=device)
            t2 = self._timesteps(n, config.fake_t_min, config.fake_t_max, rng, device)
            keep = torch.rand(n, generator=rng, device=device) >= config.null_prompt_prob
            if self.gan is not None:
                pick = torch.randint(0, len(self.real), (n,), generator=rng, device=device)
                eps_real = torch.randn(shape, generator=rng, device=device)
            loss_f = 0.0
            for s in parts:
                x_t2 = self.param.add_noise(x0[s], eps2[s], t2[s])
                with self.autocast(), roles.fake():
                    eps_pred = backbone.predict_eps(x_t2, t2[s], cond[s].where(keep[s], null_cond))
                loss = self.objective.fake_loss(eps_pred, eps2[s], t2[s], self.param)
                loss_f += float(loss.detach()) * scale(s)
                if self.gan is not None:
                    x_t_real = self.param.add_noise(self.real[pick[s]], eps_real[s], t2[s])
                    with self.autocast():
                        loss = loss + self.gan.discriminator_loss(
                            backbone, x_t_real, x_t2, t2[s], null_cond.expand(len(x_t2)),
                            roles.fake,
                        )  # fmt: skip
                self.fake.backward(loss * scale(s), roles.fake)
            ok, norm_f = self.fake.step(step)
            ok_f = ok_f and ok
        return IterationResult(loss_g, loss_f, ok_g, ok_f, norm_g, norm_f)
