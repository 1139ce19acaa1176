"""ScaleCrafter re-dilation (wadi.highres) and ``wadi generate --redilate``."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wadi import lorad
from wadi.cli import main
from wadi.highres import auto_blocks, parse_blocks, redilate
from wadi.testing import make_tiny_sd, tiny_unet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(sample_size=8, seed=3)


def _call(unet, x):
    cond = torch.randn(x.shape[0], 4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([999] * x.shape[0]), encoder_hidden_states=cond).sample


def _conv_state(unet):
    """Every conv attribute forward reads, and the hook dicts (objects, not copies)."""
    state = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d):
            state[name] = (
                m.dilation,
                m.padding,
                m.stride,
                m.kernel_size,
                m.padding_mode,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                m.weight.data_ptr(),
            )
    return state


def _x(size=16):
    return torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))


def test_redilate_changes_the_output_keeps_its_size_and_restores_bitwise(unet):
    x = _x()
    before, state = _call(unet, x), _conv_state(unet)
    objects = {
        n: (m.dilation, m.padding) for n, m in unet.named_modules() if hasattr(m, "dilation")
    }
    with redilate(unet, 2, "auto") as names:
        inside = _call(unet, x)
        conv = unet.get_submodule("mid_block.resnets.0.conv1")
        assert conv.dilation == (2, 2) and conv.padding == (2, 2)
        # a 1x1 shortcut and the blocks not named keep dilation 1
        assert unet.get_submodule("down_blocks.0.resnets.0.conv1").dilation == (1, 1)
    assert "up_blocks.0.upsamplers.0.conv" in names and "mid_block.resnets.1.conv2" in names
    assert not any(n.startswith("down_blocks.0") or "conv_shortcut" in n for n in names)
    assert inside.shape == before.shape
    assert (inside - before).abs().max() > 1e-3
    after = _call(unet, x)
    assert torch.equal(after, before)
    assert _conv_state(unet) == state
    for name, (dilation, padding) in objects.items():  # the very same tuple objects are back
        m = unet.get_submodule(name)
        assert m.dilation is dilation and m.padding is padding, name


def test_restored_when_the_body_raises(unet):
    x = _x()
    before, state = _call(unet, x), _conv_state(unet)
    with pytest.raises(RuntimeError, match="boom"):
        with redilate(unet, 1.5, "down_blocks.0,mid_block"):
            _call(unet, x)
            raise RuntimeError("boom")
    assert _conv_state(unet) == state
    assert torch.equal(_call(unet, x), before)


def test_fractional_scale_uses_ceil_dilation_with_resizing(unet):
    x = _x(12)
    plain = _call(unet, x)
    with redilate(unet, 1.5, "mid_block"):
        conv = unet.get_submodule("mid_block.resnets.0.conv1")
        assert conv.dilation == (2, 2) and len(conv._forward_hooks) == 1
        out = _call(unet, x)
    assert out.shape == plain.shape and not torch.allclose(out, plain)
    assert len(conv._forward_hooks) == 0 and len(conv._forward_pre_hooks) == 0


def test_strided_downsampler_keeps_its_output_size(unet):
    x = _x()
    with redilate(unet, 3, "down_blocks.0"):
        conv = unet.get_submodule("down_blocks.0.downsamplers.0.conv")
        assert conv.stride == (2, 2) and conv.dilation == (3, 3) and conv.padding == (3, 3)
        out = _call(unet, x)
    assert out.shape == x.shape


def test_per_block_override_and_scale_one(unet):
    x = _x()
    before = _call(unet, x)
    with redilate(unet, 1, "mid_block"):  # scale 1: the untouched model
        assert torch.equal(_call(unet, x), before)
    with redilate(unet, 2, "down_blocks.1,mid_block:3"):
        assert unet.get_submodule("mid_block.resnets.0.conv1").dilation == (3, 3)
        assert unet.get_submodule("down_blocks.1.resnets.0.conv1").dilation == (2, 2)


def test_auto_scales_scalecrafter_choice_to_depth(unet):
    from diffusers import UNet2DModel

    assert auto_blocks(unet) == ["down_blocks.1", "mid_block", "up_blocks.0"]
    deep = UNet2DModel(
        sample_size=8,
        block_out_channels=(8,) * 8,
        down_block_types=("DownBlock2D",) * 8,
        up_block_types=("UpBlock2D",) * 8,
        layers_per_block=1,
        norm_num_groups=4,
    )
    # SD 1.5's 4 levels -> 1 (ScaleCrafter's 1024 px setting); 8 levels -> the deepest 2
    assert auto_blocks(deep) == [
        "down_blocks.6",
        "down_blocks.7",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]


@pytest.mark.parametrize(
    "spec, scale, message",
    [
        ("down_blocks.9", 2, "has no block 'down_blocks.9'"),
        ("mid_block:x", 2, "is not a number"),
        ("mid_block", 0.5, "must be >= 1"),
        (",", 2, "no blocks given"),
    ],
)
def test_bad_specs_are_refused_in_one_line(unet, spec, scale, message):
    with pytest.raises(ValueError, match=message) as err:
        with redilate(unet, scale, spec):
            pass
    assert "\n" not in str(err.value)
    assert unet.get_submodule("mid_block.resnets.0.conv1").dilation == (1, 1)


def test_a_transformer_is_refused():
    with pytest.raises(ValueError, match="needs a U-Net"):
        parse_blocks("auto", nn.Linear(2, 2))


def test_lorad_wrapped_convolutions_are_redilated_and_restored():
    unet = tiny_unet(sample_size=8, seed=4)
    lorad.attach(unet, lorad.preset("sd-unet-student", rank=2, include_conv=True), "student")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorad.adapter_parameters(unet, "student"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = _x()
    before = _call(unet, x)
    with redilate(unet, 2, "mid_block"):
        inside = _call(unet, x)
    assert inside.shape == before.shape and not torch.allclose(inside, before)
    assert torch.equal(_call(unet, x), before)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("teachers") / "sd")


def _pixels(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


@pytest.mark.parametrize("route", ["--pipeline", "--teacher"])
def test_generate_redilate_cli(sd_dir, tmp_path, route, capsys):
    base = ["generate", route, str(sd_dir), "--prompt", "red car", "--resolution", "32"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "dil"), "--redilate"]) == 0
    assert main([*base, "--out", str(tmp_path / "spec"), "--redilate", "mid_block"]) == 0
    plain, dil, spec = (_pixels(tmp_path / n) for n in ("plain", "dil", "spec"))
    assert plain[0].shape[:2] == dil[0].shape[:2] == (32, 32)
    assert np.abs(plain[0] - dil[0]).max() > 0 and np.abs(dil[0] - spec[0]).max() > 0
    capsys.readouterr()
    assert main(["generate", route, str(sd_dir), "--prompt", "x", "--redilate",
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--redilate needs --resolution" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
