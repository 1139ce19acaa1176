"""The paper's one-step generator (method.md section 3).

``x0 = to_x0(model(z, T), z, T)`` from pure noise ``z`` at the fixed step ``T`` (999):
for eps prediction ``(z - sqrt(1 - abar_T) eps) / sqrt(abar_T)``, for flow matching
``z - v(z, 1)``.  With ``abar_T`` from the teacher's scheduler this is one step of a DDIM
scheduler with trailing spacing, which is what makes the exported pipeline reproduce it.
"""

from __future__ import annotations

from .base import Generator

__all__ = ["OneStep"]


class OneStep(Generator):
    """One network call from pure noise at ``timestep``."""

    kind = "one-step"

    def __init__(self, timestep: int = 999, alpha_bar_T: float | None = None):
        super().__init__([timestep], alpha_bar_T)

    @property
    def timestep(self) -> int:
        return self.timesteps[0]
