"""LoRaD layers: wrap a frozen ``nn.Linear`` or ``nn.Conv2d`` and hold named adapters.

A wrapper keeps the original layer as ``base_layer`` and any number of named
adapters, each a pair of angle factors ``lorad_A[name]`` (``out x r``, zeros)
and ``lorad_B[name]`` (``r x pairs``, Xavier-uniform).  One adapter is active
at a time; with none active, or inside :func:`wadi.lorad.disabled`, the
wrapper computes exactly the base layer.

Angle factors stay in at least float32 whatever dtype the model is cast to,
because angles of a few milliradians do not survive fp16/bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import LoRaDConv2dFunction, LoRaDLinearFunction, angles, num_pairs, rotate_pairs

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the base layer's own matmul would run in (autocast aware)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class LoRaDLayer(nn.Module):
    """Common part of the LoRaD wrappers: adapter bookkeeping, merge, unmerge."""

    adapter_layer_names = ("lorad_A", "lorad_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lorad_A = nn.ParameterDict()
        self.lorad_B = nn.ParameterDict()
        self.rank: dict[str, int] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    # -- shape of the rotated weight -------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def fan_in(self) -> int:
        return self.base_layer.weight[0].numel()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lorad_A.keys())

    # -- adapters ----------------------------------------------------------
    def add_adapter(self, name: str, rank: int) -> None:
        """Add adapter ``name``: identity at start (``A = 0``), trainable factors."""
        if name in self.lorad_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        pairs = num_pairs(self.fan_in)
        if pairs == 0:
            raise ValueError("a LoRaD layer needs at least 2 input elements per output")
        device = self.base_layer.weight.device
        dtype = torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32
        if device.type == "meta":
            lorad_A = torch.empty(self.out_features, rank, device=device, dtype=dtype)
            lorad_B = torch.empty(rank, pairs, device=device, dtype=dtype)
        else:
            lorad_A = torch.zeros(self.out_features, rank, device=device, dtype=dtype)
            lorad_B = torch.empty(rank, pairs, device=device, dtype=dtype)
            nn.init.xavier_uniform_(lorad_B)
        self.lorad_A[name] = nn.Parameter(lorad_A)
        self.lorad_B[name] = nn.Parameter(lorad_B)
        self.rank[name] = rank

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.lorad_A[name]
        del self.lorad_B[name]
        del self.rank[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def theta(self, name: str) -> torch.Tensor:
        """The angles ``A @ B`` of adapter ``name`` (``out x pairs``, float32+)."""
        return angles(self.lorad_A[name], self.lorad_B[name])

    def _uses_adapter(self) -> str | None:
        name = self.active_adapter
        if self.adapters_disabled or name is None or name in self.merged_adapters:
            if self.adapters_disabled and self.merged_adapters:
                raise RuntimeError(
                    f"adapters {self.merged_adapters} are merged into the base weight, so the "
                    "base model cannot be computed; unmerge them first"
                )
            return None
        if self.merged_adapters:
            raise RuntimeError(
                f"adapter {self.merged_adapters} is merged and {name!r} is active; "
                "unmerge first or make the merged adapter active"
            )
        return name

    # -- merge -------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Write adapter ``name``'s rotation into the base weight."""
        if name in self.merged_adapters:
            return
        if self.merged_adapters:
            raise RuntimeError(
                f"{self.merged_adapters} already merged; one merged adapter at a time"
            )
        w = self.base_layer.weight
        w.copy_(rotate_pairs(w, self.theta(name)))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Rotate the base weight back by ``-theta`` (exact up to rounding)."""
        if name not in self.merged_adapters:
            return
        w = self.base_layer.weight
        w.copy_(rotate_pairs(w, -self.theta(name)))
        self.merged_adapters.remove(name)

    def merged_weight(self, name: str) -> torch.Tensor:
        """The rotated weight of adapter ``name`` without touching the layer."""
        return rotate_pairs(self.base_layer.weight, self.theta(name))

    # -- dtype policy --------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for params in (self.lorad_A, self.lorad_B):
            for p in params.values():
                if p.dtype in _LOW_PRECISION:
                    p.data = p.data.float()
        return self

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{k}: r={v}" for k, v in self.rank.items())
        return f"adapters=({ranks}), active={self.active_adapter!r}"


class LoRaDLinear(LoRaDLayer):
    """``nn.Linear`` whose weight rows are rotated pairwise by the active adapter."""

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRaDLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._uses_adapter()
        if name is None:
            return self.base_layer(x)
        base = self.base_layer
        dtype = _matmul_dtype(x, base.weight)
        return LoRaDLinearFunction.apply(
            x, base.weight, base.bias, self.lorad_A[name], self.lorad_B[name], dtype
        )


def _int_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class LoRaDConv2d(LoRaDLayer):
    """``nn.Conv2d``: each output channel's flattened kernel is rotated pairwise.

    Grouped and non-square kernels work; the norm of every output channel's
    kernel is preserved.  ``padding="same"`` is supported by explicit padding.
    """

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"LoRaDConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    def _explicit_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        conv = self.base_layer
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                return x, (0, 0)
            # "same" (stride 1): total padding dilation * (k - 1), extra on the right
            pads = []
            for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            return F.pad(x, pads, mode=mode), (0, 0)
        padding = _int_pair(padding)
        if conv.padding_mode != "zeros":
            pads = [padding[1], padding[1], padding[0], padding[0]]
            return F.pad(x, pads, mode=conv.padding_mode), (0, 0)
        return x, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._uses_adapter()
        if name is None:
            return self.base_layer(x)
        conv = self.base_layer
        x, padding = self._explicit_padding(x)
        dtype = _matmul_dtype(x, conv.weight)
        return LoRaDConv2dFunction.apply(
            x,
            conv.weight,
            conv.bias,
            self.lorad_A[name],
            self.lorad_B[name],
            dtype,
            _int_pair(conv.stride),
            padding,
            _int_pair(conv.dilation),
            conv.groups,
        )


def wrap_layer(module: nn.Module) -> LoRaDLayer:
    """The LoRaD wrapper class for a supported layer type."""
    if isinstance(module, nn.Linear):
        return LoRaDLinear(module)
    if isinstance(module, nn.Conv2d):
        return LoRaDConv2d(module)
    raise TypeError(f"LoRaD supports nn.Linear and nn.Conv2d, not {type(module).__name__}")


def trainable_count(out_features: int, fan_in: int, rank: int) -> int:
    """Trainable parameters of one LoRaD adapter: ``r * (out + in // 2)``."""
    return rank * (out_features + num_pairs(fan_in))


__all__ = ["LoRaDLayer", "LoRaDLinear", "LoRaDConv2d", "wrap_layer", "trainable_count"]
