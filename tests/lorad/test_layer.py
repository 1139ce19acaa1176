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


# -- keep_angles --------------------------------------------------------------------------


def _saved_shapes(layer, x):
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sorted(saved)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_keep_angles_keeps_the_rotated_weight_and_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 8), torch.randn(5, 12, requires_grad=True)
        layer = LoRaDLinear(base)
    else:
        base, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5, requires_grad=True)
        layer = LoRaDConv2d(base)
    base.requires_grad_(False)
    layer.add_adapter("default", 3)
    layer.active_adapter = "default"
    _randomize(layer, scale=0.4)
    plain = _saved_shapes(layer, x)
    grads = []
    for keep in (False, True):
        layer.keep_angles = keep
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, retain_graph=False)
        layer(x).square().sum().backward()
        grads.append([gx] + [p.grad.clone() for p in layer.parameters() if p.requires_grad])
        layer.zero_grad()
    assert _saved_shapes(layer, x) == sorted(plain + [tuple(base.weight.shape)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_set_keep_angles_reaches_every_layer():
    from wadi.lorad.layer import set_keep_angles

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    attach(model, LoRaDConfig(rank=2))
    set_keep_angles(model)
    assert model[0].keep_angles and model[1].keep_angles
    set_keep_angles(model, False)
    assert not model[0].keep_angles


# -- the no-grad rotation cache -----------------------------------------------------------


@pytest.fixture
def rotation_calls(monkeypatch):
    """Count the rotations computed anywhere (forward, backward, cache)."""
    import wadi.lorad.functional as lf

    calls = []
    original = lf.rotated_weight

    def counting(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(lf, "rotated_weight", counting)
    return calls


def _cached_layer(kind="linear"):
    torch.manual_seed(0)
    base = nn.Linear(12, 8) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    base.requires_grad_(False)
    layer = LoRaDLinear(base) if kind == "linear" else LoRaDConv2d(base)
    layer.add_adapter("default", 3)
    layer.active_adapter = "default"
    _randomize(layer, scale=0.4)
    x = torch.randn(5, 12) if kind == "linear" else torch.randn(2, 4, 5, 5)
    return layer, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cache_rotates_once_for_two_no_grad_forwards(rotation_calls, kind):
    layer, x = _cached_layer(kind)
    with torch.no_grad():
        uncached = layer(x)
        layer(x)
    assert len(rotation_calls) == 2  # off by default: every forward rotates
    layer.cache_rotation = True
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    assert len(rotation_calls) == 3
    assert torch.equal(first, uncached) and torch.equal(second, uncached)
    # a forward that needs gradients never reads the cache
    out = layer(x)
    out.sum().backward()
    assert len(rotation_calls) == 5  # forward + recomputed in backward
    assert torch.equal(out.detach(), uncached)


def test_cache_sees_the_new_weights_after_an_optimizer_step(rotation_calls):
    layer, x = _cached_layer()
    layer.cache_rotation = True
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        before = layer(x)
    layer(x).square().sum().backward()
    opt.step()
    calls = len(rotation_calls)
    with torch.no_grad():
        after = layer(x)
        layer(x)
    assert len(rotation_calls) == calls + 1  # recomputed once for the new weights
    assert not torch.allclose(after, before)
    layer.cache_rotation = False
    with torch.no_grad():
        assert torch.equal(after, layer(x))


def test_cache_is_invalidated_by_merge_unmerge_load_and_dtype(rotation_calls):
    layer, x = _cached_layer()
    layer.cache_rotation = True
    with torch.no_grad():
        adapted = layer(x)
        layer.merge("default")
        assert layer._rotation_cache is None
        torch.testing.assert_close(layer(x), adapted)  # the merged base layer
        layer.unmerge("default")
        calls = len(rotation_calls)
        torch.testing.assert_close(layer(x), adapted)
        assert len(rotation_calls) == calls + 1
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["lorad_A.default"] *= 2
        layer.load_state_dict(state)
        doubled = layer(x)
        assert len(rotation_calls) == calls + 2 and not torch.allclose(doubled, adapted)
        layer.double()
        assert layer._rotation_cache is None
        assert layer(x.double()).dtype == torch.float64


def test_cache_with_frozen_factors_keeps_the_input_gradient(rotation_calls):
    layer, x = _cached_layer()
    layer.requires_grad_(False)
    layer.cache_rotation = True
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    cached_grad = x.grad.clone()
    layer(x)
    assert len(rotation_calls) == 1
    layer.cache_rotation = False
    x.grad = None
    layer(x).square().sum().backward()
    torch.testing.assert_close(x.grad, cached_grad)


def test_rotation_cache_context_frees_on_exit():
    from wadi.lorad.layer import rotation_cache, set_rotation_cache

    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    attach(model, LoRaDConfig(rank=2))
    with rotation_cache(model), torch.no_grad():
        model(torch.randn(2, 6))
        assert all(m._rotation_cache is not None for m in model)
    assert all(m._rotation_cache is None and not m.cache_rotation for m in model)
    set_rotation_cache(model)
    with torch.no_grad():
        model(torch.randn(2, 6))
    set_rotation_cache(model, False)
    assert all(m._rotation_cache is None for m in model)


def test_cache_under_inference_mode_and_with_inference_tensors(rotation_calls):
    layer, x = _cached_layer()
    layer.cache_rotation = True
    with torch.inference_mode():
        layer(x)
        layer(x)
    assert len(rotation_calls) == 1  # ordinary parameters: cached as under no_grad
    with torch.inference_mode():
        layer, x = _cached_layer()  # parameters made here have no version counter
        layer.cache_rotation = True
        layer(x)
        layer(x)
    assert len(rotation_calls) == 3  # never cached
    assert layer._rotation_cache is None
