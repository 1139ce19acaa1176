"""Objectives: the gradient each hands the student, against float64 hand computations."""

import numpy as np
import pytest
import torch

from wadi.backbones.parametrization import DiscreteParametrization, FlowMatchingParametrization
from wadi.distill.losses import fake_score_loss, generator_loss
from wadi.distill.objectives import DMD, VSD, make_objective


def _abar():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return torch.as_tensor(np.cumprod(1 - betas))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x_t, e_r, e_f = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    return x0, x_t, torch.tensor([20, 500, 980]), e_r, e_f


def test_vsd_is_todays_loss_bit_for_bit():
    p = DiscreteParametrization(_abar())
    x0, x_t, t, e_r, e_f = _batch()
    got = VSD().generator_loss(x0, x_t, t, e_r, e_f, p)
    assert torch.equal(got, generator_loss(x0, e_r, e_f, _abar()[t]))
    eps_pred, eps = e_r.float(), e_f.float()
    assert torch.equal(
        VSD().fake_loss(eps_pred, eps, t, p), fake_score_loss(eps_pred, eps, _abar()[t])
    )


@pytest.mark.parametrize(
    "param", [DiscreteParametrization(_abar()), FlowMatchingParametrization(1000, shift=3.0)]
)
def test_dmd_gradient_is_the_per_sample_normalised_x0_difference(param):
    x0, x_t, t, e_r, e_f = _batch(1)
    loss = DMD().generator_loss(x0, x_t, t, e_r, e_f, param)
    loss.backward()
    # hand computation in numpy float64
    alpha, sigma = (v.numpy()[:, None, None, None] for v in param.alpha_sigma(t))
    xr = (x_t.numpy() - sigma * e_r.numpy()) / alpha
    xf = (x_t.numpy() - sigma * e_f.numpy()) / alpha
    x = x0.detach().numpy()
    grad = (xf - xr) / np.abs(x - xr).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(x0.grad.numpy(), grad / x.size, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(loss.detach()), 0.5 * np.mean(grad**2), rtol=1e-10)


def test_vsd_and_dmd_point_the_same_way():
    p = DiscreteParametrization(_abar())
    grads = []
    for objective in (VSD(), DMD()):
        x0, x_t, t, e_r, e_f = _batch(2)
        objective.generator_loss(x0, x_t, t, e_r, e_f, p).backward()
        grads.append(x0.grad.flatten(1))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1)
    assert (cos > 0.999).all()  # same direction per sample, different scale


def test_make_objective_names_the_choices():
    assert isinstance(make_objective("dmd"), DMD)
    with pytest.raises(ValueError, match="vsd, dmd"):
        make_objective("gan")
