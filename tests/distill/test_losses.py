"""The VSD losses against values computed by hand (method.md section 4)."""

import math

import torch

from wadi.distill import add_noise, fake_score_loss, generator_loss, guided, vsd_gradient
from wadi.distill.losses import sample_timesteps


def test_add_noise_by_hand():
    x0 = torch.tensor([[[[2.0]]], [[[-1.0]]]])
    eps = torch.tensor([[[[1.0]]], [[[3.0]]]])
    abar = torch.tensor([0.25, 0.64], dtype=torch.float64)
    xt = add_noise(x0, eps, abar)
    assert torch.allclose(
        xt.flatten(), torch.tensor([0.5 * 2 + math.sqrt(0.75) * 1, 0.8 * -1 + 0.6 * 3])
    )


def test_guidance_by_hand():
    assert torch.equal(guided(torch.tensor([1.0]), torch.tensor([3.0]), 1.5), torch.tensor([4.0]))


def test_vsd_gradient_and_generator_loss_by_hand():
    # one sample, two elements; abar = 0.36 -> (1 - abar) = 0.64
    x0 = torch.tensor([[[[1.0, -2.0]]]], requires_grad=True)
    eps_real = torch.tensor([[[[0.5, 1.0]]]])
    eps_fake = torch.tensor([[[[0.0, 3.0]]]])
    abar = torch.tensor([0.36], dtype=torch.float64)
    g = vsd_gradient(eps_real, eps_fake, abar)
    assert torch.allclose(g.flatten().float(), torch.tensor([0.32, -1.28]))
    loss = generator_loss(x0, eps_real, eps_fake, abar)
    # 0.5 * mean(g^2) = 0.5 * (0.1024 + 1.6384) / 2
    assert math.isclose(loss.item(), 0.5 * (0.1024 + 1.6384) / 2, rel_tol=1e-6)
    loss.backward()
    # d/dx0 of 0.5*mean((x0 - sg(x0 - g))^2) = g / numel
    assert torch.allclose(x0.grad.flatten(), torch.tensor([0.16, -0.64]))


def test_generator_gradient_is_zero_when_fake_equals_teacher():
    x0 = torch.randn(2, 4, 3, 3, requires_grad=True)
    eps = torch.randn(2, 4, 3, 3)
    generator_loss(x0, eps, eps.clone(), torch.tensor([0.1, 0.9])).backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_generator_loss_maps_nan_to_num():
    x0 = torch.zeros(1, 1, 1, 2, requires_grad=True)
    eps_real = torch.tensor([[[[float("nan"), 1.0]]]])
    loss = generator_loss(x0, eps_real, torch.zeros_like(eps_real), torch.tensor([0.5]))
    assert torch.isfinite(loss)


def test_fake_score_loss_by_hand():
    eps_pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    eps = torch.tensor([[[[0.0, 0.0]]], [[[1.0, -1.0]]]])
    abar = torch.tensor([0.25, 0.81], dtype=torch.float64)
    # sample 0: 0.25 * (1 + 4); sample 1: 0.81 * (1 + 1); mean over 4 elements
    expected = (0.25 * 5 + 0.81 * 2) / 4
    assert math.isclose(fake_score_loss(eps_pred, eps, abar).item(), expected, rel_tol=1e-6)


def test_timesteps_cover_both_ends_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 20, 980, g, "cpu")
    assert t.min().item() == 20 and t.max().item() == 980
    assert t.dtype == torch.long
