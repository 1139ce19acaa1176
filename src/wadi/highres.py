"""Above-native-resolution sampling by re-dilation (ScaleCrafter, He et al., ICLR 2024).

A U-Net trained at side ``n`` sampled at side ``s * n`` repeats objects: its convolutions
see a ``1/s`` smaller part of the (larger) picture.  ScaleCrafter widens the receptive
field of the convolutions in the deepest blocks, without retraining, by sampling the
same kernel dilated by ``s`` (padding ``s * (k // 2)``, so the spatial size is kept).

:func:`redilate` does this as a context manager over any module tree that holds
``nn.Conv2d`` layers (a diffusers ``UNet2DConditionModel``, an SDXL U-Net, a ControlNet,
a LoRaD-wrapped one: the wrapper reads its base convolution's ``dilation`` and
``padding`` at call time).  Only ``dilation`` and ``padding`` are changed, and for a
fractional scale a pair of forward hooks is added; all of it is undone on exit, also
when the body raises, so the model afterwards is the untouched one bit for bit.

Fractional scales (e.g. 1.5x) follow ScaleCrafter's own rule: dilation ``ceil(s)`` on a
feature map resized (bilinear) by ``ceil(s) / s`` before the convolution and back to its
size after it.  Integer scales need no resizing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch.nn.functional as F
from torch import nn

__all__ = [
    "redilate",
    "redilation",
    "auto_blocks",
    "parse_blocks",
    "redilated_convs",
    "native_resolution",
]


def _levels(unet: nn.Module) -> int:
    blocks = getattr(unet, "down_blocks", None)
    if blocks is None:
        raise ValueError(
            f"{type(unet).__name__} has no down_blocks: re-dilation needs a U-Net denoiser "
            "(UNet2DConditionModel); DiT/PixArt backbones have no convolutions to re-dilate"
        )
    return len(blocks)


def auto_blocks(unet: nn.Module) -> list[str]:
    """ScaleCrafter's choice scaled to the model's depth: the deepest quarter of the levels.

    Its SD 1.5 setting at 2x (1024 px) re-dilates ``down_blocks.3``, ``mid_block`` and
    ``up_blocks.0``: the deepest of four resolution levels.  A U-Net with ``n`` levels gets
    its deepest ``ceil(n / 4)`` down blocks, the mid block and the matching up blocks
    (2 levels, the digits teacher: ``down_blocks.1, mid_block, up_blocks.0``).
    """
    n = _levels(unet)
    deep = max(1, math.ceil(n / 4))
    names = [f"down_blocks.{i}" for i in range(n - deep, n)]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(deep)]
    return names


def parse_blocks(spec: str | Sequence[str] | None, unet: nn.Module) -> dict[str, float | None]:
    """``{block name: dilation override or None}`` from ``"auto"``, a comma list or a list.

    An entry is a module name of ``unet`` (``down_blocks.2``, ``mid_block``,
    ``up_blocks.0.resnets.1``), optionally ``NAME:D`` to give that block its own dilation
    (ScaleCrafter's per-layer settings); unknown names are refused with the valid ones.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        entries = auto_blocks(unet)
    elif isinstance(spec, str):
        entries = [e.strip() for e in spec.split(",") if e.strip()]
    else:
        entries = [str(e).strip() for e in spec]
    if not entries:
        raise ValueError("--redilate: no blocks given; use auto or e.g. down_blocks.1,mid_block")
    modules = dict(unet.named_modules())
    blocks: dict[str, float | None] = {}
    for entry in entries:
        name, _, value = entry.partition(":")
        name = name.strip()
        if name not in modules or not name:
            top = [n for n in modules if n == "mid_block" or (n.count(".") == 1 and "blocks." in n)]
            raise ValueError(
                f"--redilate: {type(unet).__name__} has no block {name!r}; use auto or names "
                f"such as {', '.join(top[:8])}"
            )
        override = None
        if value:
            try:
                override = float(value)
            except ValueError:
                raise ValueError(
                    f"--redilate: dilation in {entry!r} is not a number; write NAME:2"
                ) from None
            _check_scale(override)
        blocks[name] = override
    return blocks


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale < 1.0:
        raise ValueError(
            f"re-dilation scale must be >= 1 (target resolution / native), got {scale:g}; "
            "sample at or above the model's native resolution"
        )
    return scale


def native_resolution(unet: nn.Module, vae_scale_factor: int = 1) -> int:
    """The side in pixels the U-Net was trained at: ``sample_size * vae_scale_factor``."""
    size = unet.config.sample_size
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) * int(vae_scale_factor)


