"""How a student turns noise into a sample: the one call site for "the student samples".

Training, validation, the demo, ablations, ``wadi generate``, evaluation and export all
go through a :class:`Generator`, so a new sampling scheme is one new file here.

- :class:`OneStep` (``onestep.py``): one network call from pure noise at step ``t``
  (the paper: 999), optionally with the paper's constant ``abar_T``.
- :class:`MultiStep` (``multistep.py``): DMD2's few-step student: x0 prediction at each of
  a few steps, re-noised to the next with fresh noise (``LCMScheduler`` with custom
  timesteps in a stock pipeline); trained by backward simulation.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Generator
from .multistep import MultiStep
from .onestep import OneStep

__all__ = ["Generator", "MultiStep", "OneStep", "make_generator"]


def make_generator(timesteps: Sequence[int] | int, alpha_bar_T: float | None = None) -> Generator:
    """:class:`OneStep` for one timestep, :class:`MultiStep` for several."""
    if isinstance(timesteps, int):
        timesteps = [timesteps]
    timesteps = list(timesteps)
    if len(timesteps) == 1:
        return OneStep(timesteps[0], alpha_bar_T)
    return MultiStep(timesteps, alpha_bar_T)
