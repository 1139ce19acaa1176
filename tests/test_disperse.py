"""ScaleCrafter dispersed convolution (wadi.highres.disperse) and ``wadi generate --disperse``."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wadi import lorad
from wadi.cli import main
from wadi.highres import disperse, dispersion_transform, redilate
from wadi.testing import make_tiny_sd, tiny_unet

torch.set_num_threads(1)


# -- an independent float64 reference: plain numpy, one impulse input at a time ----------


def _bilinear_up(x, scale):
    """Aligned-corner bilinear upsampling of ``(..., n, n)``, sample by sample
    (ScaleCrafter's MATLAB rule: output sample ``i`` at input coordinate ``i / scale``)."""
    n = x.shape[-1]
    m = int(math.floor((n - 1) * scale + 1e-9)) + 1
    out = np.zeros((*x.shape[:-2], m, m))
    for i in range(m):
        for j in range(m):
            r, c = min(i / scale, n - 1), min(j / scale, n - 1)
            r0, c0 = int(r), int(c)
            r1, c1 = min(r0 + 1, n - 1), min(c0 + 1, n - 1)
            a, b = r - r0, c - c0
            out[..., i, j] = (
                (1 - a) * (1 - b) * x[..., r0, c0]
                + (1 - a) * b * x[..., r0, c1]
                + a * (1 - b) * x[..., r1, c0]
                + a * b * x[..., r1, c1]
            )
    return out


def _xcorr(x, kernel):
    """Same-size cross-correlation of ``(..., h, w)``, zero padding k // 2, by slices."""
    k = kernel.shape[0]
    p = k // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)])
    h, w = x.shape[-2:]
    return sum(kernel[u, v] * padded[..., u : u + h, v : v + w] for u in range(k) for v in range(k))


def _reference_transform(small, large, scale, eta, n):
    """Least squares over the stacked equations (one per impulse and output pixel)."""
    impulses = np.eye(n * n).reshape(n * n, n, n)
    one_hot = [np.eye(k * k).reshape(k * k, k, k) for k in (large, small)]
    big_s = [_xcorr(_bilinear_up(impulses, scale), e).ravel() for e in one_hot[0]]
    small_s = [_bilinear_up(_xcorr(impulses, e), scale).ravel() for e in one_hot[1]]
    big_p = [eta * _xcorr(impulses, e).ravel() for e in one_hot[0]]
    small_p = [eta * _xcorr(impulses, e).ravel() for e in one_hot[1]]
    design = np.concatenate([np.stack(big_s, 1), np.stack(big_p, 1)])
    target = np.concatenate([np.stack(small_s, 1), np.stack(small_p, 1)])
    return np.linalg.lstsq(design, target, rcond=None)[0], design, target


@pytest.mark.parametrize("small, large, scale, eta", [(3, 5, 2.0, 0.05), (3, 5, 1.5, 0.3)])
def test_transform_is_the_least_squares_solution_of_an_independent_computation(
    small, large, scale, eta
):
    R = dispersion_transform(small, large, scale, eta).numpy()
    ref, design, target = _reference_transform(small, large, scale, eta, 7)
    assert R.shape == (large * large, small * small) and R.dtype == np.float64
    np.testing.assert_allclose(R, ref, atol=1e-10)
    # the normal equations hold, and any other kernel map does worse
    assert np.abs(design.T @ (design @ R - target)).max() < 1e-9
    loss = np.sum((design @ R - target) ** 2)
    other = R + 1e-3 * np.random.default_rng(0).standard_normal(R.shape)
    assert np.sum((design @ other - target) ** 2) > loss


def _embed(small, large, step):
    """The small kernel placed in the large one with taps ``step`` apart (centred)."""
    out = np.zeros((large * large, small * small))
    c = large // 2 - step * (small // 2)
    for a in range(small):
        for b in range(small):
            out[(c + step * a) * large + c + step * b, a * small + b] = 1.0
    return out


def test_scale_one_is_the_zero_padded_kernel_and_small_eta_tends_to_dilation():
    for eta in (0.05, 1.0):
        np.testing.assert_allclose(
            dispersion_transform(3, 5, 1.0, eta), _embed(3, 5, 1), atol=1e-12
        )
    np.testing.assert_allclose(dispersion_transform(3, 3, 1.0), np.eye(9), atol=1e-12)
    # away from the border, the dilated kernel solves the structure level exactly, so
    # with a negligible pixel weight the solution approaches it as the input grows
    far = [np.abs(dispersion_transform(3, 5, 2.0, 1e-4, n).numpy() - _embed(3, 5, 2)).max()
           for n in (7, 31, 101)]  # fmt: skip
    assert far[0] > far[1] > far[2] and far[2] < 0.02
    # ScaleCrafter's setting is a different kernel from plain dilation
    assert np.abs(dispersion_transform(3, 5, 2.0, 0.05).numpy() - _embed(3, 5, 2)).max() > 0.1


def test_structure_level_residual_on_an_upsampled_input():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3))
    field = rng.standard_normal((16, 16))
    target = _bilinear_up(_xcorr(field, kernel), 2.0)[6:-6, 6:-6]  # up(K * x), interior
    up = _bilinear_up(field, 2.0)

    def residual(R, k):
        big = (R @ kernel.ravel()).reshape(k, k)
        return np.linalg.norm(_xcorr(up, big)[6:-6, 6:-6] - target) / np.linalg.norm(target)

    plain = residual(_embed(3, 3, 1), 3)  # the untouched kernel on the 2x input: 0.65
    dispersed = residual(dispersion_transform(3, 5, 2.0, 0.05).numpy(), 5)  # 0.07
    assert plain > 0.5 and dispersed < 0.15 * plain
    assert residual(_embed(3, 5, 2), 5) < 1e-12  # dilation is exact there (bilinear, 2x)
    # pixel level: on the input itself the dispersed kernel is nearer the original
    # kernel than the dilated one is (1.05 vs 1.20 relative here)
    on_input = (dispersion_transform(3, 5, 2.0, 0.05).numpy() @ kernel.ravel()).reshape(5, 5)
    base = _xcorr(field, kernel)[3:-3, 3:-3]
    dilated = _xcorr(field, (_embed(3, 5, 2) @ kernel.ravel()).reshape(5, 5))[3:-3, 3:-3]
    mine = _xcorr(field, on_input)[3:-3, 3:-3]
    assert np.linalg.norm(mine - base) < 0.93 * np.linalg.norm(dilated - base)