def redilated_convs(unet: nn.Module, blocks: dict[str, float | None], scale: float):
    """``[(name, conv, dilation)]`` for every ``k x k`` (k > 1) ``nn.Conv2d`` under ``blocks``.

    1x1 convolutions (shortcuts, projections) see one pixel at any dilation and are left
    alone; a conv under two named blocks takes the innermost block's dilation.
    """
    found: dict[str, tuple[nn.Conv2d, float]] = {}
    for block in sorted(blocks, key=len):  # inner names last: they override outer ones
        dilation = scale if blocks[block] is None else blocks[block]
        module = unet.get_submodule(block)
        for sub, conv in module.named_modules():
            if isinstance(conv, nn.Conv2d) and max(conv.kernel_size) > 1:
                if isinstance(conv.padding, str):
                    raise ValueError(
                        f"{block}.{sub}: padding={conv.padding!r} cannot be re-dilated; "
                        "only numeric padding is supported"
                    )
                found[f"{block}.{sub}" if sub else block] = (conv, dilation)
    order = {name: i for i, (name, _) in enumerate(unet.named_modules())}
    return [
        (name, conv, d) for name, (conv, d) in sorted(found.items(), key=lambda kv: order[kv[0]])
    ]


def _resize_hooks(conv: nn.Conv2d, factor: float):
    """Forward hooks: resize the input by ``factor`` and the output back to its own size."""
    sizes = []

    def pre(module, args):
        x = args[0]
        sizes.append(x.shape[-2:])
        h, w = (max(1, round(n * factor)) for n in x.shape[-2:])
        return (F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False), *args[1:])

    def post(module, args, output):
        h, w = sizes.pop()
        stride = module.stride
        size = (math.ceil(h / stride[0]), math.ceil(w / stride[1]))
        return F.interpolate(output, size=size, mode="bilinear", align_corners=False)

    return conv.register_forward_pre_hook(pre), conv.register_forward_hook(post)


@contextmanager
def redilate(
    unet: nn.Module, scale: float, blocks: str | Sequence[str] | None = "auto"
) -> Iterator[list[str]]:
    """Re-dilate the ``k x k`` convolutions of ``blocks`` by ``scale`` inside the ``with``.

    ``scale`` = target side / native side (2.0 for 32 px from a 16 px model); ``blocks``
    as :func:`parse_blocks` (``"auto"``: :func:`auto_blocks`).  Yields the names of the
    convolutions changed.  Scale 1 with no per-block override changes nothing.  Every
    ``dilation``/``padding`` is restored (the very same objects) and every hook removed
    on exit, exception or not.
    """
    scale = _check_scale(scale)
    chosen = parse_blocks(blocks, unet)
    convs = redilated_convs(unet, chosen, scale)
    saved = []
    handles = []
    try:
        for _, conv, dilation in convs:
            saved.append((conv, conv.dilation, conv.padding))
            if dilation == 1.0:
                continue
            whole = math.ceil(dilation - 1e-9)
            conv.dilation = (whole, whole)
            conv.padding = tuple(whole * (k // 2) for k in conv.kernel_size)
            if abs(whole - dilation) > 1e-9:  # fractional: ScaleCrafter's resize around it
                handles.extend(_resize_hooks(conv, whole / dilation))
        yield [name for name, _, d in convs if d != 1.0]
    finally:
        for handle in handles:
            handle.remove()
        for conv, dilation, padding in saved:
            conv.dilation = dilation
            conv.padding = padding


def redilation(unet: nn.Module, resolution: int | None, vae_scale_factor: int, spec: str | None):
    """The context ``wadi generate --resolution R --redilate SPEC`` samples in.

    ``spec`` None: nothing changes.  Otherwise the scale is ``R`` over the U-Net's native
    side (``sample_size`` latents times the VAE factor).
    """
    if spec is None:
        return nullcontext([])
    native = native_resolution(unet, vae_scale_factor)
    if resolution is None:
        raise ValueError(
            f"--redilate needs --resolution above the model's native {native} px "
            f"(e.g. --resolution {2 * native})"
        )
    if resolution < native:
        raise ValueError(
            f"--redilate: --resolution {resolution} is below the model's native {native} px; "
            "re-dilation is for sampling above it"
        )
    return redilate(unet, resolution / native, spec)
