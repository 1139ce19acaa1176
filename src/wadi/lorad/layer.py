"""LoRaD layers: wrap a frozen ``nn.Linear`` or ``nn.Conv2d`` and hold named adapters.

A wrapper keeps the original layer as ``base_layer`` and any number of named
adapters, each a pair of angle factors ``lorad_A[name]`` (``out x r``, zeros)
and ``lorad_B[name]`` (``r x pairs``, Xavier-uniform).  One adapter is active
at a time; with none active, or inside :func:`wadi.lorad.disabled`, the
wrapper computes exactly the base layer.

Angle factors stay in at least float32 whatever dtype the model is cast to,
because angles of a few milliradians do not survive fp16/bf16.

Two opt-in speed knobs, both off by default because they cost memory:

- ``keep_angles``: a training forward keeps the rotated weight for backward
  (one weight-sized tensor per call, in the matmul dtype) instead of
  recomputing angles and rotation there.
- ``cache_rotation``: forwards that need no weight gradient (``torch.no_grad``
  or frozen factors) reuse the rotated weight while ``A``, ``B`` and the base
  weight are unchanged; one weight-sized tensor per layer while enabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as lf
from .functional import LoRaDConv2dFunction, LoRaDLinearFunction, angles, num_pairs, rotate_pairs

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the base layer's own matmul would run in (autocast aware)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class LoRaDLayer(nn.Module):
    """Common part of the LoRaD wrappers: adapter bookkeeping, merge, unmerge.

    ``keep_angles`` (default False): when True, a forward that needs
    gradients saves the rotated weight for backward, so backward skips
    ``A @ B``, cos/sin and the rotation; it keeps one weight-sized tensor (in
    the matmul dtype) alive per forward until its backward.  Off, nothing but
    the input, the base weight and the factors is kept.

    ``cache_rotation`` (default False, opt-in): see :meth:`rotated_for_inference`.
    """

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
        self.keep_angles = False
        self._cache_rotation = False
        self._rotation_cache: tuple | None = None  # (key, storages, rotated weight)

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
        self.clear_rotation_cache()
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

    # -- rotated weight without gradients --------------------------------------
    @property
    def cache_rotation(self) -> bool:
        """Whether no-grad forwards reuse the rotated weight (opt-in; False frees the cache)."""
        return self._cache_rotation

    @cache_rotation.setter
    def cache_rotation(self, enabled: bool) -> None:
        self._cache_rotation = bool(enabled)
        if not enabled:
            self._rotation_cache = None

    def clear_rotation_cache(self) -> None:
        """Drop the cached rotated weight (needed after writes through ``.data``, see below)."""
        self._rotation_cache = None

    def _weight_frozen(self, name: str) -> bool:
        """True when this forward needs no gradient for ``A``, ``B`` or the base weight."""
        if not torch.is_grad_enabled():
            return True
        tensors = (self.lorad_A[name], self.lorad_B[name], self.base_layer.weight)
        return not any(t.requires_grad for t in tensors)

    def rotated_for_inference(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The rotated weight of adapter ``name`` in ``dtype``, for a forward with no weight gradient.

        With ``cache_rotation`` on, the tensor is kept and returned again while
        the ``_version`` counters and storages of ``A``, ``B`` and the base
        weight, the adapter name, dtype and device are unchanged; so two no-grad
        passes between optimizer steps rotate once, and ``optimizer.step()``
        (an in-place update bumps ``_version``), ``load_state_dict``, merge and
        unmerge invalidate it.  Bounded: one tensor per layer (the latest
        key); disabling the cache, ``.to()``/``.half()``, merge, unmerge and
        ``delete_adapter`` free it.  Writes through ``param.data`` bypass the
        version counter: call :meth:`clear_rotation_cache` after them.
        Inference tensors have no version counter and are never cached.
        """
        a, b, w = self.lorad_A[name], self.lorad_B[name], self.base_layer.weight
        tensors = (a, b, w)
        if not self._cache_rotation or any(t.is_inference() for t in tensors):
            with torch.no_grad():
                return lf.rotated_weight(w, a, b, dtype)
        key = (name, dtype, w.device, tuple(w.shape))
        key += tuple(t._version for t in tensors) + tuple(t.data_ptr() for t in tensors)
        entry = self._rotation_cache
        if entry is not None and entry[0] == key:
            return entry[2]
        self._rotation_cache = None  # free the stale tensor before building its successor
        with torch.no_grad():
            rotated = lf.rotated_weight(w, a, b, dtype)
        # The storages are held so a freed address cannot come back under a new
        # tensor with the same version count and be mistaken for the old one.
        self._rotation_cache = (key, tuple(t.untyped_storage() for t in tensors), rotated)
        return rotated

    def _frozen_rotated(
        self, name: str, x: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The rotated weight when this forward can skip the autograd Function, else None.

        That is: no weight gradient is needed and either the cache is on (its
        tensor is kept anyway) or grad mode is off (nothing is kept at all).
        """
        if not self._weight_frozen(name):
            return None
        bias = self.base_layer.bias
        needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
        if not self._cache_rotation and torch.is_grad_enabled() and needs_grad:
            return None  # F.linear might keep a fresh rotated weight for backward
        return self.rotated_for_inference(name, dtype)

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
        self.clear_rotation_cache()
        w = self.base_layer.weight
        w.copy_(rotate_pairs(w, self.theta(name)))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Rotate the base weight back by ``-theta`` (exact up to rounding)."""
        if name not in self.merged_adapters:
            return
        self.clear_rotation_cache()
        w = self.base_layer.weight
        w.copy_(rotate_pairs(w, -self.theta(name)))
        self.merged_adapters.remove(name)

    def merged_weight(self, name: str) -> torch.Tensor:
        """The rotated weight of adapter ``name`` without touching the layer."""
        return rotate_pairs(self.base_layer.weight, self.theta(name))

    # -- dtype policy --------------------------------------------------------
    def _apply(self, fn, recurse=True):
        self.clear_rotation_cache()
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
        rotated = self._frozen_rotated(name, x, dtype)
        if rotated is not None:
            with lf._no_autocast(x):
                bias = base.bias.to(dtype) if base.bias is not None else None
                return F.linear(x.to(dtype), rotated, bias)
        return LoRaDLinearFunction.apply(
            x,
            base.weight,
            base.bias,
            self.lorad_A[name],
            self.lorad_B[name],
            dtype,
            self.keep_angles,
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
        rotated = self._frozen_rotated(name, x, dtype)
        if rotated is not None:
            with lf._no_autocast(x):
                bias = conv.bias.to(dtype) if conv.bias is not None else None
                args = (_int_pair(conv.stride), padding, _int_pair(conv.dilation), conv.groups)
                return F.conv2d(x.to(dtype), rotated, bias, *args)
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
            self.keep_angles,
        )


def wrap_layer(module: nn.Module) -> LoRaDLayer:
    """The LoRaD wrapper class for a supported layer type."""
    if isinstance(module, nn.Linear):
        return LoRaDLinear(module)
    if isinstance(module, nn.Conv2d):
        return LoRaDConv2d(module)
    raise TypeError(f"LoRaD supports nn.Linear and nn.Conv2d, not {type(module).__name__}")


def _layers(model: nn.Module) -> Iterator[LoRaDLayer]:
    return (m for m in model.modules() if isinstance(m, LoRaDLayer))


def set_keep_angles(model: nn.Module, enabled: bool = True) -> None:
    """Set ``keep_angles`` on every LoRaD layer of ``model`` (memory for backward time)."""
    for layer in _layers(model):
        layer.keep_angles = enabled


def set_rotation_cache(model: nn.Module, enabled: bool = True) -> None:
    """Turn the no-grad rotated-weight cache on or off (off frees it) on every LoRaD layer."""
    for layer in _layers(model):
        layer.cache_rotation = enabled


@contextlib.contextmanager
def rotation_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Cache rotated weights inside the block (e.g. one training iteration), free them after.

    The memory is bounded by the block: one weight-sized tensor per LoRaD
    layer that ran without gradients, released on exit (each layer's
    previous setting is restored).
    """
    layers = list(_layers(model))
    before = [layer.cache_rotation for layer in layers]
    for layer in layers:
        layer.cache_rotation = True
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.clear_rotation_cache()
            layer.cache_rotation = enabled


def trainable_count(out_features: int, fan_in: int, rank: int) -> int:
    """Trainable parameters of one LoRaD adapter: ``r * (out + in // 2)``."""
    return rank * (out_features + num_pairs(fan_in))


__all__ = [
    "LoRaDLayer",
    "LoRaDLinear",
    "LoRaDConv2d",
    "wrap_layer",
    "trainable_count",
    "set_keep_angles",
    "set_rotation_cache",
    "rotation_cache",
]
