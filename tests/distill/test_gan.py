"""DMD2's GAN term: losses by hand, the head at tiny sizes, the bottleneck hook, gradients."""

import contextlib
import math

import pytest
import torch
from torch import nn

from wadi.backbones import load_backbone
from wadi.distill.gan import (
    BottleneckHead,
    GANTerm,
    bottleneck_channels,
    capture_bottleneck,
    discriminator_loss,
    generator_gan_loss,
)

torch.set_num_threads(1)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.fixture(scope="module")
def sd(teachers):
    return load_backbone(teachers["sd-eps"])


@pytest.fixture(scope="module")
def pixart(teachers):
    return load_backbone(teachers["pixart"])


def noisy_batch(backbone, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, backbone.latent_channels, 8, 8, generator=g)
    cond = backbone.encode_prompts(["a cat", "a red car", "a dog", "a tree"][:n])
    return x_t, cond


# -- losses ---------------------------------------------------------------------------------


def test_discriminator_loss_by_hand():
    real = torch.tensor([0.0, 2.0, -0.5], dtype=torch.float64)
    fake = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    expected = (softplus(0.0) + softplus(-2.0) + softplus(0.5)) / 3 + (
        softplus(-1.0) + softplus(3.0)
    ) / 2
    got = discriminator_loss(real, fake)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-14)


def test_generator_gan_loss_by_hand():
    fake = torch.tensor([-1.0, 3.0, 0.25, 0.0], dtype=torch.float64)
    expected = (softplus(1.0) + softplus(-3.0) + softplus(-0.25) + softplus(0.0)) / 4
    assert generator_gan_loss(fake).item() == pytest.approx(expected, rel=1e-14)


def test_losses_stay_finite_at_extreme_logits():
    big = torch.tensor([1000.0], dtype=torch.float64)
    assert discriminator_loss(big, -big).item() == 0.0  # perfect classifier
    assert discriminator_loss(-big, big).item() == pytest.approx(2000.0, rel=1e-12)
    assert generator_gan_loss(-big).item() == pytest.approx(1000.0, rel=1e-12)
    assert generator_gan_loss(big).item() == 0.0


# -- the head -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 1, 1), (3, 16, 2, 2), (3, 32, 4, 4), (3, 4, 1, 1)])
def test_head_one_logit_per_sample_on_feature_maps(shape):
    torch.manual_seed(0)
    head = BottleneckHead(in_channels=shape[1])
    features = torch.randn(shape)
    logits = head(features)
    assert logits.shape == (shape[0],) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # samples are told apart even at 1x1 (GroupNorm over one value per group would not)
    assert logits.std() > 1e-4
    # per-sample: a sample's logit does not depend on the rest of the batch
    assert torch.allclose(head(features[1:2]), logits[1:2], atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 4])
def test_head_on_tokens_and_lazy_build(tokens):
    torch.manual_seed(0)
    head = BottleneckHead()
    assert not head.built and list(head.parameters()) == []
    features = torch.randn(2, tokens, 24)
    logits = head(features)
    assert head.built and head.layout == "tokens" and head.in_channels == 24
    assert logits.shape == (2,) and logits.std() > 1e-4
    assert len(list(head.parameters())) > 0
    with pytest.raises(ValueError, match="built for tokens features with 24 channels"):
        head(torch.randn(2, 24, 2, 2))
    with pytest.raises(ValueError, match=r"takes \(B, C, H, W\) feature maps or \(B, N, C\)"):
        head(torch.randn(2, 24))


def test_head_stays_fp32():
    torch.manual_seed(0)
    head = BottleneckHead(in_channels=16)
    before = [p.detach().clone() for p in head.parameters()]
    head.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))  # not rounded
    features = torch.randn(2, 16, 2, 2).to(torch.bfloat16)
    logits = head(features)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, head(features.float()))