def test_transform_is_cached_and_returned_as_a_copy():
    a = dispersion_transform(3, 5, 2.0, 0.05)
    a.zero_()
    assert dispersion_transform(3, 5, 2.0, 0.05).abs().max() > 0.5


# -- the context manager on a U-Net -------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(sample_size=8, seed=3)


def _call(unet, x):
    cond = torch.randn(x.shape[0], 4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([999] * x.shape[0]), encoder_hidden_states=cond).sample


def _conv_state(unet):
    return {
        name: (m.weight, m.kernel_size, m.padding, m.dilation, m.weight.data_ptr())
        for name, m in unet.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def _x(size=16):
    return torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))


def test_disperse_changes_output_keeps_size_and_restores_bitwise(unet):
    x = _x()
    before, state = _call(unet, x), _conv_state(unet)
    params = [p.clone() for p in unet.parameters()]
    conv = unet.get_submodule("mid_block.resnets.0.conv1")
    original = conv.weight.detach().clone()
    with disperse(unet, 2, "auto") as names:
        assert conv.weight.shape[-2:] == (5, 5) and conv.padding == (2, 2)
        assert conv.kernel_size == (5, 5)
        R = dispersion_transform(3, 5, 2.0, 0.05).float()
        expect = (original.reshape(*original.shape[:2], 9) @ R.T).reshape(conv.weight.shape)
        torch.testing.assert_close(conv.weight.detach(), expect, rtol=1e-5, atol=1e-6)
        assert unet.get_submodule("down_blocks.0.resnets.0.conv1").kernel_size == (3, 3)
        inside = _call(unet, x)
        down = unet.get_submodule("down_blocks.1.resnets.0.conv1")
        assert down.weight.shape[-1] == 5
    assert "up_blocks.0.upsamplers.0.conv" in names and "mid_block.resnets.1.conv2" in names
    assert not any(n.startswith("down_blocks.0") or "conv_shortcut" in n for n in names)
    assert inside.shape == before.shape and (inside - before).abs().max() > 1e-3
    assert torch.equal(_call(unet, x), before)
    after = _conv_state(unet)
    assert after.keys() == state.keys()
    for name, (w, ks, pad, dil, ptr) in state.items():  # the very same objects are back
        w2, ks2, pad2, dil2, ptr2 = after[name]
        assert w2 is w and ks2 is ks and pad2 is pad and dil2 is dil and ptr2 == ptr, name
    assert all(torch.equal(a, b) for a, b in zip(params, unet.parameters()))


