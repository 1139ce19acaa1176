"""DMD2's few-step student: predict x0, re-noise to the next step, repeat.

At inference this is what diffusers' ``LCMScheduler`` does with custom ``timesteps``
(its boundary-condition scalings are within 3e-9 of the identity at these steps), so
the export is a stock pipeline with that scheduler.  Training uses backward
simulation (:meth:`Generator.train_sample`): the student's own first k steps without
gradient, then step k with it, k uniform per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Generator

__all__ = ["MultiStep"]


class MultiStep(Generator):
    """x0 prediction at each of ``timesteps`` (e.g. 999, 749, 499, 249)."""

    kind = "multi-step"

    def __init__(self, timesteps: Sequence[int], alpha_bar_T: float | None = None):
        super().__init__(timesteps, alpha_bar_T)
