"""Distillation objectives with one call shape (EDM's loss classes are the model).

The loop computes the student sample ``x0``, the noised ``x_t`` at step ``t`` and the
teacher's and fake score's guided eps predictions there, then asks the objective for
the generator loss; the fake score's denoising loss is the objective's too.  A new
objective is one new file here plus one line in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from .base import Objective
from .dmd import DMD
from .vsd import VSD

__all__ = ["Objective", "VSD", "DMD", "OBJECTIVES", "make_objective"]

#: name (config ``objective``) -> class
OBJECTIVES: dict[str, type[Objective]] = {"vsd": VSD, "dmd": DMD}


def make_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()
