"""How a denoiser's output relates to the clean sample, the noise and the noise level.

Every Gaussian noising path used by text-to-image models has the form
``x_t = alpha_t x0 + sigma_t eps`` for an integer step ``t`` in ``0..T-1``:

- discrete DDPM schedules (SD 1.x/2.x, SDXL, PixArt): ``alpha = sqrt(abar_t)``,
  ``sigma = sqrt(1 - abar_t)``; the network predicts ``eps``, ``v = alpha eps - sigma x0``
  or ``x0`` itself (``sample``);
- flow matching (SD3, FLUX): ``alpha = 1 - s_t``, ``sigma = s_t`` with ``s`` the (shifted)
  noise level in ``(0, 1]``; the network predicts the velocity ``v = eps - x0``.

A :class:`Parametrization` owns these relations (as the diffusers scheduler owns them for
sampling), so objectives, generators and export never assume eps/alpha_bar.  The losses
of VSD and DMD only need x0 and eps predictions and a per-step weight; for any path their
weights are stated through the variance-preserving equivalent ``abar = alpha^2 / (alpha^2 +
sigma^2)`` (an x_t rescaled by ``1/sqrt(alpha^2 + sigma^2)`` is a VP sample with that abar,
and eps and x0 predictions do not change under that rescaling).  For discrete schedules
this is exactly ``abar_t``, so the WaDi losses are unchanged.

All coefficients are computed in float64 and the arithmetic runs in at least float32:
``x0`` from a 16-bit eps at ``abar_T = 4e-5`` (PixArt) multiplies its rounding by
``1/sqrt(abar_T) = 157``, so the conversion must not round again in 16 bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Parametrization",
    "DiscreteParametrization",
    "FlowMatchingParametrization",
    "from_scheduler",
    "compute_dtype",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for 16-bit inputs, else the input's float dtype (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` float64 coefficients shaped to broadcast over ``like``, in its compute dtype."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    return values.to(device=like.device, dtype=compute_dtype(like)).reshape(shape)


class Parametrization:
    """The noising path and the denoiser's prediction target (see the module docstring)."""

    num_train_timesteps: int
    prediction_type: str

    # -- the path ----------------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` as float64 tensors of ``t``'s shape."""
        raise NotImplementedError

    def model_timestep(self, t: Tensor) -> Tensor:
        """What the denoiser receives as its timestep input for step ``t``."""
        raise NotImplementedError

    def _index(self, t, device=None) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point():
            t = t.round()
        t = t.to(torch.long)
        if ((t < 0) | (t >= self.num_train_timesteps)).any():
            raise ValueError(
                f"timesteps must lie in 0..{self.num_train_timesteps - 1}, got {t.tolist()}"
            )
        return t

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha_t x0 + sigma_t eps`` (in ``x0``'s dtype)."""
        alpha, sigma = self.alpha_sigma(self._index(t))
        a, s = _per_sample(alpha, x0), _per_sample(sigma, x0)
        return (a * x0.to(a.dtype) + s * eps.to(a.dtype)).to(x0.dtype)

    # -- predictions -------------------------------------------------------------------------
    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The clean sample the denoiser's ``output`` at ``x_t`` implies (float32 or wider)."""
        raise NotImplementedError

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise the denoiser's ``output`` at ``x_t`` implies (float32 or wider)."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the denoiser is trained to output at ``add_noise(x0, eps, t)`` (float32 or
        wider): the denoising loss's regression target in this parametrization."""
        raise NotImplementedError

    def eps_to_x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x0 = (x_t - sigma eps) / alpha`` for any path."""
        alpha, sigma = self.alpha_sigma(self._index(t))
        a, s = _per_sample(alpha, x_t), _per_sample(sigma, x_t)
        return (x_t.to(a.dtype) - s * eps.to(a.dtype)) / a

    # -- loss weights ------------------------------------------------------------------------
    def abar_equivalent(self, t: Tensor) -> Tensor:
        """The variance-preserving abar with the same signal-to-noise ratio (float64)."""
        alpha, sigma = self.alpha_sigma(self._index(t))
        return alpha**2 / (alpha**2 + sigma**2)

    def vsd_weight(self, t: Tensor) -> Tensor:
        """SwiftBrush/WaDi weight of ``eps_real - eps_fake``: ``1 - abar_t`` (float64)."""
        return 1.0 - self.abar_equivalent(t)

    def fake_weight(self, t: Tensor) -> Tensor:
        """Weight of the fake score's squared eps error: ``abar_t`` (float64)."""
        return self.abar_equivalent(t)

    # -- sampling of training steps ----------------------------------------------------------
    def sample_timesteps(
        self, batch: int, t_min: int, t_max: int, generator: torch.Generator, device
    ) -> Tensor:
        """Integer steps uniform on ``{t_min, ..., t_max}`` (both ends included)."""
        if not 0 <= t_min <= t_max < self.num_train_timesteps:
            raise ValueError(
                f"timestep range {t_min}..{t_max} must lie in 0..{self.num_train_timesteps - 1}"
            )
        return torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=device)


