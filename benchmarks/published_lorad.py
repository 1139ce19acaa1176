"""The published scripts' LoRaD, re-created as the benchmarks' baseline (method.md section 7).

A forward hook on the original ``nn.Linear``: the layer's own matmul has already run and
is thrown away; the hook builds the rotated weight with autograd (so cos, sin and the
rotated weight stay alive until backward) and runs the matmul again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def add_hook_lorad(layer: nn.Linear, rank: int) -> list[nn.Parameter]:
    """Attach the hook adapter to ``layer``; returns its two trainable factors."""
    out_f, in_f = layer.weight.shape
    layer.lorad_A = nn.Parameter(torch.zeros(out_f, rank, device=layer.weight.device))
    layer.lorad_B = nn.Parameter(torch.empty(rank, in_f // 2, device=layer.weight.device))
    nn.init.xavier_uniform_(layer.lorad_B)

    def hook(module, args, output):
        (x,) = args
        theta = module.lorad_A @ module.lorad_B
        theta = torch.remainder(theta + torch.pi, 2 * torch.pi) - torch.pi
        cos, sin = torch.cos(theta), torch.sin(theta)
        w = module.weight.float()
        w0, w1 = w[:, 0::2], w[:, 1::2]
        rotated = torch.stack((w0 * cos - w1 * sin, w0 * sin + w1 * cos), dim=-1).flatten(1)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, rotated.to(x.dtype), bias)

    layer.register_forward_hook(hook)
    return [layer.lorad_A, layer.lorad_B]
