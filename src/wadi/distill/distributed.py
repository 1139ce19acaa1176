"""The few collectives a run needs: world size, barrier, gradient mean, agreement.

No DDP wrapper: two adapters on one module and two backward passes per iteration
would need ``find_unused_parameters`` and careful ``no_sync``; one flat all-reduce
of the adapter gradients per optimizer step is simpler and exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["world_size", "barrier", "average_gradients", "all_true"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over processes with one flat all-reduce (missing grads count as 0)."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def all_true(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every process."""
    if world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0
