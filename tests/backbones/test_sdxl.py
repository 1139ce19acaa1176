"""SDXL teachers: two text encoders, pooled + time-id conditioning, stock SDXL pipeline export."""

import copy
import json
import shutil

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from wadi import lorad
from wadi.backbones import SDUNetBackbone, SDXLBackbone, TextCondition, load_backbone
from wadi.backbones.export import pipeline_call, save_pipeline
from wadi.generators import MultiStep, OneStep
from wadi.lorad import attach, count_adapter_parameters, lorad_layers, preset
from wadi.testing import attach_random_adapter, make_tiny_sdxl

PROMPTS = ["a photo of a cat", "red car"]

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from
#: UNet2DConditionModel's defaults)
SDXL_BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.fixture(scope="module")
def sdxl_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {
        "eps": make_tiny_sdxl(root / "eps"),
        "v": make_tiny_sdxl(root / "v", prediction_type="v_prediction"),
    }


@pytest.fixture(scope="module")
def sdxl(sdxl_dirs):
    return load_backbone(sdxl_dirs["eps"])


def _stock(folder) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_backbone_picks_sdxl(sdxl, sdxl_dirs):
    b = sdxl
    assert type(b) is SDXLBackbone and b.kind == "sdxl"
    assert (b.student_preset, b.fake_preset) == ("sdxl-unet-student", "sdxl-unet-fake")
    assert b.prediction_type == "epsilon"
    assert load_backbone(sdxl_dirs["v"]).prediction_type == "v_prediction"
    assert b.force_zeros_for_empty_prompt is True
    assert b.resolution == 16  # sample_size 8 x VAE factor 2, the stock default height
    for module in (b.denoiser, b.text_encoder, b.text_encoder_2, b.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    config = dict(b.denoiser.config)
    assert SDXLBackbone.accepts(config) and not SDUNetBackbone.accepts(config)
    sd_config = {"_class_name": "UNet2DConditionModel", "addition_embed_type": None}
    assert SDUNetBackbone.accepts(sd_config) and not SDXLBackbone.accepts(sd_config)
    half = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}
    assert not SDXLBackbone.accepts(half)  # no added-embedding sizes: not buildable


def test_encode_prompts_is_the_stock_encode_prompt(sdxl, sdxl_dirs):
    pipe = _stock(sdxl_dirs["eps"])
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True
        )
    cond = sdxl.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 16, 16 + 24) and cond.pooled.shape == (2, 12)
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    stock_ids = pipe._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=12
    )
    torch.testing.assert_close(cond.extras["time_ids"], stock_ids.repeat(2, 1))
    assert cond.mask is None
    # the null prompt is the stock negative: zeros under force_zeros_for_empty_prompt
    null = sdxl.encode_prompts([""])
    assert not neg.any() and not neg_pooled.any()
    torch.testing.assert_close(null.embeds, neg[:1])  # batch 1 vs 2: fp32 rounding
    torch.testing.assert_close(null.pooled, neg_pooled[:1])
    torch.testing.assert_close(null.extras["time_ids"], stock_ids)
    mixed = sdxl.encode_prompts(["", PROMPTS[1]])  # only the empty row is zeroed
    assert not mixed.embeds[0].any()
    torch.testing.assert_close(mixed.embeds[1:], embeds[1:], rtol=0, atol=0)


def test_null_prompt_is_encoded_when_force_zeros_is_off(tmp_path):
    folder = make_tiny_sdxl(tmp_path / "no-zeros", force_zeros_for_empty_prompt=False)
    b = load_backbone(folder)
    assert b.force_zeros_for_empty_prompt is False
    with torch.no_grad():
        _, neg, _, neg_pooled = _stock(folder).encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True
        )
    null = b.encode_prompts([""])
    assert null.embeds.abs().sum() > 0
    torch.testing.assert_close(null.embeds, neg[:1])  # batch 1 vs 2: fp32 rounding
    torch.testing.assert_close(null.pooled, neg_pooled[:1])


def test_cfg_is_the_stock_pipelines_guidance(sdxl, tmp_path):
    """wadi's CFG (null = encode_prompts([""])) is ``pipe(prompts, guidance_scale=s)``."""
    folder = save_pipeline(sdxl, sdxl.denoiser, tmp_path / "teacher-1step")
    g = torch.Generator().manual_seed(5)
    z = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.full((2,), 999)
    with torch.no_grad():
        eps = sdxl.predict_eps_cfg(
            z, t, sdxl.encode_prompts(PROMPTS), sdxl.encode_prompts([""]), 3.0
        )
        eps_plain = sdxl.predict_eps(z, t, sdxl.encode_prompts(PROMPTS))
    assert not torch.allclose(eps, eps_plain, atol=1e-3), "guidance must change eps"
    ours = sdxl.parametrization.to_x0(eps, z, t)
    stock = (
        _stock(folder)(
            PROMPTS,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",
            num_inference_steps=1,
            guidance_scale=3.0,
            height=16,
            width=16,
        )
        .images.detach()
        .float()
    )
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_predict_is_the_unet_call_with_pooled_and_time_ids(sdxl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([999, 300])
    cond = sdxl.encode_prompts(PROMPTS)
    with torch.no_grad():
        ours = sdxl.predict(x, t, cond)
        direct = sdxl.denoiser(
            x,
            t,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.extras["time_ids"]},
        ).sample
        torch.testing.assert_close(ours, direct, rtol=0, atol=0)
        other_ids = cond.extras["time_ids"].clone()
        other_ids[:, :2] = 64  # a different original size: the micro-conditioning is used
        moved = TextCondition(cond.embeds, pooled=cond.pooled, extras={"time_ids": other_ids})
        assert not torch.allclose(sdxl.predict(x, t, moved), ours, atol=1e-5)
        no_pooled = TextCondition(cond.embeds, pooled=torch.zeros_like(cond.pooled))
        no_pooled.extras["time_ids"] = cond.extras["time_ids"]
        assert not torch.allclose(sdxl.predict(x, t, no_pooled), ours, atol=1e-5)
        with pytest.raises(ValueError, match="pooled text embeddings and time_ids"):
            sdxl.predict(x, t, TextCondition(cond.embeds))