def test_restored_when_the_body_raises_and_nested_with_redilate(unet):
    x = _x(12)
    before, state = _call(unet, x), _conv_state(unet)
    with pytest.raises(RuntimeError, match="boom"):
        with disperse(unet, 2, "mid_block"), redilate(unet, 1.5, "mid_block,up_blocks.0"):
            conv = unet.get_submodule("mid_block.resnets.0.conv1")
            # the dilation applies to the 5x5 kernel: padding 2 * 2 keeps the size
            assert conv.dilation == (2, 2) and conv.padding == (4, 4)
            assert _call(unet, x).shape == before.shape
            raise RuntimeError("boom")
    assert _conv_state(unet) == state
    assert torch.equal(_call(unet, x), before)


def test_strided_downsampler_and_scale_one(unet):
    x = _x()
    before = _call(unet, x)
    with disperse(unet, 1, "mid_block") as names:
        assert names == [] and torch.equal(_call(unet, x), before)
    with disperse(unet, 3, "down_blocks.0,mid_block:2", kernel_size=7) as names:
        conv = unet.get_submodule("down_blocks.0.downsamplers.0.conv")
        assert conv.stride == (2, 2) and conv.kernel_size == (7, 7) and conv.padding == (3, 3)
        assert _call(unet, x).shape == x.shape
    assert "down_blocks.0.downsamplers.0.conv" in names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_size": 4}, "odd positive integer"),
        ({"kernel_size": 1}, "kernel_size=1 is smaller than the 3x3 kernels"),
        ({"eta": 0.0}, "eta must be a positive number"),
        ({"scale": 0.5}, "dispersion scale must be >= 1"),
        ({"blocks": "down_blocks.9"}, "--disperse: UNet2DConditionModel has no block"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(unet, kwargs, message):
    args = {"scale": 2, "blocks": "mid_block", **kwargs}
    state = _conv_state(unet)
    with pytest.raises(ValueError, match=message) as err:
        with disperse(unet, args.pop("scale"), **args):
            pass
    assert "\n" not in str(err.value)
    assert _conv_state(unet) == state


def test_lorad_wrapped_convolutions_are_refused():
    unet = tiny_unet(sample_size=8, seed=4)
    lorad.attach(unet, lorad.preset("sd-unet-student", rank=2, include_conv=True), "student")
    with pytest.raises(ValueError, match="wrapped by a LoRaD adapter.*merge it first"):
        with disperse(unet, 2, "mid_block"):
            pass


# -- wadi generate --disperse --------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("teachers") / "sd")


def _pixels(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def test_generate_disperse_cli(sd_dir, tmp_path, capsys):
    def run(name, *flags, resolution="32"):
        base = ["generate", "--teacher", str(sd_dir), "--prompt", "red car"]
        return main([*base, "--resolution", resolution, "--out", str(tmp_path / name), *flags])

    assert run("dil", "--redilate") == 0
    assert run("disp", "--disperse") == 0 and run("both", "--disperse", "--redilate") == 0
    dil, disp, both = (_pixels(tmp_path / n) for n in ("dil", "disp", "both"))
    assert disp[0].shape[:2] == (32, 32) and np.abs(disp[0] - dil[0]).max() > 0
    # at 2x the combination disperses by 2 and dilates the dispersed convs by 2 / 2 = 1:
    # with the same blocks that is dispersion alone
    assert np.array_equal(both[0], disp[0])
    assert run("both4", "--disperse", "--redilate", resolution="64") == 0
    assert run("disp4", "--disperse", resolution="64") == 0
    assert np.abs(_pixels(tmp_path / "both4")[0] - _pixels(tmp_path / "disp4")[0]).max() > 0
    capsys.readouterr()
    assert run("bad", "--disperse", "--redilate", resolution="24") == 2
    err = capsys.readouterr().err.strip()
    assert "--disperse with --redilate" in err and "use --disperse alone" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    base = ["generate", "--teacher", str(sd_dir), "--prompt", "x", "--disperse"]
    assert main([*base, "--out", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--disperse needs --resolution" in err and len(err.splitlines()) == 1
