"""SD3/SD3.5 teachers: CLIP-L + CLIP-G + optional T5, flow matching, stock SD3 pipeline export."""

import json
import shutil

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from wadi import lorad
from wadi.backbones import SD3Backbone, load_backbone
from wadi.backbones.export import pipeline_call, save_pipeline
from wadi.backbones.parametrization import FlowMatchingParametrization
from wadi.generators import MultiStep, OneStep
from wadi.lorad import attach, count_adapter_parameters, lorad_layers, preset
from wadi.testing import attach_random_adapter, make_tiny_sd3

PROMPTS = ["a photo of a cat", "red car"]

#: stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
#: stabilityai/stable-diffusion-3.5-large transformer/config.json
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432)
SD35_LARGE["qk_norm"] = "rms_norm"


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": make_tiny_sd3(root / "t5"), "no-t5": make_tiny_sd3(root / "no-t5", t5=False)}


@pytest.fixture(scope="module")
def sd3(sd3_dirs):
    return load_backbone(sd3_dirs["t5"])


def _stock(folder, t5=True) -> StableDiffusion3Pipeline:
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_backbone_picks_sd3(sd3, sd3_dirs):
    b = sd3
    assert type(b) is SD3Backbone and b.kind == "sd3"
    assert (b.student_preset, b.fake_preset) == ("sd3-student", "sd3-fake")
    assert b.prediction_type == "flow" and b.latent_channels == 16
    param = b.parametrization
    assert isinstance(param, FlowMatchingParametrization) and param.shift == 3.0
    # the scheduler's own training sigmas (descending) are the parametrization's
    torch.testing.assert_close(param.sigmas.float(), b.scheduler.sigmas.flip(0))
    assert float(param.model_timestep(torch.tensor([999]))) == 1000.0
    for module in (b.denoiser, b.text_encoder, b.text_encoder_2, b.text_encoder_3, b.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    no_t5 = load_backbone(sd3_dirs["no-t5"])
    assert no_t5.text_encoder_3 is None and no_t5.text_encoder_2 is not None


@pytest.mark.parametrize("kind", ["t5", "no-t5"])
def test_encode_prompts_is_the_stock_encode_prompt(sd3_dirs, kind):
    b = load_backbone(sd3_dirs[kind])
    pipe = _stock(sd3_dirs[kind], t5=kind == "t5")
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True
        )
    cond = b.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 16 + 256, 48) and cond.pooled.shape == (2, 8 + 12)
    assert cond.mask is None
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert bool(cond.embeds[:, 16:].any()) is (kind == "t5")  # zeros without T5
    null = b.encode_prompts([""])  # the stock negative: "" through the encoders
    torch.testing.assert_close(null.embeds, neg[:1])
    torch.testing.assert_close(null.pooled, neg_pooled[:1])


def test_load_t5_false_encodes_the_t5_part_as_zeros(sd3_dirs, monkeypatch):
    monkeypatch.setattr(SD3Backbone, "load_t5", False)
    b = load_backbone(sd3_dirs["t5"])
    assert b.text_encoder_3 is None
    cond = b.encode_prompts(PROMPTS)
    assert not cond.embeds[:, 16:].any()
    assert cond.embeds[:, :16].any()


def test_predict_is_the_transformer_call_at_sigma_times_1000(sd3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 16, 8, 8), generator=g)
    t = torch.tensor([999, 300])
    cond = sd3.encode_prompts(PROMPTS)
    sigmas = sd3.scheduler.sigmas.flip(0)  # index t: the level of step t
    with torch.no_grad():
        ours = sd3.predict(x, t, cond)
        direct = sd3.denoiser(
            hidden_states=x,
            timestep=sigmas[t] * 1000,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
        ).sample
        torch.testing.assert_close(ours, direct, rtol=0, atol=1e-6)
        other = sd3.predict(x, torch.tensor([999, 301]), cond)
        assert not torch.allclose(other[1], ours[1], atol=1e-6), "the timestep must be used"
        x0 = sd3.parametrization.to_x0(ours, x, t)
        torch.testing.assert_close(x0[0], x[0] - ours[0])  # sigma 1: x0 = z - v


def _student(folder):
    b = load_backbone(folder)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    return b


