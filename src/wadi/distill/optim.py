"""One optimizer step of one trained part (student, fake score): accumulate, average, clip, step.

:class:`OptimizerStep` is what the loop holds per trained part, in a dict keyed by
name; checkpoints and logging iterate over that dict, so a third trained part (a GAN
head) needs no new code there.
"""

from __future__ import annotations

import torch

from . import checkpoint as ckpt
from .distributed import all_true, average_gradients

__all__ = ["OptimizerStep", "make_optimizer", "lr_factor"]


def make_optimizer(params, lr: float, config) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=lr, betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay
    )
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "optimizer adamw8bit needs bitsandbytes; `pip install bitsandbytes` or use --optimizer adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up, then constant (the paper: constant)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class OptimizerStep:
    """An optimizer with its parameters, grad scaler and skip bookkeeping.

    ``backward(loss, role)`` may be called several times (gradient accumulation: pass
    each micro-batch's share of the loss); ``step(step)`` then averages over processes,
    unscales, clips, steps and clears.  A non-finite micro-batch loss makes the whole
    step a skip on every process.
    """

    def __init__(self, name: str, params, lr: float, config, device):
        self.name, self.params, self.base_lr = name, list(params), lr
        self.optimizer = make_optimizer(self.params, lr, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
        self.max_grad_norm = config.max_grad_norm
        self.warmup_steps = config.warmup_steps
        self.device = device
        self._finite = True

    def backward(self, loss: torch.Tensor, role) -> bool:
        """Backward of ``loss`` inside ``role`` (so recomputation sees the right adapter)."""
        if not all_true(bool(torch.isfinite(loss)), self.device):
            self._finite = False
            return False
        if self._finite:
            with role():
                self.scaler.scale(loss).backward()
        return self._finite

    def step(self, step: int) -> tuple[bool, float]:
        """Apply the accumulated gradients.  Returns (applied, grad norm)."""
        if not self._finite:
            self._finite = True
            self.optimizer.zero_grad(set_to_none=True)
            return False, float("nan")
        average_gradients(self.params)  # before unscale: every process then sees the same inf/nan
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        finite = bool(torch.isfinite(norm))
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * lr_factor(step, self.warmup_steps)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the fp16 scaler itself skips inf/nan steps
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, float(norm)

    def run(self, loss: torch.Tensor, role, step: int) -> tuple[bool, float]:
        """``backward`` then ``step`` (no accumulation)."""
        self.backward(loss, role)
        return self.step(step)

    def optimizer_files(self):
        return ckpt.optimizer_to_files(self.optimizer)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
