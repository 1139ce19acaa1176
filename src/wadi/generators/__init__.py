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

from .base import Generator, make_generator
from .multistep import MultiStep
from .onestep import OneStep

__all__ = ["Generator", "MultiStep", "OneStep", "make_generator"]