def test_head_learns_separable_features():
    torch.manual_seed(0)
    head = BottleneckHead(in_channels=8)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    direction = torch.randn(8, 1, 1)

    def batch(n=16):
        noise = torch.randn(2, n, 8, 2, 2)
        return noise[0] + direction, noise[1] - direction

    real_eval, fake_eval = batch(64)
    with torch.no_grad():
        start = discriminator_loss(head(real_eval), head(fake_eval)).item()
    for _ in range(30):
        real, fake = batch()
        loss = discriminator_loss(head(real), head(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = discriminator_loss(head(real_eval), head(fake_eval)).item()
    assert start > 1.0  # about 2 ln 2 for an untrained head
    assert end < 0.5 * start


# -- the bottleneck -------------------------------------------------------------------------


def test_capture_unet_mid_block(sd):
    x_t, cond = noisy_batch(sd, 2)
    calls = {"up": 0}
    handle = sd.denoiser.up_blocks[0].register_forward_hook(
        lambda *_: calls.__setitem__("up", calls["up"] + 1)
    )
    try:
        with torch.no_grad():
            with capture_bottleneck(sd.denoiser) as full:
                out = sd.predict(x_t, 500, cond)
            assert out.shape == x_t.shape and calls["up"] == 1
            with capture_bottleneck(sd.denoiser, stop=True) as early:
                sd.predict(x_t, 500, cond)
                pytest.fail("the forward should have stopped at the bottleneck")
    finally:
        handle.remove()
    assert calls["up"] == 1  # stop=True skipped the decoder half
    c = sd.denoiser.config.block_out_channels[-1]
    assert full.features.shape == (2, c, 4, 4) == early.features.shape
    assert bottleneck_channels(sd.denoiser) == c
    assert torch.equal(full.features, early.features) and early.calls == 1
    assert not sd.denoiser.mid_block._forward_hooks  # the hook is gone


def test_capture_pixart_middle_block(pixart):
    x_t, cond = noisy_batch(pixart, 2)
    blocks = pixart.denoiser.transformer_blocks
    seen = {}
    handle = blocks[len(blocks) // 2].register_forward_hook(
        lambda m, a, out: seen.setdefault("out", out)
    )
    try:
        with torch.no_grad(), capture_bottleneck(pixart.denoiser) as cap:
            pixart.predict(x_t, 500, cond)
    finally:
        handle.remove()
    width = bottleneck_channels(pixart.denoiser)
    patch = pixart.denoiser.config.patch_size
    assert cap.features.shape == (2, (8 // patch) ** 2, width)
    assert torch.equal(cap.features, seen["out"])
    head = BottleneckHead.for_denoiser(pixart.denoiser)
    assert head.layout == "tokens" and head(cap.features).shape == (2,)


def test_capture_refuses_a_denoiser_without_bottleneck():
    with pytest.raises(ValueError, match="neither a mid_block .* nor transformer_blocks"):
        with capture_bottleneck(nn.Linear(3, 3)):
            pass


# -- the term -------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_role(counter):
    counter.append(1)
    yield


def test_generator_loss_gradient_reaches_x_t(sd):
    term = GANTerm.for_backbone(sd, weight=2.0)
    x_t, cond = noisy_batch(sd, 2)
    x_t.requires_grad_(True)
    entered = []
    loss = term.generator_loss(sd, x_t, 500, cond, lambda: counting_role(entered))
    assert entered == [1] and loss.ndim == 0
    assert loss.item() == pytest.approx(2.0 * term.stats["gan_g_loss"].item(), rel=1e-6)
    loss.backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all()
    assert x_t.grad.abs().sum() > 0
    assert all(p.grad is not None for p in term.parameters())
    assert all(p.grad is None for p in sd.denoiser.parameters())  # the frozen base


def test_generator_gradient_flows_through_the_fake_adapter_into_x0(teachers):
    from wadi.distill.losses import add_noise
    from wadi.distill.roles import Roles

    backbone = load_backbone(teachers["sd-eps"])
    roles = Roles(backbone, fake_rank=2)
    with torch.no_grad():  # a non-identity fake adapter
        for p in roles.fake_parameters():
            p.normal_(0, 0.1)
    term = GANTerm.for_backbone(backbone)
    x0, cond = noisy_batch(backbone, 2, seed=1)
    x0.requires_grad_(True)
    alpha_bar = backbone.alphas_cumprod()[[300, 700]].float()
    x_t = add_noise(x0, torch.randn_like(x0), alpha_bar)
    term.generator_loss(backbone, x_t, torch.tensor([300, 700]), cond, roles.fake).backward()
    assert x0.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in roles.fake_parameters())


def test_discriminator_loss_trains_head_not_generator(sd):
    term = GANTerm.for_backbone(sd, discriminator_weight=0.5)
    x_real, cond_real = noisy_batch(sd, 1, seed=2)
    x_fake, cond_fake = noisy_batch(sd, 3, seed=3)
    x_fake.requires_grad_(True)
    loss = term.discriminator_loss(
        sd, x_real, x_fake, (torch.tensor([100]), 400), (cond_real, cond_fake),
        contextlib.nullcontext,
    )  # fmt: skip
    assert loss.item() == pytest.approx(0.5 * term.stats["gan_d_loss"].item(), rel=1e-6)
    # the loss equals the classifier loss on separately computed logits
    real = term.logits(sd, x_real, 100, cond_real, contextlib.nullcontext)
    fake = term.logits(sd, x_fake, 400, cond_fake, contextlib.nullcontext)
    assert loss.item() == pytest.approx(0.5 * discriminator_loss(real, fake).item(), rel=1e-5)
    loss.backward()
    assert x_fake.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in term.parameters())
    # one condition shared by batches of different sizes: refused in one line
    with pytest.raises(
        ValueError, match="1 real and 1 fake conditions for batches of 1 real and 3"
    ):
        term.discriminator_loss(sd, x_real, x_fake, 0, cond_real, contextlib.nullcontext)


def test_generator_gradient_same_with_activation_checkpointing(teachers):
    """The hook stops the forward once; checkpoint recomputation in backward only records."""
    from wadi.distill.roles import Roles

    backbone = load_backbone(teachers["pixart"])  # DiT blocks are checkpointed with hooks
    roles = Roles(backbone, fake_rank=2)
    with torch.no_grad():
        for p in roles.fake_parameters():
            p.normal_(0, 0.1)
    torch.manual_seed(0)
    term = GANTerm.for_backbone(backbone, weight=1.0)
    x, cond = noisy_batch(backbone, 2, seed=4)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            roles.enable_gradient_checkpointing()
        roles.train()
        x_t = x.clone().requires_grad_(True)
        with roles.fake():  # backward in the role of its forward, as the loop does
            term.generator_loss(backbone, x_t, 500, cond, roles.fake).backward()
        grads.append(x_t.grad)
    assert backbone.denoiser.is_gradient_checkpointing
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)