@pytest.mark.parametrize(
    "kind,generator",
    [
        ("t5", OneStep()),
        ("t5", OneStep(749)),
        ("t5", MultiStep([999, 499])),
        ("no-t5", OneStep()),
    ],
)
def test_export_is_a_stock_sd3_pipeline_equal_to_the_generator(sd3_dirs, tmp_path, kind, generator):
    b = _student(sd3_dirs[kind])
    g = torch.Generator().manual_seed(7)
    z = torch.randn((len(PROMPTS), 16, 8, 8), generator=g)
    with torch.no_grad():
        ours = generator.sample(b, z, b.encode_prompts(PROMPTS), torch.Generator().manual_seed(11))
        with lorad.disabled(b.denoiser):
            teacher = generator.sample(b, z, b.encode_prompts(PROMPTS), torch.Generator())
    assert not torch.allclose(ours, teacher, atol=1e-3), "the adapter must change the model"
    out = save_pipeline(
        b, lorad.merge_and_unload(b.denoiser, "student"), tmp_path / "pipe", generator=generator
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert (out / "text_encoder_3").is_dir() is (kind == "t5")
    pipe = _stock(out, t5=kind == "t5")
    expected = FlowMatchLCMScheduler if generator.num_steps > 1 else FlowMatchEulerDiscreteScheduler
    assert type(pipe.scheduler) is expected and pipe.scheduler.config.shift == 3.0
    info = json.loads((out / "wadi_export.json").read_text())
    assert info["pipeline_call"] == pipeline_call(b, generator) and info["alpha_bar_T"] is None
    # the stock SD3 call does not hand its generator to scheduler.step: FlowMatchLCM's
    # re-noising draws from torch's global RNG, so that is seeded like wadi's draws
    torch.manual_seed(11)
    stock = pipe(
        PROMPTS,
        latents=z,
        output_type="latent",
        height=16,
        width=16,
        **pipeline_call(b, generator),
    ).images
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_cfg_is_the_stock_velocity_guidance(sd3, tmp_path):
    """wadi's eps-CFG with null = encode_prompts([""]) is ``pipe(prompts, guidance_scale=s)``."""
    # at t = 749 (alpha > 0, so x0 follows from the guided eps): one step from the same z
    folder = save_pipeline(sd3, sd3.denoiser, tmp_path / "teacher-1step", generator=OneStep(749))
    z = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(5))
    t = torch.full((2,), 749)
    s = float(sd3.parametrization.sigmas[749])
    with torch.no_grad():
        eps = sd3.predict_eps_cfg(z, t, sd3.encode_prompts(PROMPTS), sd3.encode_prompts([""]), 3.0)
        plain = sd3.predict_eps(z, t, sd3.encode_prompts(PROMPTS))
    assert not torch.allclose(eps, plain, atol=1e-3), "guidance must change eps"
    x0 = sd3.parametrization.eps_to_x0(eps, z, t)
    stock = _stock(folder)(
        PROMPTS,
        latents=z,
        output_type="latent",
        num_inference_steps=1,
        sigmas=[750 / 1000],
        guidance_scale=3.0,
        height=16,
        width=16,
    ).images
    assert s == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))
    torch.testing.assert_close(stock, x0.float(), rtol=1e-4, atol=1e-4)


def test_bad_resolution_is_one_line(sd3):
    x = torch.zeros((1, 16, 7, 7))  # 14 px: not a multiple of patch 2 x VAE factor 2
    with pytest.raises(ValueError, match=r"not divisible by the transformer's patch size 2") as err:
        sd3.predict(x, 999, sd3.encode_prompts(PROMPTS[:1]))
    assert "\n" not in str(err.value) and "multiple of 4 px" in str(err.value)


def test_missing_text_encoder_2_is_one_line(sd3_dirs, tmp_path):
    broken = tmp_path / "no-te2"
    shutil.copytree(sd3_dirs["t5"], broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ValueError, match=r"text_encoder_2/config\.json missing") as err:
        load_backbone(broken)
    assert "\n" not in str(err.value) and "StableDiffusion3Pipeline folder" in str(err.value)
    b = load_backbone(broken, load_text_encoder=False)  # precomputed embeddings need none
    with pytest.raises(ValueError, match=r"text_encoder_2/config\.json missing"):
        save_pipeline(b, b.denoiser, tmp_path / "export")  # export needs them: same line
    assert not (tmp_path / "export").exists()


def test_distill_smoke_on_a_tiny_sd3(sd3_dirs, tmp_path):
    """Two VSD steps on a T5-less SD3 train both adapters and export a stock pipeline."""
    from tests.distill.conftest import PROMPTS as LINES
    from tests.distill.conftest import tiny_config

    from wadi.distill import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(LINES)
    result = train(tiny_config(sd3_dirs["no-t5"], prompts, tmp_path / "run", max_steps=2))
    assert result.steps == 2 and result.skipped_steps == 0
    losses = [row[k] for row in result.history for k in row if "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert any(v.abs().sum() > 0 for v in result.student_state.values())
    index = json.loads((result.final_dir / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None]  # trained and exported without T5


def _count(config: dict, prefix: str):
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    total = sum(p.numel() for p in model.parameters())
    attach(model, preset(f"{prefix}-student"), "student")
    attach(model, preset(f"{prefix}-fake"), "fake")
    counts = {role: count_adapter_parameters(model, role) for role in ("student", "fake")}
    layers = sum("student" in layer.lorad_A for _, layer in lorad_layers(model))
    return total, counts, layers


def test_presets_on_the_real_sd3_transformers():
    """Trainable counts of the SD3 presets on SD3-medium and SD3.5-large (docs/benchmarks.md)."""
    total, counts, layers = _count(SD3_MEDIUM, "sd3")
    print(f"SD3-medium: {total:,} params, {layers} layers, {counts}")
    assert total == 2_028_328_000  # the published SD3-medium transformer: 2.03B
    assert counts == {"student": 186_187_776, "fake": 46_546_944}
    assert layers == 333  # every Linear of the 24 joint blocks (340 in all)
    total, counts, layers = _count(SD35_LARGE, "sd3")
    print(f"SD3.5-large: {total:,} params, {layers} layers, {counts}")
    assert total == 8_056_627_520  # the published SD3.5-large transformer: 8.06B
    assert counts == {"student": 469_123_072, "fake": 117_280_768}
    assert layers == 529


def test_16_bit_flow_teacher_gets_no_precision_warning(sd3_dirs):
    """x0 = z - v(z, 1) divides by nothing: no 1/alpha_T warning (alpha_T is 0 here)."""
    b = load_backbone(sd3_dirs["no-t5"], dtype=torch.bfloat16)
    assert float(b.parametrization.alpha_sigma(torch.tensor([999]))[0]) == 0.0
    assert OneStep().precision_warning(b) is None
    assert MultiStep([999, 499]).precision_warning(b) is None
