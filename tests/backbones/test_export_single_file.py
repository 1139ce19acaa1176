"""Single-file (original SD layout) exports load back through stock ``from_single_file``."""

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export_single_file import (
    check_round_trip,
    clip_key_map,
    note_path,
    read_pipeline_folder,
    save_single_file,
    to_single_file,
    unet_key_map,
    vae_key_map,
)
from wadi.cli import main
from wadi.testing import attach_random_adapter, make_tiny_sdxl

PROMPTS = ["a photo of a cat", "red car"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("teachers") / "sdxl")


@pytest.fixture(scope="module")
def sd_student(sd_dir, tmp_path_factory):
    """A random LoRaD student adapter of the tiny SD teacher, saved as a folder."""
    b = load_backbone(sd_dir)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    folder = tmp_path_factory.mktemp("adapters") / "student"
    lorad.save_adapter(b.denoiser, folder, "student")
    return folder


def _one_step(pipe):
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    out = pipe(
        PROMPTS, num_inference_steps=1, guidance_scale=1.0, generator=generators, output_type="pt"
    )
    return out.images


def test_single_file_loads_back_and_equals_the_diffusers_student(sd_dir, sd_student, tmp_path):
    folder, single = tmp_path / "pipe", tmp_path / "student.safetensors"
    argv = ["export", "--teacher", str(sd_dir), "--adapter", str(sd_student)]
    assert main([*argv, "--out", str(folder)]) == 0
    assert main([*argv, "--format", "single-file", "--out", str(single)]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp left behind"
    with safe_open(str(single), framework="pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(
        k.startswith(
            (
                "model.diffusion_model.",
                "first_stage_model.",
                "cond_stage_model.transformer.text_model.",
            )
        )
        for k in keys
    )

    note = json.loads(note_path(single).read_text())
    assert note["steps"] == 1 and note["timesteps"] == [999] and note["cfg"] == 1.0
    assert note["diffusers_scheduler"]["timestep_spacing"] == "trailing"

    stock = StableDiffusionPipeline.from_pretrained(folder)
    # offline: the teacher folder gives the configs; the student's 1-step scheduler is passed
    loaded = StableDiffusionPipeline.from_single_file(
        str(single), config=str(sd_dir), local_files_only=True, scheduler=stock.scheduler
    )
    assert isinstance(loaded.scheduler, DDIMScheduler)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(stock, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"
    teacher = StableDiffusionPipeline.from_pretrained(sd_dir)
    teacher.scheduler = stock.scheduler
    ref, out = _one_step(stock), _one_step(loaded)
    assert not torch.allclose(_one_step(teacher), ref, atol=1e-3), "the student must differ"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_single_file_refuses_bad_outputs(sd_dir, sd_student, tmp_path, capsys):
    argv = ["export", "--teacher", str(sd_dir), "--adapter", str(sd_student)]
    argv += ["--format", "single-file"]
    assert main([*argv, "--out", str(tmp_path / "student")]) != 0
    assert "must end in .safetensors" in capsys.readouterr().err
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep")
    assert main([*argv, "--out", str(taken)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert taken.read_bytes() == b"keep"
    assert main([*argv, "--out", str(sd_dir / "unet" / "x.safetensors")]) != 0
    assert "destroy the input" in capsys.readouterr().err
    assert not (sd_dir / "unet" / "x.safetensors").exists()


def _coverage(states, configs, kind):
    """Each diffusers tensor maps to one LDM key; only OpenCLIP's q/k/v share one."""
    ldm = to_single_file(states, configs, kind)
    total = sum(len(s) for s in states.values())
    fused = sum(1 for k in ldm if ".attn.in_proj_" in k)
    assert len(ldm) == total - 2 * fused
    assert check_round_trip(states, configs, kind) == total
    return ldm


def test_tiny_key_maps_cover_every_tensor_once(sd_dir, sdxl_dir):
    states, configs, kind = read_pipeline_folder(sd_dir)
    names = unet_key_map(states["unet"], configs["unet"])
    assert len(set(names.values())) == len(names) == len(states["unet"])
    assert len(set(vae_key_map(states["vae"], configs["vae"]).values())) == len(states["vae"])
    assert len(set(clip_key_map(states["text_encoder"]).values())) == len(states["text_encoder"])
    _coverage(states, configs, kind)
    states, configs, kind = read_pipeline_folder(sdxl_dir)
    assert kind == "sdxl"
    ldm = _coverage(states, configs, kind)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in ldm)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in ldm)


def test_round_trip_check_catches_a_wrong_name(sd_dir, monkeypatch):
    from wadi.backbones import export_single_file as sf

    states, configs, kind = read_pipeline_folder(sd_dir)
    monkeypatch.setitem(sf._RESNET_LEAVES, "conv1", "out_layers.3")  # conv1 and conv2 collide
    with pytest.raises(RuntimeError):
        check_round_trip(states, configs, kind)


def _meta_state(module):
    return {k: v for k, v in module.state_dict().items()}


def test_real_sd15_and_sdxl_architectures_map_to_the_original_layout():
    """Full-size architectures on the meta device: the keys diffusers' detector knows."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                vocab_size=49408,
            )
        )
    states = {"unet": _meta_state(unet), "vae": _meta_state(vae), "text_encoder": _meta_state(clip)}
    configs = {
        "unet": dict(unet.config),
        "vae": dict(vae.config),
        "text_encoder": clip.config.to_dict(),
    }
    ldm = _coverage(states, configs, "sd")
    assert len([k for k in ldm if k.startswith("model.diffusion_model.")]) == 686
    assert len([k for k in ldm if k.startswith("first_stage_model.")]) == 248
    assert infer_diffusers_model_type(ldm) == "v1"
    assert ldm["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["model.diffusion_model.input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        clip_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                max_position_embeddings=77,
                vocab_size=49408,
                projection_dim=1280,
                hidden_act="gelu",
            )
        )
    states.update(unet=_meta_state(unet), text_encoder_2=_meta_state(clip_2))
    configs.update(unet=dict(unet.config), text_encoder_2=clip_2.config.to_dict())
    ldm = _coverage(states, configs, "sdxl")
    assert infer_diffusers_model_type(ldm) == "xl_base"
    assert len([k for k in ldm if k.startswith("model.diffusion_model.")]) == 1680
    assert ldm[
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    ].shape == (3840, 1280)


def test_sdxl_single_file_loads_back_exactly(sdxl_dir, tmp_path):
    single = save_single_file(sdxl_dir, tmp_path / "xl.safetensors")
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(sdxl_dir), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(ref, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_single_file_dtype(sd_dir, tmp_path):
    single = save_single_file(sd_dir, tmp_path / "half.safetensors", dtype="fp16")
    with safe_open(str(single), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


# ---- --dtype: the teacher's stored dtype by default, stock variant names for fp16 ----


@pytest.fixture(scope="module")
def sd16(sd_dir, tmp_path_factory):
    """An fp16-stored copy of the tiny teacher and a student adapter for it."""
    root = tmp_path_factory.mktemp("fp16")
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, torch_dtype=torch.float16)
    pipe.save_pretrained(root / "teacher")
    b = load_backbone(root / "teacher")
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    lorad.save_adapter(b.denoiser, root / "adapter", "student")
    return root / "teacher", root / "adapter"


def _file_dtypes(path):
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_export_dtype_defaults_to_the_teachers_with_variant_names(sd16, tmp_path):
    from wadi.backbones.export_formats import stored_dtype

    teacher, adapter = sd16
    assert stored_dtype(teacher) == torch.float16
    out = tmp_path / "pipe"
    assert (
        main(["export", "--teacher", str(teacher), "--adapter", str(adapter), "--out", str(out)])
        == 0
    )
    weights = out / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    plain = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and not weights.is_symlink() and _file_dtypes(weights) == {"F16"}
    assert plain.is_symlink() and plain.resolve() == weights.resolve()
    assert (out / "text_encoder" / "model.fp16.safetensors").is_file()
    assert json.loads((out / "wadi_export.json").read_text())["variant"] == "fp16"
    stock = StableDiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    assert stock.unet.dtype == torch.float16
    b = load_backbone(out)  # variant-less loaders read the same file through the link
    assert set(b.denoiser.state_dict()) == set(stock.unet.state_dict())

    out32 = tmp_path / "pipe32"
    argv = ["export", "--teacher", str(teacher), "--adapter", str(adapter), "--dtype", "fp32"]
    assert main([*argv, "--out", str(out32)]) == 0
    plain = out32 / "unet" / "diffusion_pytorch_model.safetensors"
    assert not plain.is_symlink() and _file_dtypes(plain) == {"F32"}
    assert not list(out32.glob("*/*.fp16.safetensors"))
    # the fp16 export is the fp32 one rounded
    half = load_backbone(out).denoiser.state_dict()
    full = load_backbone(out32).denoiser.state_dict()
    for key, value in full.items():
        torch.testing.assert_close(half[key], value.half().float(), rtol=0, atol=0)


def test_sd2_text_encoder_uses_the_open_clip_layout(sd_dir, tmp_path):
    """A gelu (OpenCLIP ViT-H-like) text encoder is written as SD 2.x's cond_stage_model.model."""
    import shutil

    teacher = tmp_path / "sd2"
    shutil.copytree(sd_dir, teacher)
    config_path = teacher / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_act": "gelu"}))
    assert read_pipeline_folder(teacher)[2] == "sd2"
    single = save_single_file(teacher, tmp_path / "sd2.safetensors")
    with safe_open(str(single), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith("cond_stage_model.")]
    assert keys and all(k.startswith("cond_stage_model.model.") for k in keys)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    ref = StableDiffusionPipeline.from_pretrained(teacher)
    loaded = StableDiffusionPipeline.from_single_file(
        str(single), config=str(teacher), local_files_only=True
    )
    want, got = ref.text_encoder.state_dict(), loaded.text_encoder.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_single_file_refuses_a_pixel_space_teacher_before_loading(tmp_path, capsys):
    from wadi.toy import TEACHER_DIR

    index = {"_class_name": "StableDiffusionPipeline", "vae": [None, None]}
    (tmp_path / "pixel").mkdir()
    (tmp_path / "pixel" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="pixel-space"):
        read_pipeline_folder(tmp_path / "pixel")
    argv = ["export", "--teacher", str(TEACHER_DIR), "--adapter", str(tmp_path / "none")]
    assert main([*argv, "--format", "single-file", "--out", str(tmp_path / "x.safetensors")]) != 0
    assert "single-file export supports" in capsys.readouterr().err