def test_time_ids_follow_the_resolution(sdxl_dirs):
    b = load_backbone(sdxl_dirs["eps"])
    x = torch.zeros((1, 4, 16, 16))  # 32 px, not the native 16
    with pytest.raises(ValueError, match=r"set backbone.resolution = 32 before encoding") as err:
        b.predict(x, 999, b.encode_prompts(PROMPTS[:1]))
    assert "\n" not in str(err.value)
    b.resolution = 32
    cond = b.encode_prompts(PROMPTS[:1])
    assert cond.extras["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    with torch.no_grad():
        assert b.predict(x, 999, cond).shape == x.shape


def _student(folder):
    b = load_backbone(folder)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    return b


@pytest.mark.parametrize(
    "kind,generator",
    [
        ("eps", OneStep()),
        ("eps", MultiStep([999, 499])),
        ("v", OneStep()),
        ("v", MultiStep([999, 499])),
    ],
)
def test_export_is_a_stock_sdxl_pipeline_equal_to_the_generator(
    sdxl_dirs, tmp_path, kind, generator
):
    b = _student(sdxl_dirs[kind])
    g = torch.Generator().manual_seed(7)
    z = torch.randn((len(PROMPTS), 4, 8, 8), generator=g)
    with torch.no_grad():
        ours = generator.sample(b, z, b.encode_prompts(PROMPTS), g)
        with lorad.disabled(b.denoiser):
            teacher = generator.sample(b, z, b.encode_prompts(PROMPTS), torch.Generator())
    assert not torch.allclose(ours, teacher, atol=1e-3), "the adapter must change the model"
    out = save_pipeline(
        b, lorad.merge_and_unload(b.denoiser, "student"), tmp_path / "pipe", generator=generator
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    for part in ("text_encoder_2", "tokenizer_2", "vae"):
        assert (out / part).is_dir()
    pipe = _stock(out)
    if generator.num_steps > 1:
        assert isinstance(pipe.scheduler, LCMScheduler)
    stock = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        height=16,
        width=16,
        **pipeline_call(b, generator),
    ).images
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_presets_on_the_real_sdxl_base_unet():
    """Trainable counts of the SDXL presets on SDXL base 1.0's U-Net (docs/benchmarks.md)."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**SDXL_BASE_UNET)
    total = sum(p.numel() for p in model.parameters())
    assert total == 2_567_463_684  # the real SDXL base 1.0 U-Net
    attach(model, preset("sdxl-unet-student"), "student")
    attach(model, preset("sdxl-unet-fake"), "fake")
    counts = {role: count_adapter_parameters(model, role) for role in ("student", "fake")}
    layers = {
        role: sum(role in layer.lorad_A for _, layer in lorad_layers(model))
        for role in ("student", "fake")
    }
    for role in counts:
        print(
            f"sdxl-unet-{role}: {counts[role]:,} trainable in {layers[role]} layers, "
            f"{100 * counts[role] / total:.2f} % of {total:,}"
        )
    assert counts == {"student": 530_595_840, "fake": 64_491_520}
    # every Linear but time_embedding's and add_embedding's two each (743 in all)
    assert layers == {"student": 739, "fake": 700}
    assert 100 * counts["student"] / total == pytest.approx(20.67, abs=0.01)


def test_missing_text_encoder_2_is_one_line(sdxl_dirs, tmp_path):
    broken = tmp_path / "no-te2"
    shutil.copytree(sdxl_dirs["eps"], broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ValueError, match=r"text_encoder_2/config\.json missing") as err:
        load_backbone(broken)
    assert "\n" not in str(err.value) and "StableDiffusionXLPipeline folder" in str(err.value)
    b = load_backbone(broken, load_text_encoder=False)  # precomputed embeddings need none
    assert b.text_encoder is None and b.text_encoder_2 is None
    with pytest.raises(ValueError, match=r"text_encoder_2/config\.json missing"):
        save_pipeline(b, b.denoiser, tmp_path / "export")  # export needs them: same line
    assert not (tmp_path / "export").exists()


def test_export_without_text_encoders_in_memory_reads_both_from_the_teacher(sdxl_dirs, tmp_path):
    b = load_backbone(sdxl_dirs["eps"], load_text_encoder=False)
    out = save_pipeline(b, b.denoiser, tmp_path / "pipe")
    pipe = _stock(out)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"


def test_fp16_vae_with_force_upcast_decodes_in_fp32(sdxl_dirs):
    b = load_backbone(sdxl_dirs["eps"])
    assert b.vae.config.force_upcast
    vae = b.vae.half()  # in place: an fp16 teacher's VAE
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        upcast = copy.deepcopy(vae).float()  # the same fp16-rounded weights, in fp32
        expected = upcast.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    images = b.decode(latents)
    assert images.dtype == torch.float32
    assert next(b.vae.parameters()).dtype == torch.float16  # put back after decoding
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
