"""Generators against a float64 hand loop over the teacher's own schedule."""

import numpy as np
import pytest
import torch

from wadi.backbones import load_backbone
from wadi.generators import MultiStep, OneStep, make_generator

PROMPTS = ["a red cube", "a blue ball"]


def _hand_x0(b, x, t, cond):
    """x0 from the raw output in float64, straight from the scheduler's table."""
    abar = float(torch.as_tensor(b.scheduler.alphas_cumprod, dtype=torch.float64)[t])
    out = b.predict(x, t, cond).double()
    xd = x.double()
    if b.prediction_type == "epsilon":
        return (xd - np.sqrt(1 - abar) * out) / np.sqrt(abar)
    return np.sqrt(abar) * xd - np.sqrt(1 - abar) * out


@pytest.mark.parametrize("name", ["sd-eps", "sd-v", "pixart"])
def test_multistep_sample_is_the_renoising_chain(gen_teachers, name):
    b = load_backbone(gen_teachers[name])
    cond = b.encode_prompts(PROMPTS)
    shape = (2, b.latent_channels, 8, 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    steps = [999, 749, 499, 249]
    with torch.no_grad():
        got = MultiStep(steps).sample(b, z, cond, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        x = z
        for i, t in enumerate(steps):
            x0 = _hand_x0(b, x, t, cond)
            if i + 1 < len(steps):
                abar = float(
                    torch.as_tensor(b.scheduler.alphas_cumprod, dtype=torch.float64)[steps[i + 1]]
                )
                eps = torch.randn(shape, generator=g).double()
                x = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps).float()
    np.testing.assert_allclose(got.double().numpy(), x0.numpy(), rtol=1e-4, atol=1e-4)


def test_train_sample_at_step_k_continues_the_no_grad_chain(gen_teachers):
    b = load_backbone(gen_teachers["sd-eps"])
    cond = b.encode_prompts(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    gen = MultiStep([999, 666, 333])
    b.denoiser.requires_grad_(True)
    x0 = gen.train_sample(b, z, cond, 2, torch.Generator().manual_seed(3))
    assert x0.requires_grad  # only the last step keeps the graph
    with torch.no_grad():
        full = gen.sample(b, z, cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x0.detach(), full)
    # step 0 is the one-step generator at the first timestep
    x_first = gen.train_sample(b, z, cond, 0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_first.detach(), OneStep(999).sample(b, z, cond).detach())
    b.denoiser.requires_grad_(False)


def test_draw_step_uses_no_randomness_for_one_step():
    g = torch.Generator().manual_seed(0)
    before = g.get_state().clone()
    assert OneStep().draw_step(g, "cpu") == 0
    assert torch.equal(g.get_state(), before)
    draws = {MultiStep([999, 499]).draw_step(g, "cpu") for _ in range(50)}
    assert draws == {0, 1}


def test_alpha_bar_override_and_one_line_errors(gen_teachers):
    b = load_backbone(gen_teachers["sd-eps"])
    assert OneStep(999, 0.0047).alpha_bar(b) == 0.0047
    assert OneStep(899).alpha_bar(b) == pytest.approx(float(b.scheduler.alphas_cumprod[899]))
    assert isinstance(make_generator([999]), OneStep)
    assert isinstance(make_generator([999, 499]), MultiStep)
    assert make_generator([999, 499]).to_dict()["timesteps"] == [999, 499]
    with pytest.raises(ValueError, match="strictly decrease"):
        MultiStep([499, 999])
    with pytest.raises(ValueError, match="at least one"):
        MultiStep([])
    with pytest.raises(ValueError, match="outside the teacher"):
        OneStep(1000).sample(b, torch.zeros(1, 4, 8, 8), b.encode_prompts(["x"]))


def test_precision_warning_for_16_bit_and_a_large_gain(gen_teachers):
    pix16 = load_backbone(gen_teachers["pixart"], dtype=torch.bfloat16)
    assert "157" in OneStep().precision_warning(pix16)
    assert OneStep(999, 0.0047).precision_warning(pix16) is None  # 1/alpha = 14.6
    assert OneStep().precision_warning(load_backbone(gen_teachers["pixart"])) is None
