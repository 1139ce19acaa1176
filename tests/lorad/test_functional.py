import numpy as np
import pytest
import torch

from wadi.lorad import rotate_pairs, rotate_pairs_grad_theta
from wadi.lorad.functional import LoRaDConv2dFunction, LoRaDLinearFunction, rotated_weight

from .reference import rotate_reference

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(7, 10), (5, 9), (16, 3), (3, 2), (4, 6, 3, 2), (6, 3, 1, 3)])
def test_rotate_pairs_matches_float64_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=g).to(dtype)
    fan_in = int(np.prod(shape[1:]))
    theta = torch.randn(shape[0], fan_in // 2, generator=g) * 3
    out = rotate_pairs(weight, theta)
    assert out.dtype == dtype and out.shape == weight.shape
    expected = rotate_reference(weight.double().numpy(), theta.double().numpy())
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out.double().numpy(), expected, atol=TOL[dtype] * scale * 4, rtol=0)


def test_odd_fan_in_keeps_last_column():
    weight = torch.randn(4, 7)
    out = rotate_pairs(weight, torch.randn(4, 3))
    assert torch.equal(out[:, -1], weight[:, -1])
    assert not torch.allclose(out[:, :-1], weight[:, :-1])


def test_zero_angles_are_exact_identity():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        weight = torch.randn(8, 12).to(dtype)
        assert torch.equal(rotate_pairs(weight, torch.zeros(8, 6)), weight)


def test_row_norms_preserved_for_large_angles():
    weight = torch.randn(32, 65, dtype=torch.float64)
    theta = (torch.rand(32, 32, dtype=torch.float64) - 0.5) * 40  # far outside [-pi, pi)
    out = rotate_pairs(weight, theta)
    torch.testing.assert_close(out.norm(dim=1), weight.norm(dim=1), rtol=1e-13, atol=0)
    # and the directions did change
    cos = (out * weight).sum(1) / (out.norm(dim=1) * weight.norm(dim=1))
    assert (cos < 0.99).all()


def test_inverse_rotation_and_periodicity():
    weight = torch.randn(6, 10, dtype=torch.float64)
    theta = torch.randn(6, 5, dtype=torch.float64)
    back = rotate_pairs(rotate_pairs(weight, theta), -theta)
    torch.testing.assert_close(back, weight, rtol=0, atol=1e-13)
    wrapped = torch.remainder(theta + torch.pi, 2 * torch.pi) - torch.pi
    torch.testing.assert_close(rotate_pairs(weight, wrapped), rotate_pairs(weight, theta))


def test_grad_theta_formula_matches_autograd():
    weight = torch.randn(5, 9, dtype=torch.float64)
    theta = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 9, dtype=torch.float64)
    rotated = rotate_pairs(weight, theta)
    (rotated * upstream).sum().backward()
    manual = rotate_pairs_grad_theta(rotated.detach(), upstream)
    torch.testing.assert_close(manual, theta.grad, rtol=1e-12, atol=1e-12)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs \(4, 3\)"):
        rotate_pairs(torch.randn(4, 7), torch.randn(4, 4))


def _f64(*shape, requires_grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(requires_grad)


def test_linear_function_gradcheck():
    x = _f64(2, 3, 7)
    weight = _f64(5, 7)
    bias = _f64(5)
    lorad_A, lorad_B = _f64(5, 2), _f64(2, 3)
    fn = lambda *a: LoRaDLinearFunction.apply(*a, torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, lorad_A, lorad_B))


def test_conv_function_gradcheck_grouped_nonsquare():
    x = _f64(2, 4, 5, 6)
    weight = _f64(6, 2, 3, 2)  # groups=2, 3x2 kernel
    bias = _f64(6)
    lorad_A, lorad_B = _f64(6, 2), _f64(2, 6)

    def fn(x, w, b, a, bb):
        return LoRaDConv2dFunction.apply(x, w, b, a, bb, torch.float64, (2, 1), (1, 0), (1, 2), 2)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, lorad_A, lorad_B))


def test_rotate_pairs_odd_storage_offset_and_strided_weight():
    base = torch.randn(6, 11, dtype=torch.float64)
    theta = torch.randn(6, 5, dtype=torch.float64)
    for weight in (base[:, 1:], base.view(-1)[1:61].view(6, 10), base.T.contiguous().T[:, :10]):
        expected = rotate_reference(weight.numpy(), theta.numpy())
        np.testing.assert_allclose(rotate_pairs(weight, theta).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 9), (6, 8), (4, 6, 3, 1)])
def test_grad_theta_matches_float64_autograd(dtype, shape):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    fan_in = int(np.prod(shape[1:]))
    theta = torch.randn(shape[0], fan_in // 2, generator=g, dtype=torch.float64)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    theta.requires_grad_(True)
    rotated = rotate_pairs(weight, theta)
    (rotated * upstream).sum().backward()
    manual = rotate_pairs_grad_theta(rotated.detach().to(dtype), upstream.to(dtype))
    assert manual.dtype == torch.float32 and manual.is_contiguous()
    scale = float(upstream.abs().max() * weight.abs().max())
    torch.testing.assert_close(manual.double(), theta.grad, rtol=0, atol=TOL[dtype] * scale * 8)


def test_rotated_weight_casts_once_to_the_matmul_dtype():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 12, generator=g).to(torch.bfloat16)
    lorad_A, lorad_B = torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)
    out = rotated_weight(weight, lorad_A, lorad_B, torch.float32)
    assert out.dtype == torch.float32
    expected = rotate_reference(weight.double().numpy(), (lorad_A @ lorad_B).double().numpy())
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5, rtol=0)


def test_rotate_pairs_keeps_autograd_through_theta_and_weight():
    weight = _f64(4, 6)
    theta = _f64(4, 3)
    assert torch.autograd.gradcheck(rotate_pairs, (weight, theta))


def test_linear_function_gradcheck_keep_rotated():
    x = _f64(2, 3, 7)
    weight = _f64(5, 7)
    bias = _f64(5)
    lorad_A, lorad_B = _f64(5, 2), _f64(2, 3)
    fn = lambda *a: LoRaDLinearFunction.apply(*a, torch.float64, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, lorad_A, lorad_B))


def test_conv_function_gradcheck_keep_rotated():
    x = _f64(2, 4, 5, 6)
    weight = _f64(6, 2, 3, 2)
    bias = _f64(6)
    lorad_A, lorad_B = _f64(6, 2), _f64(2, 6)

    def fn(x, w, b, a, bb):
        args = (torch.float64, (2, 1), (1, 0), (1, 2), 2, True)
        return LoRaDConv2dFunction.apply(x, w, b, a, bb, *args)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, lorad_A, lorad_B))


@pytest.mark.parametrize(
    "requires", [(True, False, False, True, True), (False, True, True, False, True)]
)
def test_keep_rotated_gives_the_same_gradients_bitwise(requires):
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 10), (6, 10), (6,), (6, 4), (4, 5)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    grads = []
    for keep in (False, True):
        inputs = [t.clone().requires_grad_(r) for t, r in zip(tensors, requires)]
        y = LoRaDLinearFunction.apply(*inputs, torch.float32, keep)
        y.square().sum().backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
