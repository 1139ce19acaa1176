"""The generator protocol: sample for inference, sample with gradient for training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from wadi.backbones.parametrization import DiscreteParametrization, Parametrization

__all__ = ["Generator"]


class Generator:
    """A student sampler over a fixed, decreasing list of steps (see the package docstring).

    ``timesteps[0]`` starts from pure noise ``z``; each later step re-noises the previous
    x0 prediction to its own noise level with fresh noise.  ``alpha_bar_T`` (discrete
    schedules only) replaces the schedule's abar at ``timesteps[0]``, as the published
    scripts' constant 0.0047 does; export then writes a scheduler with that value.
    """

    kind = ""

    def __init__(self, timesteps: Sequence[int], alpha_bar_T: float | None = None):
        steps = tuple(int(t) for t in timesteps)
        if not steps:
            raise ValueError("a generator needs at least one timestep")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"generator timesteps must strictly decrease, got {list(steps)}")
        if steps[-1] < 0:
            raise ValueError(f"generator timesteps must be >= 0, got {list(steps)}")
        self.timesteps = steps
        self.alpha_bar_T = None if alpha_bar_T is None else float(alpha_bar_T)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def __repr__(self) -> str:
        extra = "" if self.alpha_bar_T is None else f", alpha_bar_T={self.alpha_bar_T}"
        return f"{type(self).__name__}(timesteps={list(self.timesteps)}{extra})"

    def to_dict(self) -> dict:
        """What export metadata and model cards record."""
        return {
            "generator": self.kind,
            "timesteps": list(self.timesteps),
            "alpha_bar_T": self.alpha_bar_T,
        }

    # -- the path ---------------------------------------------------------------------------
    def parametrization(self, backbone) -> Parametrization:
        """The backbone's parametrization, with ``alpha_bar_T`` applied at the first step."""
        param = backbone.parametrization
        if self.timesteps[0] >= param.num_train_timesteps:
            raise ValueError(
                f"generator timestep {self.timesteps[0]} is outside the teacher's "
                f"0..{param.num_train_timesteps - 1}"
            )
        if self.alpha_bar_T is None:
            return param
        if not isinstance(param, DiscreteParametrization):
            raise ValueError(
                "alpha_bar_T applies to discrete (DDPM) schedules only; leave it unset for "
                "flow-matching teachers"
            )
        return param.with_alpha_bar(self.timesteps[0], self.alpha_bar_T)

    def alpha_bar(self, backbone) -> float | None:
        """abar at the first step (discrete schedules), as export needs it."""
        param = self.parametrization(backbone)
        if isinstance(param, DiscreteParametrization):
            return float(param.alpha_bar(self.timesteps[0]))
        return None

    def precision_warning(self, backbone) -> str | None:
        """A one-line warning when a 16-bit denoiser meets a large ``1/sqrt(abar_T)``.

        x0 from pure noise divides by ``alpha`` at the first step, so eps's rounding
        grows by ``1/alpha`` (PixArt at t = 999: 157; SD: 14.6).  Above 30 a bf16/fp16
        student's samples carry visible noise (docs/benchmarks.md).
        """
        if backbone.dtype not in (torch.float16, torch.bfloat16):
            return None
        param = self.parametrization(backbone)
        if not isinstance(param, DiscreteParametrization):
            return None  # flow matching: x0 = x - s v divides by nothing (alpha_T is 0)
        alpha, _ = param.alpha_sigma(torch.tensor([self.timesteps[0]]))
        gain = 1.0 / float(alpha[0])
        if gain <= 30:
            return None
        return (
            f"16-bit denoiser with 1/alpha = {gain:.0f} at t = {self.timesteps[0]}: eps rounding "
            "is amplified that much in x0; use --mixed-precision no, or --alpha-bar-T 0.0047 "
            "(the published scripts' constant)"
        )

    @staticmethod
    def _x0(backbone, param: Parametrization, x: Tensor, t: int, cond) -> Tensor:
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return param.to_x0(backbone.predict(x, ts, cond), x, ts)

    def _renoise(self, param, x0: Tensor, t: int, generator, dtype) -> Tensor:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=dtype)
        ts = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        return param.add_noise(x0.to(dtype), eps, ts)

    # -- inference --------------------------------------------------------------------------
    def sample(self, backbone, z: Tensor, cond, generator: torch.Generator | None = None) -> Tensor:
        """x0 after all steps from noise ``z`` (re-noising draws from ``generator``).

        Runs with whatever adapter is active on the backbone and keeps the autograd graph
        (wrap in ``torch.no_grad()`` for inference).
        """
        param = self.parametrization(backbone)
        x = z
        for i, t in enumerate(self.timesteps):
            x0 = self._x0(backbone, param, x, t, cond)
            if i + 1 < self.num_steps:
                x = self._renoise(param, x0, self.timesteps[i + 1], generator, z.dtype)
        return x0

    # -- training (backward simulation) -----------------------------------------------------
    def draw_step(self, generator: torch.Generator, device) -> int:
        """Which step this iteration trains (uniform); one-step draws nothing."""
        if self.num_steps == 1:
            return 0
        return int(torch.randint(0, self.num_steps, (1,), generator=generator, device=device))

    def train_noises(self, step: int, z: Tensor, generator: torch.Generator) -> list[Tensor]:
        """The re-noising draws :meth:`train_sample` needs to reach ``step`` (none for step 0).

        Drawn for the whole batch up front, so a batch split into micro-batches
        (gradient accumulation) sees exactly the noise of the unsplit batch.
        """
        return [
            torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            for _ in range(step)
        ]

    def train_sample(
        self,
        backbone,
        z: Tensor,
        cond,
        step: int,
        generator: torch.Generator | None = None,
        noises: list[Tensor] | None = None,
    ) -> Tensor:
        """x0 at ``timesteps[step]`` with gradient: the student's own first ``step`` steps
        run without gradient (DMD2's backward simulation), then one step with it.

        The re-noising draws come from ``noises`` (see :meth:`train_noises`) or
        ``generator``."""
        param = self.parametrization(backbone)
        x = z
        if step:
            if noises is None:
                noises = self.train_noises(step, z, generator)
            with torch.no_grad():
                for i in range(step):
                    x0 = self._x0(backbone, param, x, self.timesteps[i], cond)
                    ts = torch.full((z.shape[0],), self.timesteps[i + 1], device=z.device)
                    x = param.add_noise(x0.to(z.dtype), noises[i], ts)
        return self._x0(backbone, param, x, self.timesteps[step], cond)