@dataclass(frozen=True, eq=False)
class DiscreteParametrization(Parametrization):
    """DDPM schedules: ``abar_t`` from the scheduler's ``alphas_cumprod`` (float64)."""

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        abar = torch.as_tensor(self.alphas_cumprod).to(torch.float64).cpu()
        if abar.ndim != 1 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1)")
        object.__setattr__(self, "alphas_cumprod", abar)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; expected one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )

    @property
    def num_train_timesteps(self) -> int:  # type: ignore[override]
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t) -> Tensor:
        return self.alphas_cumprod[self._index(t).cpu()]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t.cpu()]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def model_timestep(self, t: Tensor) -> Tensor:
        return self._index(t)

    def abar_equivalent(self, t: Tensor) -> Tensor:
        """Exactly the table's ``abar_t`` (float64)."""
        return self.alphas_cumprod[self._index(t).cpu()]

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``sqrt(abar) x0 + sqrt(1 - abar) eps`` with abar rounded to the compute dtype first
        (the order of operations WaDi's runs and checkpoints were made with)."""
        a = _per_sample(self.abar_equivalent(t), x0)
        return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)

    def with_alpha_bar(self, t: int, value: float) -> DiscreteParametrization:
        """A copy whose ``abar`` at step ``t`` is ``value`` (the paper's constant 0.0047 option)."""
        value = float(value)
        if not 0.0 < value < 1.0 or math.isnan(value):
            raise ValueError(f"alpha_bar_T must be in (0, 1), got {value!r}")
        table = self.alphas_cumprod.clone()
        table[int(t)] = value
        return DiscreteParametrization(table, self.prediction_type)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """eps, ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` or x0, by ``prediction_type``."""
        dtype = compute_dtype(x0)
        if self.prediction_type == "epsilon":
            return eps.to(dtype)
        if self.prediction_type == "sample":
            return x0.to(dtype)
        alpha, sigma = self.alpha_sigma(self._index(t))
        a, s = _per_sample(alpha, x0), _per_sample(sigma, x0)
        return a * eps.to(dtype) - s * x0.to(dtype)

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        t = self._index(t)
        alpha, sigma = self.alpha_sigma(t)
        a, s = _per_sample(alpha, x_t), _per_sample(sigma, x_t)
        out, x = output.to(a.dtype), x_t.to(a.dtype)
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            return a * out + s * x
        return (x - a * out) / s

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        t = self._index(t)
        alpha, sigma = self.alpha_sigma(t)
        a, s = _per_sample(alpha, x_t), _per_sample(sigma, x_t)
        out, x = output.to(a.dtype), x_t.to(a.dtype)
        if self.prediction_type == "epsilon":
            return (x - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x - s * out
        return out


def flow_sigmas(num_train_timesteps: int, shift: float = 1.0) -> Tensor:
    """Noise levels ``s_t`` of step ``t = 0..T-1`` as diffusers' flow-matching scheduler has them.

    ``s = (t + 1) / T`` shifted by ``shift s / (1 + (shift - 1) s)`` (SD3: shift 3.0), so
    ``s_{T-1} = 1`` is pure noise.
    """
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True, eq=False)
class FlowMatchingParametrization(Parametrization):
    """Rectified flow: ``x_t = (1 - s) x0 + s eps``, the network predicts ``v = eps - x0``."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction_type: str = "flow"

    def __post_init__(self) -> None:
        if int(self.num_train_timesteps) < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        object.__setattr__(self, "_sigmas", flow_sigmas(self.num_train_timesteps, self.shift))

    @property
    def sigmas(self) -> Tensor:
        return self._sigmas  # type: ignore[attr-defined]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.sigmas[t.cpu()]
        return 1.0 - s, s

    def model_timestep(self, t: Tensor) -> Tensor:
        """diffusers' flow transformers take ``s * T`` as a float timestep."""
        t = self._index(t)
        return (self.sigmas[t.cpu()] * self.num_train_timesteps).to(t.device, torch.float32)

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        _, sigma = self.alpha_sigma(self._index(t))
        s = _per_sample(sigma, x_t)
        return x_t.to(s.dtype) - s * output.to(s.dtype)

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha, _ = self.alpha_sigma(self._index(t))
        a = _per_sample(alpha, x_t)
        return x_t.to(a.dtype) + a * output.to(a.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity ``v = eps - x0`` (the same at every level)."""
        self._index(t)  # a step outside the schedule is refused here too
        dtype = compute_dtype(x0)
        return eps.to(dtype) - x0.to(dtype)


def from_scheduler(scheduler) -> Parametrization:
    """The parametrization a diffusers scheduler trains and samples with.

    DDPM-family schedulers (``alphas_cumprod``) give :class:`DiscreteParametrization` with
    the config's ``prediction_type``; flow-matching ones give
    :class:`FlowMatchingParametrization` with their ``shift``.
    """
    config = dict(getattr(scheduler, "config", {}) or {})
    name = type(scheduler).__name__
    if "FlowMatch" in name:
        # FLUX's dynamic shifting depends on the image size: its backbone builds its own
        shift = float(config.get("shift", 1.0))
        return FlowMatchingParametrization(int(config.get("num_train_timesteps", 1000)), shift)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(
            f"scheduler {name} has neither alphas_cumprod nor a flow-matching schedule; "
            "wadi supports DDPM-family and flow-matching teachers"
        )
    return DiscreteParametrization(
        torch.as_tensor(abar), config.get("prediction_type", "epsilon") or "epsilon"
    )
