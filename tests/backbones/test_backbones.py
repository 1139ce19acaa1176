"""Loading, prompt encoding and eps prediction of the tiny SD (eps, v) and PixArt teachers."""

import json
import shutil

import numpy as np
import pytest
import torch

from wadi import lorad
from wadi.backbones import (
    TextCondition,
    alpha_bar_from_scheduler,
    load_backbone,
    one_step,
    sample_multistep,
)
from wadi.testing import attach_random_adapter

PROMPTS = ["a photo of a cat", "red car"]


@pytest.fixture(scope="module")
def backbones(teacher_dirs):
    return {name: load_backbone(path) for name, path in teacher_dirs.items()}


def _noise(backbone, batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, backbone.latent_channels, size, size, generator=g)


def _scaled_linear_abar(n=1000, start=0.00085, end=0.012):
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_load_kinds_and_presets(backbones):
    sd, v, px = backbones["sd-eps"], backbones["sd-v"], backbones["pixart"]
    assert (sd.kind, sd.student_preset, sd.fake_preset) == (
        "sd-unet",
        "sd-unet-student",
        "sd-unet-fake",
    )
    assert (px.kind, px.student_preset, px.fake_preset) == (
        "pixart",
        "pixart-student",
        "pixart-fake",
    )
    assert sd.prediction_type == "epsilon" and v.prediction_type == "v_prediction"
    for b in backbones.values():
        assert b.latent_channels == 4 and b.vae is not None
        assert b.latent_size(16) == 8  # tiny VAE: factor 2
        assert not any(p.requires_grad for p in b.denoiser.parameters())
        assert not b.denoiser.training
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        sd.latent_size(15)


def test_alphas_cumprod_is_float64_and_matches_the_schedule(backbones):
    abar = backbones["sd-eps"].alphas_cumprod()
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    # the scheduler computes in float32: agree with the float64 formula to float32 precision
    np.testing.assert_allclose(abar.numpy(), _scaled_linear_abar(), rtol=2e-5)
    assert alpha_bar_from_scheduler(backbones["sd-eps"].scheduler) == pytest.approx(
        0.00466, abs=1e-5
    )
    px = backbones["pixart"].alphas_cumprod()
    ref = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    np.testing.assert_allclose(px.numpy(), ref, rtol=1e-4)


