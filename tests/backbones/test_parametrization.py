"""Parametrizations against hand computations in float64 (numpy), per prediction type."""

import numpy as np
import pytest
import torch

from wadi.backbones.parametrization import (
    DiscreteParametrization,
    FlowMatchingParametrization,
    from_scheduler,
)


def _scaled_linear(T=1000):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2
    return np.cumprod(1 - betas)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    return x0, eps, t


def _col(v):
    return np.asarray(v)[:, None, None, None]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_discrete_round_trips_every_prediction_type(data, kind):
    x0, eps, t = data
    abar = _scaled_linear()
    p = DiscreteParametrization(torch.as_tensor(abar), kind)
    a, s = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    x_t_ref = _col(a) * x0.numpy() + _col(s) * eps.numpy()
    x_t = p.add_noise(x0, eps, t)
    np.testing.assert_allclose(x_t.numpy(), x_t_ref, rtol=1e-12, atol=1e-12)
    # what the network would output if it were exact
    v = _col(a) * eps.numpy() - _col(s) * x0.numpy()
    output = {"epsilon": eps.numpy(), "v_prediction": v, "sample": x0.numpy()}[kind]
    output = torch.as_tensor(output)
    np.testing.assert_allclose(p.to_x0(output, x_t, t).numpy(), x0.numpy(), atol=1e-9)
    np.testing.assert_allclose(p.to_eps(output, x_t, t).numpy(), eps.numpy(), atol=1e-9)


def test_discrete_weights_are_the_wadi_ones(data):
    _, _, t = data
    abar = _scaled_linear()
    p = DiscreteParametrization(torch.as_tensor(abar))
    np.testing.assert_allclose(p.abar_equivalent(t).numpy(), abar[t], rtol=1e-12)
    np.testing.assert_allclose(p.vsd_weight(t).numpy(), 1 - abar[t], rtol=1e-12)
    np.testing.assert_allclose(p.fake_weight(t).numpy(), abar[t], rtol=1e-12)
    assert p.model_timestep(t).tolist() == t.tolist()


def test_with_alpha_bar_changes_one_entry_only():
    abar = torch.as_tensor(_scaled_linear())
    p = DiscreteParametrization(abar).with_alpha_bar(999, 0.0047)
    assert float(p.alpha_bar(999)) == 0.0047
    assert torch.equal(p.alphas_cumprod[:999], abar[:999].double())
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        DiscreteParametrization(abar).with_alpha_bar(999, 1.5)


def test_flow_matching_against_hand_formulas(data):
    x0, eps, t = data
    p = FlowMatchingParametrization(1000, shift=3.0)
    s = (t.numpy() + 1) / 1000.0
    s = 3.0 * s / (1 + 2.0 * s)
    assert s[-1] == 1.0  # the last step is pure noise
    x_t = p.add_noise(x0, eps, t)
    np.testing.assert_allclose(
        x_t.numpy(), _col(1 - s) * x0.numpy() + _col(s) * eps.numpy(), atol=1e-12
    )
    v = eps - x0
    np.testing.assert_allclose(p.to_x0(v, x_t, t).numpy(), x0.numpy(), atol=1e-9)
    np.testing.assert_allclose(p.to_eps(v, x_t, t).numpy(), eps.numpy(), atol=1e-9)
    # from pure noise, one step: x0 = z - v(z, 1)
    z = eps[2:]
    np.testing.assert_allclose(p.to_x0(v[2:], z, t[2:]).numpy(), (z - v[2:]).numpy(), atol=1e-12)
    np.testing.assert_allclose(p.model_timestep(t).numpy(), s * 1000, rtol=1e-6)
    # VP-equivalent abar: same signal-to-noise ratio
    snr = (1 - s[:2]) ** 2 / s[:2] ** 2
    np.testing.assert_allclose(p.abar_equivalent(t[:2]).numpy(), snr / (1 + snr), rtol=1e-12)


def test_eps_to_x0_matches_to_x0_for_any_path(data):
    x0, eps, t = data
    for p in (
        DiscreteParametrization(torch.as_tensor(_scaled_linear())),
        FlowMatchingParametrization(1000, shift=1.0),
    ):
        x_t = p.add_noise(x0[:2], eps[:2], t[:2])
        np.testing.assert_allclose(
            p.eps_to_x0(eps[:2], x_t, t[:2]).numpy(), x0[:2].numpy(), atol=1e-9
        )


def test_16_bit_outputs_convert_in_float32():
    p = DiscreteParametrization(torch.as_tensor(_scaled_linear()))
    x = torch.randn(2, 4, 2, 2)
    out = p.to_x0(x.bfloat16(), x.bfloat16(), torch.tensor([999, 999]))
    assert out.dtype == torch.float32


def test_out_of_range_timesteps_and_bad_tables_are_one_line():
    p = FlowMatchingParametrization(1000)
    with pytest.raises(ValueError, match="0..999"):
        p.add_noise(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteParametrization(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteParametrization(torch.tensor([0.5]), "flow")


def test_from_scheduler_picks_the_family():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    ddpm = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    p = from_scheduler(ddpm)
    assert isinstance(p, DiscreteParametrization) and p.prediction_type == "v_prediction"
    np.testing.assert_allclose(p.alphas_cumprod.numpy(), ddpm.alphas_cumprod.double().numpy())
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    q = from_scheduler(flow)
    assert isinstance(q, FlowMatchingParametrization) and q.shift == 3.0
    # diffusers' own table of noise levels, highest first
    np.testing.assert_allclose(q.sigmas.numpy()[::-1], flow.sigmas.double().numpy(), rtol=1e-6)
