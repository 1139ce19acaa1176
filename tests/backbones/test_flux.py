"""FLUX.1 teachers: CLIP pooled + T5, packed latents, guidance embedding, stock FluxPipeline export."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as stock_calculate_shift

from wadi import lorad
from wadi.backbones import FluxBackbone, load_backbone
from wadi.backbones.export import pipeline_call, save_pipeline
from wadi.backbones.flux import calculate_shift
from wadi.backbones.parametrization import FlowMatchingParametrization
from wadi.generators import MultiStep, OneStep
from wadi.lorad import attach, count_adapter_parameters, lorad_layers, preset
from wadi.testing import attach_random_adapter, make_tiny_flux

PROMPTS = ["a photo of a cat", "red car"]


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"dev": make_tiny_flux(root / "dev"), "schnell": make_tiny_flux(root / "s", False)}


@pytest.fixture(scope="module")
def dev(flux_dirs):
    return load_backbone(flux_dirs["dev"])


def _stock(folder) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pack(x):
    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def test_load_backbone_picks_flux(dev, flux_dirs):
    assert type(dev) is FluxBackbone and dev.kind == "flux"
    assert (dev.student_preset, dev.fake_preset) == ("flux-student", "flux-fake")
    assert dev.latent_channels == 16 and dev.prediction_type == "flow"
    assert dev.guidance_embeds and dev.guidance == 3.5
    assert dev.resolution == 256  # the stock default_sample_size 128 x VAE factor 2
    for module in (dev.denoiser, dev.text_encoder, dev.text_encoder_2, dev.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    schnell = load_backbone(flux_dirs["schnell"])
    assert not schnell.guidance_embeds and schnell.guidance is None
    assert schnell.parametrization.shift == 1.0


@pytest.mark.parametrize("resolution", [16, 64, 256])
def test_dynamic_shift_is_the_stock_schedule(dev, resolution):
    """The parametrization's sigmas are diffusers' time-shifted ones for that image size."""
    dev.resolution = resolution
    try:
        param = dev.parametrization
        assert isinstance(param, FlowMatchingParametrization)
        seq = (resolution // 2 // 2) ** 2
        mu = stock_calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert dev.mu() == pytest.approx(mu, abs=1e-12) and calculate_shift(seq) == pytest.approx(
            mu
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dev.scheduler.config)
        levels = np.arange(1000, 0, -1) / 1000  # every training level, unshifted
        scheduler.set_timesteps(sigmas=levels, mu=mu)
        stock = scheduler.sigmas[:-1].flip(0).double()
        torch.testing.assert_close(param.sigmas, stock, rtol=0, atol=1e-6)
        assert param.sigmas[-1] == 1.0
    finally:
        dev.resolution = 256
    assert dev.parametrization.shift == pytest.approx(
        np.exp(stock_calculate_shift(256 * 256 // 16))
    )


def test_encode_prompts_is_the_stock_encode_prompt(dev, flux_dirs):
    pipe = _stock(flux_dirs["dev"])
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
    cond = dev.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 512, 32) and cond.pooled.shape == (2, 16)
    assert cond.mask is None and not text_ids.any()
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)


def test_predict_is_the_packed_transformer_call(dev):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 16, 8, 8), generator=g)
    t = torch.tensor([999, 300])
    cond = dev.encode_prompts(PROMPTS)
    sigmas = dev.parametrization.sigmas[t].float()
    with torch.no_grad():
        ours = dev.predict(x, t, cond)
        direct = dev.denoiser(
            hidden_states=_pack(x),
            timestep=sigmas,
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(512, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        ).sample
        direct = FluxPipeline._unpack_latents(direct, 16, 16, 2)
        torch.testing.assert_close(ours, direct, rtol=0, atol=1e-6)
        # guidance-distilled CFG: one pass with guidance = scale, the null prompt unused
        null = dev.encode_prompts([""])
        eps = dev.predict_eps_cfg(x, t, cond, null, 5.0)
        dev.guidance = 5.0
        try:
            at5 = dev.predict(x, t, cond)
        finally:
            dev.guidance = 3.5
        assert not torch.allclose(at5, ours, atol=1e-5), "the guidance input must be used"
        torch.testing.assert_close(eps, dev.parametrization.to_eps(at5, x, t))
        torch.testing.assert_close(eps, dev.predict_eps_cfg(x, t, cond, cond[:1], 5.0))


def test_schnell_cfg_is_two_passes(flux_dirs):
    b = load_backbone(flux_dirs["schnell"])
    x = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])
    cond, null = b.encode_prompts(PROMPTS), b.encode_prompts([""])
    with torch.no_grad():
        guided = b.predict_eps_cfg(x, t, cond, null, 2.0)
        e_c, e_n = b.predict_eps(x, t, cond), b.predict_eps(x, t, null.expand(2))
    torch.testing.assert_close(guided, e_n + 2.0 * (e_c - e_n), rtol=1e-5, atol=1e-5)


def _student(folder):
    b = load_backbone(folder)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    return b


@pytest.mark.parametrize(
    "kind,generator", [("dev", OneStep()), ("dev", OneStep(749)), ("schnell", OneStep())]
)
def test_export_is_a_stock_flux_pipeline_equal_to_the_generator(
    flux_dirs, tmp_path, kind, generator
):
    b = _student(flux_dirs[kind])
    b.resolution = 16  # the sampling size: the dynamic shift of t = 749 depends on it
    g = torch.Generator().manual_seed(7)
    z = torch.randn((len(PROMPTS), 16, 8, 8), generator=g)
    with torch.no_grad():
        ours = generator.sample(b, z, b.encode_prompts(PROMPTS), g)
        with lorad.disabled(b.denoiser):
            teacher = generator.sample(b, z, b.encode_prompts(PROMPTS), torch.Generator())
    assert not torch.allclose(ours, teacher, atol=1e-3), "the adapter must change the model"
    out = save_pipeline(
        b, lorad.merge_and_unload(b.denoiser, "student"), tmp_path / "pipe", generator=generator
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    call = pipeline_call(b, generator)
    assert call["guidance_scale"] == (3.5 if kind == "dev" else 1.0)
    pipe = _stock(out)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    stock = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        height=16,
        width=16,
        **call,
    ).images
    stock = FluxPipeline._unpack_latents(stock, 16, 16, 2)
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_multi_step_export_is_flow_lcm_with_the_generators_sigmas(dev, tmp_path):
    """A few-step FLUX export: FlowMatchLCM at the generator's sigmas.  The stock call draws
    the re-noising noise from torch's global RNG in packed layout, so wadi's generator is
    given that same noise, unpacked, to compare samples."""
    generator = MultiStep([999, 499])
    dev.resolution = 16
    try:
        out = save_pipeline(dev, dev.denoiser, tmp_path / "pipe", generator=generator)
        call = pipeline_call(dev, generator)
        pipe = _stock(out)
        assert type(pipe.scheduler) is FlowMatchLCMScheduler
        z = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(7))
        packed_noise = torch.randn((2, 16, 64), generator=torch.Generator().manual_seed(11))
        noise = FluxPipeline._unpack_latents(packed_noise, 16, 16, 2)
        with torch.no_grad():
            ours = generator.train_sample(dev, z, dev.encode_prompts(PROMPTS), 1, noises=[noise])
        torch.manual_seed(11)
        stock = pipe(
            PROMPTS, latents=_pack(z), output_type="latent", height=16, width=16, **call
        ).images
        expected = dev.parametrization.sigmas[[999, 499]].float()
        torch.testing.assert_close(pipe.scheduler.sigmas[:-1], expected, rtol=0, atol=1e-6)
    finally:
        dev.resolution = 256
    stock = FluxPipeline._unpack_latents(stock, 16, 16, 2)
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_bad_resolution_is_one_line(dev):
    with pytest.raises(ValueError, match=r"FLUX resolution 18 must be a positive multiple of 4"):
        dev.latent_size(18)
    x = torch.zeros((1, 16, 7, 7))
    with pytest.raises(ValueError, match=r"cannot be packed into 2x2 patches") as err:
        dev.predict(x, 999, dev.encode_prompts(PROMPTS[:1]))
    assert "\n" not in str(err.value) and "multiple of 4 px" in str(err.value)


def test_flux_without_t5_weights_is_one_line(flux_dirs, tmp_path):
    broken = tmp_path / "no-t5"
    shutil.copytree(flux_dirs["dev"], broken)
    for f in (broken / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"the T5 weights .* missing") as err:
        load_backbone(broken)
    assert "\n" not in str(err.value) and "FluxPipeline folder" in str(err.value)
    b = load_backbone(broken, load_text_encoder=False)  # precomputed embeddings need none
    with pytest.raises(ValueError, match=r"the T5 weights .* missing"):
        save_pipeline(b, b.denoiser, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_distill_smoke_on_a_tiny_flux_dev(flux_dirs, tmp_path):
    """Two VSD steps on FLUX.1-dev-like (guidance embedding) train and export a stock pipeline."""
    from tests.distill.conftest import PROMPTS as LINES
    from tests.distill.conftest import tiny_config

    from wadi.distill import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(LINES)
    result = train(
        tiny_config(flux_dirs["dev"], prompts, tmp_path / "run", max_steps=2, guidance_scale=3.5)
    )
    assert result.steps == 2 and result.skipped_steps == 0
    losses = [row[k] for row in result.history for k in row if "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert any(v.abs().sum() > 0 for v in result.student_state.values())
    info = json.loads((result.final_dir / "pipeline" / "wadi_export.json").read_text())
    assert info["pipeline_call"]["guidance_scale"] == 3.5


#: black-forest-labs/FLUX.1-dev transformer/config.json (the rest are the class defaults)
FLUX_DEV = dict(guidance_embeds=True)


def test_presets_on_the_real_flux_dev_transformer():
    """Trainable counts of the FLUX presets on FLUX.1-dev's transformer (docs/benchmarks.md)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    total = sum(p.numel() for p in model.parameters())
    attach(model, preset("flux-student"), "student")
    attach(model, preset("flux-fake"), "fake")
    counts = {role: count_adapter_parameters(model, role) for role in ("student", "fake")}
    layers = sum("student" in layer.lorad_A for _, layer in lorad_layers(model))
    print(f"FLUX.1-dev: {total:,} params, {layers} layers, {counts}")
    assert total == 11_901_408_320  # the published FLUX.1-dev transformer: 11.9B
    assert counts == {"student": 537_919_488, "fake": 134_479_872}
    assert layers == 494  # every Linear of the 19 + 38 blocks (504 in all)


def test_export_without_text_encoders_in_memory_reads_both_from_the_teacher(flux_dirs, tmp_path):
    b = load_backbone(flux_dirs["schnell"], load_text_encoder=False)
    assert b.text_encoder is None and b.text_encoder_2 is None
    out = save_pipeline(b, b.denoiser, tmp_path / "pipe")
    pipe = _stock(out)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
