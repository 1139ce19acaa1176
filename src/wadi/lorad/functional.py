"""The math of LoRaD as pure functions (see shared method.md section 2).

A frozen weight ``W`` of shape ``(out, in)`` is read as ``in // 2`` pairs of
adjacent columns per row.  Each pair ``(w0, w1)`` is rotated in its plane by
an angle ``theta[row, pair]``::

    w0' = w0 * cos(theta) - w1 * sin(theta)
    w1' = w0 * sin(theta) + w1 * cos(theta)

Every pair keeps its length, so every row keeps its norm: only the direction
of each output neuron's weight vector changes.  The angles are low rank,
``theta = A @ B``.  With an odd ``in`` the last column is left as it is.

Convolution weights ``(out, in/groups, kh, kw)`` use the same rule on their
per-output-channel flattened view ``(out, in/groups * kh * kw)``.

The functions here hold no state; the layers in :mod:`wadi.lorad.layer` and
the training code call them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = [
    "angles",
    "rotate_pairs",
    "rotated_weight",
    "rotate_pairs_grad_theta",
    "num_pairs",
    "LoRaDLinearFunction",
    "LoRaDConv2dFunction",
]


def num_pairs(fan_in: int) -> int:
    """Number of rotated column pairs for ``fan_in`` input columns."""
    return fan_in // 2


def angles(lorad_A: torch.Tensor, lorad_B: torch.Tensor) -> torch.Tensor:
    """Rotation angles ``A @ B``, computed in at least float32.

    The reference wraps angles to ``[-pi, pi)``; rotation is 2*pi periodic so
    that changes no value and is not done here.
    """
    if lorad_A.dtype == lorad_B.dtype and lorad_A.dtype in (torch.float32, torch.float64):
        return lorad_A @ lorad_B  # the usual case: no casts
    dtype = torch.promote_types(torch.promote_types(lorad_A.dtype, lorad_B.dtype), torch.float32)
    return lorad_A.to(dtype) @ lorad_B.to(dtype)


def _compute_dtype(weight: torch.Tensor, theta: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(weight.dtype, theta.dtype), torch.float32)


def _unit_phase(theta: torch.Tensor) -> torch.Tensor:
    """``exp(i * theta)`` as a fresh complex tensor, in one kernel.

    On CPU (torch 2.13) ``torch.polar`` is as fast as ``cos`` plus ``sin`` and
    saves the pass that interleaves them into a complex tensor (measured at
    1280 x 640 angles: 2.8 ms vs 4.0 ms for ``torch.complex(cos, sin)``).
    """
    return torch.polar(torch.ones((), dtype=theta.dtype, device=theta.device), theta)


_EXACT = (torch.float32, torch.float64)


def _odd_offset(t: torch.Tensor) -> bool:
    """Whether ``t`` starts at an odd element (no complex view); not traceable, so False when compiling."""
    return not torch.compiler.is_compiling() and t.storage_offset() % 2 == 1


def _pair_view(w2d: torch.Tensor, pairs: int, dtype: torch.dtype) -> torch.Tensor:
    """``(out, pairs, 2)`` view of the first ``2 * pairs`` columns, ready for view_as_complex."""
    w = w2d[:, : 2 * pairs].to(dtype)
    if w.stride(0) % 2 or w.stride(1) != 1 or _odd_offset(w):
        w = w.clone(memory_format=torch.contiguous_format)  # contiguous() keeps an odd offset
    return w.reshape(w.shape[0], pairs, 2)


def _complex_pairs(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` (``out x ...``, even fan-in) as an ``(out, pairs)`` complex view, or None if it cannot be one."""
    out_features = t.shape[0]
    fan_in = t.numel() // out_features if out_features else 0
    if fan_in % 2 or t.dtype not in _EXACT or not t.is_contiguous() or _odd_offset(t):
        return None
    return torch.view_as_complex(t.view(out_features, fan_in // 2, 2))


def _check_theta(shape: torch.Size, theta: torch.Tensor) -> int:
    out_features = shape[0]
    fan_in = math.prod(shape[1:]) if out_features else 0
    pairs = num_pairs(fan_in)
    if theta.shape != (out_features, pairs):
        raise ValueError(
            f"theta has shape {tuple(theta.shape)} but a weight of shape {tuple(shape)} "
            f"needs ({out_features}, {pairs})"
        )
    return fan_in


def _rotate(weight: torch.Tensor, theta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``rotate_pairs`` with the result cast straight to ``out_dtype`` (one cast, no round trip)."""
    shape = weight.shape
    dtype = weight.dtype
    if (  # the training case, with as little Python as possible: per-call overhead matters
        len(shape) == 2
        and dtype is theta.dtype
        and dtype is out_dtype
        and dtype in _EXACT
        and not (torch.is_grad_enabled() and (theta.requires_grad or weight.requires_grad))
        and theta.shape == (shape[0], shape[1] // 2)
    ):
        w_c = _complex_pairs(weight)
        if w_c is not None:
            return torch.view_as_real(_unit_phase(theta).mul_(w_c)).view(shape)
    fan_in = _check_theta(shape, theta)
    out_features = shape[0]
    pairs = num_pairs(fan_in)
    dtype = _compute_dtype(weight, theta)
    # A pair (w0, w1) is the complex number w0 + i*w1; rotating it by theta is
    # multiplying by exp(i*theta).  Without autograd the product is written
    # into the phase tensor itself (a fresh temporary): one weight-sized
    # allocation for the whole rotation.
    phase = _unit_phase(theta if theta.dtype == dtype else theta.to(dtype))
    tracked = torch.is_grad_enabled() and (theta.requires_grad or weight.requires_grad)
    mul = torch.mul if tracked else torch.Tensor.mul_
    w = weight if weight.dtype == dtype else weight.to(dtype)
    w_c = _complex_pairs(w)
    if w_c is not None:  # fast path: even fan-in, contiguous
        rotated = torch.view_as_real(mul(phase, w_c)).view(shape)
        return rotated if out_dtype == dtype else rotated.to(out_dtype)
    w2d = weight.reshape(out_features, fan_in)
    pairs_c = torch.view_as_complex(_pair_view(w2d, pairs, dtype))
    rotated = torch.view_as_real(mul(phase, pairs_c)).reshape(out_features, 2 * pairs)
    rotated = rotated.to(out_dtype)
    if fan_in % 2:
        rotated = torch.cat((rotated, w2d[:, -1:].to(out_dtype)), dim=1)
    return rotated.reshape(shape)


def rotate_pairs(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent column pairs of ``weight`` (``out x in``) by ``theta``.

    ``theta`` has shape ``(out, in // 2)``.  The rotation runs in float32 (or
    float64 if either input is float64) and the result is cast back to
    ``weight.dtype``.  A weight with more than two dimensions (a conv kernel)
    is rotated on its per-output flattened view and returned in its own shape.
    """
    return _rotate(weight, theta, weight.dtype)


def rotated_weight(
    weight: torch.Tensor, lorad_A: torch.Tensor, lorad_B: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The adapted weight ``rotate(W, A @ B)`` in ``dtype`` (the matmul dtype).

    The one place forward, backward and the layers' no-grad cache build it,
    so they agree bitwise.
    """
    return _rotate(weight, angles(lorad_A, lorad_B), dtype)


def rotate_pairs_grad_theta(rotated: torch.Tensor, grad_rotated: torch.Tensor) -> torch.Tensor:
    """Gradient of a loss with respect to ``theta`` given the rotated weight.

    For ``r0 = w0 cos - w1 sin`` and ``r1 = w0 sin + w1 cos`` the derivatives
    are ``dr0/dtheta = -r1`` and ``dr1/dtheta = r0``, so
    ``dL/dtheta = r0 * dL/dr1 - r1 * dL/dr0``.  Only the rotated weight is
    needed, not the base weight, cos or sin.  Result in float32 or float64.
    """
    r_c, g_c = _complex_pairs(rotated), _complex_pairs(grad_rotated)
    if r_c is not None and g_c is not None and r_c.dtype is g_c.dtype:  # views only
        r, g = torch.view_as_real(r_c), torch.view_as_real(g_c)
    else:
        out_features = rotated.shape[0]
        r2d = rotated.reshape(out_features, -1)
        g2d = grad_rotated.reshape(out_features, -1)
        pairs = num_pairs(r2d.shape[1])
        dtype = torch.promote_types(
            torch.promote_types(rotated.dtype, grad_rotated.dtype), torch.float32
        )
        r = _pair_view(r2d, pairs, dtype)
        g = _pair_view(g2d, pairs, dtype)
    # Two real passes straight into a contiguous result (what the A and B
    # matmuls want).  The complex form Im(conj(r) * g) is one kernel but
    # materialises conj(r) and a complex product first: measured slower on CPU.
    grad_theta = torch.mul(r[..., 0], g[..., 1])
    return grad_theta.addcmul_(r[..., 1], g[..., 0], value=-1)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype is dtype else t.to(dtype)


def _no_autocast(t: torch.Tensor):
    """Autocast off inside (angles stay float32); a no-op context when it is off already."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _weight_grads(ctx, rotated, grad_rotated, weight, lorad_A, lorad_B):
    """Gradients of the base weight (if it is trained) and of ``A``, ``B``.

    ``dL/dW`` is ``dL/dW'`` rotated back by ``-theta``; ``dL/dtheta`` comes from
    :func:`rotate_pairs_grad_theta` and is chained through ``theta = A @ B``.
    """
    grad_w = grad_A = grad_B = None
    if ctx.needs_input_grad[1]:
        theta = angles(lorad_A, lorad_B)
        grad_w = _rotate(grad_rotated.reshape(weight.shape), -theta, weight.dtype)
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        grad_theta = rotate_pairs_grad_theta(rotated, grad_rotated)
        dtype = grad_theta.dtype
        if ctx.needs_input_grad[3]:
            grad_A = _cast(grad_theta @ _cast(lorad_B, dtype).T, lorad_A.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = _cast(_cast(lorad_A, dtype).T @ grad_theta, lorad_B.dtype)
    return grad_w, grad_A, grad_B


def _save(ctx, x, weight, lorad_A, lorad_B, rotated, keep_rotated):
    """Save the inputs, plus the rotated weight only when the caller opted in."""
    if keep_rotated:
        ctx.save_for_backward(x, weight, lorad_A, lorad_B, rotated)
    else:
        ctx.save_for_backward(x, weight, lorad_A, lorad_B)


def _saved(ctx):
    """``x, weight, A, B, rotated`` from ``ctx``; the rotated weight recomputed if it was not kept."""
    saved = ctx.saved_tensors
    x, weight, lorad_A, lorad_B = saved[:4]
    if len(saved) == 5:
        rotated = saved[4]
    else:
        rotated = rotated_weight(weight, lorad_A, lorad_B, ctx.compute_dtype)
    return x, weight, lorad_A, lorad_B, rotated


class LoRaDLinearFunction(torch.autograd.Function):
    """``y = x @ rotate(W, A @ B).T + bias`` with a lean backward.

    Forward builds the rotated weight once and runs one matmul.  Only the
    input, the frozen weight and the two small factors are saved; backward
    recomputes angles and rotated weight instead of keeping cos, sin and the
    rotated weight alive between forward and backward.  With
    ``keep_rotated=True`` the rotated weight (one weight-sized tensor in
    ``compute_dtype``) is saved instead of recomputed: memory for time.

    Backward computes ``dL/dW' = grad_y^T x`` once; ``dL/dx = grad_y @ W'``
    and ``dL/dtheta = Im(conj(W') * dL/dW')`` both use the same ``W'``.  The
    base weight and bias are normally frozen; if they do require grad, they
    get it.  ``compute_dtype`` is the dtype of the matmul (the autocast dtype
    or the base weight's dtype).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lorad_A, lorad_B, compute_dtype, keep_rotated=False):
        with _no_autocast(x):
            rotated = rotated_weight(weight, lorad_A, lorad_B, compute_dtype)
            b = _cast(bias, compute_dtype) if bias is not None else None
            y = F.linear(_cast(x, compute_dtype), rotated, b)
        _save(ctx, x, weight, lorad_A, lorad_B, rotated, keep_rotated)
        ctx.compute_dtype = compute_dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lorad_A, lorad_B, rotated = _saved(ctx)
        dtype = ctx.compute_dtype
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        with _no_autocast(grad_y):
            gy2d = _cast(grad_y, dtype)
            if gy2d.dim() != 2:
                gy2d = gy2d.reshape(-1, gy2d.shape[-1])
            grad_x = grad_w = grad_b = grad_A = grad_B = None
            if need_x:
                grad_x = _cast(gy2d @ rotated, x.dtype)
                if x.dim() != 2:
                    grad_x = grad_x.view(x.shape)
            if need_w or need_A or need_B:
                x2d = _cast(x, dtype)
                if x2d.dim() != 2:
                    x2d = x2d.reshape(-1, x2d.shape[-1])
                grad_w, grad_A, grad_B = _weight_grads(
                    ctx, rotated, gy2d.T @ x2d, weight, lorad_A, lorad_B
                )
            if need_b:
                grad_b = _cast(gy2d.sum(0), ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None


class LoRaDConv2dFunction(torch.autograd.Function):
    """``conv2d(x, rotate(W, A @ B), bias, ...)`` with the same lean backward.

    Backward uses ``aten.convolution_backward`` on the recomputed (or, with
    ``keep_rotated``, kept) rotated kernel, so the input gradient and the
    kernel gradient come from one call.  ``padding`` must be numeric (tuple of
    ints); non-zero padding modes are applied by the caller before this
    function.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lorad_A,
        lorad_B,
        compute_dtype,
        stride,
        padding,
        dilation,
        groups,
        keep_rotated=False,
    ):
        with _no_autocast(x):
            rotated = rotated_weight(weight, lorad_A, lorad_B, compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            y = F.conv2d(x.to(compute_dtype), rotated, b, stride, padding, dilation, groups)
        _save(ctx, x, weight, lorad_A, lorad_B, rotated, keep_rotated)
        ctx.compute_dtype = compute_dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.conv_args = (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lorad_A, lorad_B, rotated = _saved(ctx)
        dtype = ctx.compute_dtype
        stride, padding, dilation, groups = ctx.conv_args
        need_x = ctx.needs_input_grad[0]
        need_w = any(ctx.needs_input_grad[i] for i in (1, 3, 4))
        with _no_autocast(grad_y):
            grad_x, grad_rotated, grad_b = torch.ops.aten.convolution_backward(
                grad_y.to(dtype),
                x.to(dtype),
                rotated,
                None,
                list(stride),
                list(padding),
                list(dilation),
                False,
                [0, 0],
                groups,
                [need_x, need_w, ctx.needs_input_grad[2]],
            )
            if grad_x is not None:
                grad_x = grad_x.to(x.dtype)
            if grad_b is not None:
                grad_b = grad_b.to(ctx.bias_dtype)
            grad_w = grad_A = grad_B = None
            if need_w:
                grad_w, grad_A, grad_B = _weight_grads(
                    ctx, rotated, grad_rotated, weight, lorad_A, lorad_B
                )
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None, None
