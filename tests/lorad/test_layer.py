import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wadi.lorad import LoRaDConfig, attach, disabled, rotate_pairs
from wadi.lorad.layer import LoRaDConv2d, LoRaDLinear

from .reference import rotate_reference


def _randomize(layer, name="default", scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a = layer.lorad_A[name]
        a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) * scale)


def test_linear_forward_matches_float64_reference():
    base = nn.Linear(9, 6).double()
    layer = LoRaDLinear(base)
    layer.add_adapter("default", 3)
    layer.active_adapter = "default"
    _randomize(layer)
    x = torch.randn(4, 9, dtype=torch.float64)
    w_ref = rotate_reference(base.weight.detach().numpy(), layer.theta("default").detach().numpy())
    expected = x.numpy() @ w_ref.T + base.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), groups=2, padding=1, stride=(1, 2)),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", dilation=2),
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=5, out_channels=4, kernel_size=1),
    ],
)
def test_conv_forward_matches_float64_reference(conv):
    base = nn.Conv2d(**conv).double()
    layer = LoRaDConv2d(base)
    layer.add_adapter("default", 2)
    layer.active_adapter = "default"
    _randomize(layer)
    x = torch.randn(2, conv["in_channels"], 7, 8, dtype=torch.float64)
    w_ref = rotate_reference(base.weight.detach().numpy(), layer.theta("default").detach().numpy())
    ref_conv = nn.Conv2d(**conv).double()
    with torch.no_grad():
        ref_conv.weight.copy_(torch.from_numpy(w_ref))
        ref_conv.bias.copy_(base.bias)
    torch.testing.assert_close(layer(x), ref_conv(x), rtol=1e-12, atol=1e-12)
    # gradient of the input matches too
    x.requires_grad_(True)
    (g1,) = torch.autograd.grad(layer(x).square().sum(), x)
    (g2,) = torch.autograd.grad(ref_conv(x).square().sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_conv_preserves_output_channel_norms():
    base = nn.Conv2d(4, 6, 3, groups=2)
    layer = LoRaDConv2d(base)
    layer.add_adapter("default", 2)
    _randomize(layer, scale=3.0)
    merged = layer.merged_weight("default")
    torch.testing.assert_close(merged.flatten(1).norm(dim=1), base.weight.flatten(1).norm(dim=1))


def test_identity_at_init_is_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Conv1d(16, 4, 1))
    x = torch.randn(3, 8)
    model.requires_grad_(False)  # as attach leaves the base: same kernel on both sides
    ref = model[0](x)
    attach(model, LoRaDConfig(rank=4))
    assert isinstance(model[0], LoRaDLinear)
    assert torch.equal(model[0](x), ref)


def test_base_weight_gets_no_gradient_and_angles_do():
    model = nn.Sequential(nn.Linear(8, 8))
    attach(model, LoRaDConfig(rank=2))
    model(torch.randn(2, 8)).sum().backward()
    layer = model[0]
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lorad_A["default"].grad.abs().sum() > 0  # dL/dA = dtheta @ B^T, B random
    assert layer.lorad_B["default"].grad.abs().sum() == 0  # A = 0 at init


def test_angles_stay_float32_when_model_is_cast_to_half():
    model = nn.Sequential(nn.Linear(8, 8))
    attach(model, LoRaDConfig(rank=2))
    model.to(torch.bfloat16)
    layer = model[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lorad_A["default"].dtype == torch.float32
    assert layer.lorad_B["default"].dtype == torch.float32
    out = model(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision_base_fp32_angles(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRaDLinear(base)
    layer.add_adapter("default", 4)
    layer.active_adapter = "default"
    _randomize(layer, scale=0.2)
    layer.base_layer.to(dtype)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    w = rotate_pairs(base.weight.double(), layer.theta("default").double())
    expected = x.double() @ w.T + base.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=0.1)
    y.float().sum().backward()
    assert layer.lorad_A["default"].grad.dtype == torch.float32
    assert torch.isfinite(layer.lorad_A["default"].grad).all()


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    attach(model, LoRaDConfig(rank=3))
    for _, layer in model.named_children():
        if isinstance(layer, LoRaDLinear):
            _randomize(layer, scale=0.3)
    x = torch.randn(4, 8)
    model(x).square().sum().backward()
    plain = _grads(model)
    model.zero_grad()
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    for a, b in zip(plain, _grads(model)):
        torch.testing.assert_close(a, b)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    attach(model, LoRaDConfig(rank=3))
    _randomize(model[0], scale=0.3)
    x = torch.randn(4, 8)
    model(x).square().sum().backward()
    eager_out, eager_grads = model(x).detach(), _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), eager_out)
    for a, b in zip(eager_grads, _grads(model)):
        torch.testing.assert_close(a, b)


def test_saved_for_backward_holds_no_rotated_weight_or_trig():
    """Only x, the frozen weight (no copy) and the small factors are kept for backward."""
    out_f, in_f, rank = 64, 128, 4
    base = nn.Linear(in_f, out_f)
    base.requires_grad_(False)
    layer = LoRaDLinear(base)
    layer.add_adapter("default", rank)
    layer.active_adapter = "default"
    x = torch.randn(10, in_f)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(10, in_f), (out_f, in_f), (out_f, rank), (rank, in_f // 2)])
    weight_saved = [t for t in saved if t.shape == (out_f, in_f)][0]
    assert weight_saved.data_ptr() == base.weight.data_ptr()  # the base weight itself, no copy


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRaDLinear(nn.Conv2d(2, 2, 1))


def test_disabled_computes_base():
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    model.requires_grad_(False)  # as attach leaves the base: same kernel on both sides
    ref = model(x)
    attach(model, LoRaDConfig(rank=2))
    _randomize(model[0])
    assert not torch.allclose(model(x), ref)
    with disabled(model):
        assert torch.equal(model(x), ref)
    assert not torch.allclose(model(x), ref)


def test_linear_matches_functional_linear_for_bias_free():
    base = nn.Linear(6, 4, bias=False)
    layer = LoRaDLinear(base)
    layer.add_adapter("default", 2)
    layer.active_adapter = "default"
    _randomize(layer)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.merged_weight("default")))