def test_sd_encode_prompts_is_the_pipeline_encoding(backbones):
    b = backbones["sd-eps"]
    cond = b.encode_prompts(PROMPTS)
    assert cond.mask is None and cond.embeds.shape == (2, b.tokenizer.model_max_length, 16)
    ids = b.tokenizer(
        PROMPTS,
        padding="max_length",
        max_length=b.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        ref = b.text_encoder(ids)[0]
    assert torch.equal(cond.embeds, ref)
    assert not cond.embeds.requires_grad


def test_pixart_encode_prompts_keeps_the_t5_mask(backbones):
    b = backbones["pixart"]
    cond = b.encode_prompts(PROMPTS + [""])
    assert cond.embeds.shape[:2] == (3, 120) and cond.mask.shape == (3, 120)
    # tokens + </s>; the null prompt is only </s>
    n_tokens = [len(b.tokenizer(p).input_ids) for p in PROMPTS + [""]]
    assert cond.mask.sum(1).tolist() == n_tokens and n_tokens[-1] == 1
    assert cond.mask[0, : n_tokens[0]].all() and not cond.mask[0, n_tokens[0] :].any()


def test_predict_eps_epsilon_is_the_unet_output(backbones):
    b = backbones["sd-eps"]
    x, cond = _noise(b), b.encode_prompts(PROMPTS)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = b.denoiser(x, t, encoder_hidden_states=cond.embeds).sample
        got = b.predict_eps(x, t, cond)
    assert torch.equal(got, ref)


def test_predict_eps_converts_v_prediction_in_float64(backbones):
    b = backbones["sd-v"]
    x, cond = _noise(b), b.encode_prompts(PROMPTS)
    t = torch.tensor([3, 901])
    with torch.no_grad():
        v = b.denoiser(x, t, encoder_hidden_states=cond.embeds).sample
        eps = b.predict_eps(x, t, cond)
    abar = _scaled_linear_abar()[t.numpy()][:, None, None, None]
    ref = np.sqrt(abar) * v.double().numpy() + np.sqrt(1 - abar) * x.double().numpy()
    np.testing.assert_allclose(eps.double().numpy(), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps, v, atol=1e-3)  # the conversion did something


def test_pixart_drops_the_variance_half_and_honours_the_mask(backbones):
    b = backbones["pixart"]
    assert b.denoiser.config.out_channels == 8 and b.learned_sigma
    x, cond = _noise(b), b.encode_prompts(PROMPTS)
    t = torch.tensor([999, 400])
    with torch.no_grad():
        full = b.denoiser(
            x,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        eps = b.predict_eps(x, t, cond)
        # padded positions are masked out: changing their embeddings changes nothing
        noisy = TextCondition(cond.embeds + 5.0 * (1 - cond.mask[..., None]), cond.mask)
        eps_noisy = b.predict_eps(x, t, noisy)
        eps_unmasked = b.predict_eps(x, t, TextCondition(noisy.embeds, torch.ones_like(cond.mask)))
    assert eps.shape == x.shape and torch.equal(eps, full[:, :4])
    torch.testing.assert_close(eps_noisy, eps, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps_unmasked, eps, atol=1e-3)


def test_pixart_resolution_conditioning_when_the_model_has_it(pixart_1024_dir):
    b = load_backbone(pixart_1024_dir)
    assert b.denoiser.use_additional_conditions
    x, cond = _noise(b), b.encode_prompts(PROMPTS)
    added = {
        "resolution": torch.tensor([[16.0, 16.0]] * 2),
        "aspect_ratio": torch.tensor([[1.0]] * 2),
    }
    with torch.no_grad():
        ref = b.denoiser(
            x,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            timestep=torch.tensor([500, 500]),
            added_cond_kwargs=added,
        ).sample[:, :4]
        got = b.predict_eps(x, 500, cond)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["sd-eps", "sd-v", "pixart"])
def test_predict_eps_cfg_is_one_batched_call(backbones, name):
    b = backbones[name]
    x, cond, null = _noise(b), b.encode_prompts(PROMPTS), b.encode_prompts([""])
    calls = []
    handle = b.denoiser.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        with torch.no_grad():
            guided = b.predict_eps_cfg(x, 600, cond, null, 4.5)
    finally:
        handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        e_c = b.predict_eps(x, 600, cond).double()
        e_n = b.predict_eps(x, 600, null.expand(2)).double()
    ref = e_n + 4.5 * (e_c - e_n)
    torch.testing.assert_close(guided.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sd-eps", "sd-v", "pixart"])
def test_one_step_matches_the_formula_and_keeps_the_graph(backbones, name, teacher_dirs):
    b = load_backbone(teacher_dirs[name])  # own copy: an adapter gets attached
    attach_random_adapter(b.denoiser, b.student_preset, rank=2)
    z, cond = _noise(b), b.encode_prompts(PROMPTS)
    a = alpha_bar_from_scheduler(b.scheduler)
    x0 = one_step(b, z, cond, a)
    with torch.no_grad():
        eps = b.predict_eps(z, 999, cond).double().numpy()
    ref = (z.double().numpy() - np.sqrt(1 - a) * eps) / np.sqrt(a)
    np.testing.assert_allclose(x0.detach().double().numpy(), ref, rtol=1e-4, atol=1e-3)
    x0.square().mean().backward()
    grads = [p.grad for p in lorad.adapter_parameters(b.denoiser, "student")]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="alpha_bar_T must be in"):
        one_step(b, z, cond, 1.5)


def test_sample_multistep_is_deterministic_and_one_step_at_steps_1(backbones):
    b = backbones["sd-eps"]
    z, cond, null = _noise(b), b.encode_prompts(PROMPTS), b.encode_prompts([""])
    x1 = sample_multistep(b, cond, null, z, steps=4, guidance=3.0)
    x2 = sample_multistep(b, cond, null, z, steps=4, guidance=3.0)
    assert x1.shape == z.shape and torch.isfinite(x1).all() and torch.equal(x1, x2)
    assert not torch.allclose(x1, sample_multistep(b, cond, null, z, steps=4, guidance=1.0))
    # a single trailing DDIM step from t=999 is the one-step generator
    single = sample_multistep(b, cond, null, z, steps=1, guidance=1.0)
    with torch.no_grad():
        ref = one_step(b, z, cond, alpha_bar_from_scheduler(b.scheduler))
    torch.testing.assert_close(single, ref, rtol=1e-4, atol=1e-4)


def test_decode_returns_images_in_range(backbones):
    b = backbones["sd-eps"]
    images = b.decode(_noise(b))
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_pixel_space_teacher(pixel_dir):
    b = load_backbone(pixel_dir)
    assert b.kind == "sd-unet" and b.vae is None and b.latent_channels == 1
    assert b.latent_size(8) == 8
    x = _noise(b)
    assert b.decode(x) is x
    with torch.no_grad():
        assert one_step(b, x, b.encode_prompts(PROMPTS), 0.0047).shape == x.shape


def test_without_text_encoder(sd_dir, tmp_path):
    folder = tmp_path / "no-text"
    shutil.copytree(sd_dir, folder)
    shutil.rmtree(folder / "text_encoder")
    b = load_backbone(folder, load_text_encoder=False)
    assert b.text_encoder is None and b.tokenizer is None
    with pytest.raises(ValueError, match="load_text_encoder=False"):
        b.encode_prompts(["a cat"])
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json missing.*precomputed"):
        load_backbone(folder)


def test_load_errors(sd_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_backbone(tmp_path / "file")

    no_unet = tmp_path / "no-unet"
    shutil.copytree(sd_dir, no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(FileNotFoundError, match="no transformer/ or unet/ subfolder"):
        load_backbone(no_unet)

    no_sched = tmp_path / "no-scheduler"
    shutil.copytree(sd_dir, no_sched)
    shutil.rmtree(no_sched / "scheduler")
    with pytest.raises(FileNotFoundError, match="incomplete: scheduler/scheduler_config.json"):
        load_backbone(no_sched)

    sdxl = tmp_path / "sdxl"
    shutil.copytree(sd_dir, sdxl)
    config = json.loads((sdxl / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (sdxl / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*UNet2DConditionModel"):
        load_backbone(sdxl)

    other = tmp_path / "sana"
    (other / "transformer").mkdir(parents=True)
    (other / "transformer" / "config.json").write_text('{"_class_name": "SanaTransformer2DModel"}')
    with pytest.raises(ValueError, match="unsupported architecture.*SanaTransformer2DModel"):
        load_backbone(other)


def test_bf16_pixart_runs_its_output_head_in_fp32(pixart_dir):
    """x0 = (z - sqrt(1 - abar_T) eps) / sqrt(abar_T) amplifies eps's rounding 157x."""
    from wadi.generators import OneStep

    ref = load_backbone(pixart_dir, dtype=torch.float32)
    b = load_backbone(pixart_dir, dtype=torch.bfloat16)
    assert b.denoiser.proj_out.weight.dtype == torch.float32
    assert b.denoiser.transformer_blocks[0].ff.net[2].weight.dtype == torch.bfloat16
    cond = ref.encode_prompts(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = b.predict(z.bfloat16(), 999, cond.to(dtype=torch.bfloat16))
        assert eps.dtype == torch.float32  # not rounded to bf16 on the way out
        x_ref = OneStep().sample(ref, z, cond)
        x = OneStep().sample(b, z.bfloat16(), cond.to(dtype=torch.bfloat16))
    assert x.dtype == torch.float32
    # the bf16 body still costs accuracy; the output is finite and close in relative terms
    assert torch.isfinite(x).all()
    assert float((x - x_ref).pow(2).mean().sqrt()) < 0.05 * float(x_ref.pow(2).mean().sqrt())
