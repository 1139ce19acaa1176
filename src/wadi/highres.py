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

:func:`disperse` is ScaleCrafter's *dispersed convolution*: each ``k x k`` kernel of the
chosen blocks is replaced, inside the ``with``, by a larger ``k' x k'`` kernel
``R @ vec(kernel)``.  ``R`` (:func:`dispersion_transform`) is one fixed linear map per
``(k, k', scale, eta)``, solved in float64 by least squares from ScaleCrafter's two
calibrations: *structure level*, the large kernel on a bilinearly ``scale``-upsampled
input equals the upsampled output of the small kernel on the input; *pixel level*
(weighted by ``eta``), the large kernel on the input itself stays the small one.
:func:`redilation` (``wadi generate --redilate/--disperse``) combines the two the way
ScaleCrafter does: a dispersed convolution covers a factor 2 by dispersion and the rest
(``scale / 2``) by dilation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "redilate",
    "disperse",
    "dispersion_transform",
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


def parse_blocks(
    spec: str | Sequence[str] | None, unet: nn.Module, flag: str = "--redilate"
) -> dict[str, float | None]:
    """``{block name: dilation override or None}`` from ``"auto"``, a comma list or a list.

    An entry is a module name of ``unet`` (``down_blocks.2``, ``mid_block``,
    ``up_blocks.0.resnets.1``), optionally ``NAME:D`` to give that block its own dilation
    (ScaleCrafter's per-layer settings); unknown names are refused with the valid ones.
    ``flag`` names the option in the error messages.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        entries = auto_blocks(unet)
    elif isinstance(spec, str):
        entries = [e.strip() for e in spec.split(",") if e.strip()]
    else:
        entries = [str(e).strip() for e in spec]
    if not entries:
        raise ValueError(f"{flag}: no blocks given; use auto or e.g. down_blocks.1,mid_block")
    modules = dict(unet.named_modules())
    blocks: dict[str, float | None] = {}
    for entry in entries:
        name, _, value = entry.partition(":")
        name = name.strip()
        if name not in modules or not name:
            top = [n for n in modules if n == "mid_block" or (n.count(".") == 1 and "blocks." in n)]
            raise ValueError(
                f"{flag}: {type(unet).__name__} has no block {name!r}; use auto or names "
                f"such as {', '.join(top[:8])}"
            )
        override = None
        if value:
            try:
                override = float(value)
            except ValueError:
                raise ValueError(
                    f"{flag}: the factor in {entry!r} is not a number; write NAME:2"
                ) from None
            _check_scale(override, flag)
        blocks[name] = override
    return blocks


def _check_scale(scale: float, what: str = "re-dilation") -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale < 1.0:
        raise ValueError(
            f"{what} scale must be >= 1 (target resolution / native), got {scale:g}; "
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


def _check_kernel_sizes(small: int, large: int) -> None:
    for name, k in (("kernel size", small), ("kernel_size", large)):
        if int(k) != k or k < 1 or k % 2 == 0:
            raise ValueError(f"--disperse: {name} must be an odd positive integer, got {k}")
    if large < small:
        raise ValueError(
            f"--disperse: kernel_size={large} is smaller than the {small}x{small} kernels "
            f"it replaces; give kernel_size >= {small} (ScaleCrafter: 5 for 3x3)"
        )


def _check_eta(eta: float) -> None:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(
            f"--disperse: eta must be a positive number (pixel-level weight), got {eta}; "
            "ScaleCrafter uses 0.05"
        )


def _upsample_matrix(n: int, scale: float) -> np.ndarray:
    """``(m, n)`` float64 bilinear (1-D linear) upsampling by ``scale``, corners aligned.

    Output sample ``i`` sits at input coordinate ``i / scale``, ``i = 0 .. (n-1)*scale``
    (ScaleCrafter's ``bilinear_upsample_symbolic``: ``m = scale * (n - 1) + 1`` for an
    integer scale); a fractional scale keeps the exact spacing ``1 / scale``.
    """
    m = int(math.floor((n - 1) * scale + 1e-9)) + 1
    up = np.zeros((m, n))
    for i in range(m):
        pos = min(i / scale, n - 1.0)
        lo = int(math.floor(pos + 1e-12))
        frac = pos - lo
        up[i, lo] += 1.0 - frac
        if frac > 1e-12:
            up[i, lo + 1] += frac
    return up


def _taps(size: int, k: int) -> list[np.ndarray]:
    """``(size, size)`` shifts, one per tap ``t`` of a ``k``-tap cross-correlation with
    zero padding ``k // 2``: ``(S_t x)[o] = x[o + t - k // 2]`` (0 outside)."""
    return [np.eye(size, k=t - k // 2) for t in range(k)]


def _frobenius(left: list[np.ndarray], right: list[np.ndarray]) -> np.ndarray:
    return np.array([[np.sum(a * b) for b in right] for a in left])


@functools.lru_cache(maxsize=32)
def _solve_dispersion(small: int, large: int, scale: float, eta: float, n: int) -> np.ndarray:
    # Each equation is one (input pixel, output pixel) pair: the coefficient of input
    # pixel i in output pixel o (ScaleCrafter's MATLAB differentiates the error by each
    # input).  Summed over all of them, a squared error is the Frobenius norm of the
    # difference of two linear operators, and all of them are Kronecker products of
    # 1-D ones (bilinear = linear x linear, a one-hot k x k kernel = row tap x column
    # tap), so the normal equations are built from 1-D Frobenius products:
    #   structure  K' * up(x) - up(K * x):   taps_m(K') U   vs   U taps_n(K)
    #   pixel      K' * x     - K * x:       taps_n(K')     vs   taps_n(K)
    up = _upsample_matrix(n, scale)
    m = up.shape[0]
    struct_big = [tap @ up for tap in _taps(m, large)]
    struct_small = [up @ tap for tap in _taps(n, small)]
    pixel_big, pixel_small = _taps(n, large), _taps(n, small)
    gs, cs = _frobenius(struct_big, struct_big), _frobenius(struct_big, struct_small)
    gp, cp = _frobenius(pixel_big, pixel_big), _frobenius(pixel_big, pixel_small)
    gram = np.kron(gs, gs) + eta * eta * np.kron(gp, gp)
    cross = np.kron(cs, cs) + eta * eta * np.kron(cp, cp)
    transform = np.linalg.solve(gram, cross)
    transform.setflags(write=False)
    return transform


def dispersion_transform(
    kernel_size: int,
    large_size: int = 5,
    scale: float = 2.0,
    eta: float = 0.05,
    input_size: int | None = None,
) -> torch.Tensor:
    """ScaleCrafter's dispersion ``R``: ``(large_size**2, kernel_size**2)`` float64.

    ``vec(K') = R @ vec(K)`` (row-major) is the ``large_size`` kernel that minimises,
    over every ``input_size x input_size`` input (equivalently: over the impulses that
    span them, so the fit is exact, not sampled), with zero padding as in the U-Net::

        || K' * up_s(x) - up_s(K * x) ||^2  +  eta^2 || K' * x - K * x ||^2

    (structure level: the enlarged kernel on the ``scale``-upsampled input gives the
    upsampled output; pixel level: on the input itself it stays the original kernel;
    ``up_s`` bilinear with aligned corners as in ScaleCrafter's MATLAB solver).  Solved
    once per ``(kernel_size, large_size, scale, eta, input_size)`` through the normal
    equations in float64 and cached.  ``input_size`` defaults to
    ``max(7, large_size + 2)`` (ScaleCrafter: 7 for 3 -> 5).  At scale 1 the answer is
    the zero-padded kernel; as ``eta -> 0`` on a large input it tends to the kernel
    dilated by ``scale`` (exact at the structure level away from the border).
    """
    _check_kernel_sizes(kernel_size, large_size)
    scale = _check_scale(scale, "dispersion")
    _check_eta(eta)
    n = max(7, large_size + 2) if input_size is None else int(input_size)
    if n < large_size:
        raise ValueError(f"--disperse: input_size {n} is smaller than kernel_size {large_size}")
    return torch.from_numpy(
        _solve_dispersion(int(kernel_size), int(large_size), scale, float(eta), n).copy()
    )


def _dispersed_weight(conv: nn.Conv2d, transform: torch.Tensor, large: int) -> torch.Tensor:
    weight = conv.weight.detach()
    out, cin, kh, kw = weight.shape
    flat = weight.reshape(out, cin, kh * kw).to(torch.float64)
    big = flat @ transform.to(weight.device).T
    return big.reshape(out, cin, large, large).to(weight.dtype)


@contextmanager
def disperse(
    unet: nn.Module,
    scale: float,
    blocks: str | Sequence[str] | None = "auto",
    kernel_size: int = 5,
    eta: float = 0.05,
) -> Iterator[list[str]]:
    """Dispersed convolutions (ScaleCrafter) in ``blocks`` inside the ``with``.

    Every ``k x k`` (k > 1) ``nn.Conv2d`` under ``blocks`` (selected as in
    :func:`redilate`, ``NAME:F`` for a block's own factor) gets the ``kernel_size``
    kernel ``R @ vec(kernel)`` of :func:`dispersion_transform` at ``scale`` (bias
    unchanged) and padding ``dilation * (kernel_size // 2)``, so its output size is
    kept; inside a :func:`redilate` the dilation applies to the larger kernel.  The
    weights are computed before anything changes; on exit (exception or not) each
    convolution gets back its own weight ``Parameter``, ``kernel_size`` and ``padding``
    objects, so the model is the untouched one bit for bit.  Yields the names changed.
    A factor of 1 changes nothing.  LoRaD-wrapped convolutions are refused (their
    factors are shaped for the small kernel): merge the adapter first (``wadi export``).
    """
    scale = _check_scale(scale, "dispersion")
    _check_kernel_sizes(1, kernel_size)
    _check_eta(eta)
    chosen = parse_blocks(blocks, unet, "--disperse")
    plan = []
    for name, conv, factor in redilated_convs(unet, chosen, scale):
        kh, kw = conv.kernel_size
        if kh != kw:
            raise ValueError(
                f"--disperse: {name} has a {kh}x{kw} kernel; dispersion needs square kernels, "
                "leave that block out"
            )
        _check_kernel_sizes(kh, kernel_size)
        parent = unet.get_submodule(name.rpartition(".")[0]) if "." in name else unet
        if hasattr(parent, "lorad_A"):
            raise ValueError(
                f"--disperse: {name} is wrapped by a LoRaD adapter shaped for its {kh}x{kh} "
                "kernel; merge it first (wadi export, then --pipeline)"
            )
        if factor == 1.0:
            continue
        transform = dispersion_transform(kh, kernel_size, factor, eta)
        plan.append((name, conv, _dispersed_weight(conv, transform, kernel_size)))
    saved = []
    try:
        for _, conv, weight in plan:
            saved.append((conv, conv.weight, conv.kernel_size, conv.padding))
            conv.weight = nn.Parameter(weight, requires_grad=False)
            conv.kernel_size = (kernel_size, kernel_size)
            conv.padding = tuple(d * (kernel_size // 2) for d in conv.dilation)
        yield [name for name, _, _ in plan]
    finally:
        for conv, weight, size, padding in reversed(saved):
            conv.weight = weight
            conv.kernel_size = size
            conv.padding = padding


@contextmanager
def _dispersed_and_redilated(
    unet: nn.Module, scale: float, redilate_spec: str, disperse_spec: str
) -> Iterator[list[str]]:
    """ScaleCrafter's combination: a dispersed conv covers 2x (or its ``NAME:F``) by
    dispersion and the rest, ``scale / F``, by dilation; the other convolutions of
    ``redilate_spec`` are re-dilated by ``scale``."""
    chosen = parse_blocks(disperse_spec, unet, "--disperse")
    factors = {name: 2.0 if f is None else f for name, f in chosen.items()}
    convs = redilated_convs(unet, factors, 2.0)
    too_big = [(n, f) for n, _, f in convs if f > scale + 1e-9]
    if too_big:
        name, factor = too_big[0]
        raise ValueError(
            f"--disperse with --redilate disperses {name} by {factor:g} and dilates it by the "
            f"rest of the factor {scale:g}, which is smaller; use --disperse alone below "
            f"{factor:g}x"
        )
    base = parse_blocks(redilate_spec, unet, "--redilate")
    entries = [b if d is None else f"{b}:{d!r}" for b, d in base.items()]
    entries += [f"{name}:{scale / f!r}" for name, _, f in convs]
    spec = [f"{name}:{f!r}" for name, _, f in convs]
    with disperse(unet, 2.0, spec) as dispersed, redilate(unet, scale, entries) as dilated:
        yield list(dict.fromkeys(dispersed + dilated))


def redilation(
    unet: nn.Module,
    resolution: int | None,
    vae_scale_factor: int,
    spec: str | None,
    disperse_spec: str | None = None,
):
    """The context ``wadi generate --resolution R [--redilate SPEC] [--disperse SPEC]``
    samples in.

    Both None: nothing changes.  Otherwise the scale is ``R`` over the U-Net's native
    side (``sample_size`` latents times the VAE factor).  ``--redilate`` alone:
    :func:`redilate` by the scale; ``--disperse`` alone: :func:`disperse` by the scale
    (5x5 kernels, eta 0.05); both: ScaleCrafter's split, dispersion by 2 and dilation by
    ``scale / 2`` on the dispersed convolutions, dilation by the scale on the others.
    """
    if spec is None and disperse_spec is None:
        return nullcontext([])
    flag = "--redilate" if disperse_spec is None else "--disperse"
    native = native_resolution(unet, vae_scale_factor)
    if resolution is None:
        raise ValueError(
            f"{flag} needs --resolution above the model's native {native} px "
            f"(e.g. --resolution {2 * native})"
        )
    if resolution < native:
        raise ValueError(
            f"{flag}: --resolution {resolution} is below the model's native {native} px; "
            "it is for sampling above it"
        )
    scale = resolution / native
    if disperse_spec is None:
        return redilate(unet, scale, spec)
    if spec is None:
        return disperse(unet, scale, disperse_spec)
    return _dispersed_and_redilated(unet, scale, spec, disperse_spec)
