"""Exported folders run in STOCK diffusers pipelines and reproduce wadi's one-step generator."""

import json
import warnings

import pytest
import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open

from wadi import lorad
from wadi.backbones import alpha_bar_from_scheduler, load_backbone, one_step, one_step_scheduler
from wadi.backbones.export import export_student, save_pipeline
from wadi.testing import attach_random_adapter

PROMPTS = ["a photo of a cat", "red car"]


def _student_and_reference(folder, alpha_bar_T=None, output_type="latent", size=None):
    """Teacher + random LoRaD student: (one_step output, merged denoiser, backbone)."""
    b = load_backbone(folder)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    size = size or b.denoiser.config.sample_size
    z = randn_tensor((len(PROMPTS), b.latent_channels, size, size), generator=generators)
    a = alpha_bar_T if alpha_bar_T is not None else alpha_bar_from_scheduler(b.scheduler)
    with torch.no_grad():
        x0 = one_step(b, z, b.encode_prompts(PROMPTS), a)
        with lorad.disabled(b.denoiser):
            x0_teacher = one_step(b, z, b.encode_prompts(PROMPTS), a)
        assert not torch.allclose(x0, x0_teacher, atol=1e-3), "adapter must change the model"
        if output_type == "pt":
            x0 = (b.decode(x0) / 2 + 0.5).clamp(0, 1)
    return x0, lorad.merge_and_unload(b.denoiser, "student"), b


def _run_stock(pipeline_cls, folder, output_type="latent"):
    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if pipeline_cls is PixArtAlphaPipeline:
        extra = {"use_resolution_binning": False, "clean_caption": False}
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    out = pipe(
        PROMPTS,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=generators,
        output_type=output_type,
        **extra,
    )
    return out.images, pipe


@pytest.mark.parametrize(
    "name,pipeline_cls,alpha_bar_T,output_type",
    [
        ("sd-eps", StableDiffusionPipeline, None, "latent"),
        ("sd-eps", StableDiffusionPipeline, None, "pt"),
        ("sd-v", StableDiffusionPipeline, None, "latent"),
        ("sd-v", StableDiffusionPipeline, 0.0047, "latent"),
        ("sd-eps", StableDiffusionPipeline, 0.0047, "latent"),
        ("pixart", PixArtAlphaPipeline, None, "latent"),
        ("pixart", PixArtAlphaPipeline, None, "pt"),
    ],
)
def test_stock_pipeline_equals_one_step(
    teacher_dirs, tmp_path, name, pipeline_cls, alpha_bar_T, output_type
):
    ref, merged, backbone = _student_and_reference(teacher_dirs[name], alpha_bar_T, output_type)
    out = save_pipeline(backbone, merged, tmp_path / "pipe", alpha_bar_T=alpha_bar_T)
    assert not list(tmp_path.glob(".pipe.*")), "temporary folder left behind"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_cls.__name__
    got, pipe = _run_stock(pipeline_cls, out, output_type)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.timesteps.tolist() == [999]
    if alpha_bar_T is not None:
        assert alpha_bar_from_scheduler(pipe.scheduler) == pytest.approx(alpha_bar_T, rel=1e-6)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_pixart_with_resolution_conditioning_exports_exactly(pixart_1024_dir, tmp_path):
    ref, merged, backbone = _student_and_reference(pixart_1024_dir, size=8)
    assert backbone.denoiser.use_additional_conditions
    out = save_pipeline(backbone, merged, tmp_path / "pipe")
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    # pixel size of an 8x8 latent with the tiny factor-2 VAE; no aspect binning at this size
    got = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, generator=generators,
               height=16, width=16, use_resolution_binning=False, clean_caption=False,
               output_type="latent").images  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_alpha_bar_above_the_schedule_warns_but_stays_exact(teacher_dirs):
    teacher = load_backbone(teacher_dirs["pixart"], load_text_encoder=False).scheduler
    with pytest.warns(UserWarning, match="last beta is negative"):
        scheduler = one_step_scheduler(teacher, 0.0047)
    assert alpha_bar_from_scheduler(scheduler) == pytest.approx(0.0047, rel=1e-6)
    # all other betas are the teacher's
    torch.testing.assert_close(scheduler.betas[:-1], teacher.betas[:-1], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = one_step_scheduler(teacher, alpha_bar_from_scheduler(teacher))
    assert same.config.trained_betas is None


def test_save_pipeline_refuses_unmerged_adapters_and_keeps_old_folder(teacher_dirs, tmp_path):
    b = load_backbone(teacher_dirs["sd-eps"])
    attach_random_adapter(b.denoiser, b.student_preset, rank=2)
    old = tmp_path / "pipe"
    old.mkdir()
    (old / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_pipeline(b, b.denoiser, old)
    assert (old / "keep.txt").read_text() == "old"


def test_save_pipeline_fp16_and_pixel_space(pixel_dir, tmp_path):
    b = load_backbone(pixel_dir)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = one_step(b, z, b.encode_prompts(PROMPTS), alpha_bar_from_scheduler(b.scheduler))
    merged = lorad.merge_and_unload(b.denoiser, "student")
    out = save_pipeline(b, merged, tmp_path / "pixel", dtype="fp16")
    assert not (out / "vae").exists()
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert next(merged.parameters()).dtype == torch.float32  # in-memory modules untouched
    again = load_backbone(out)  # float32 by default
    assert again.vae is None
    with torch.no_grad():
        got = one_step(
            again, z, again.encode_prompts(PROMPTS), alpha_bar_from_scheduler(again.scheduler)
        )
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=5e-2)  # fp16 weights


def test_export_student_refuses_to_overwrite(teacher_dirs, tmp_path):
    b = load_backbone(teacher_dirs["sd-eps"], load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2)
    lorad.save_adapter(b.denoiser, tmp_path / "adapter", "student")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty; pass --overwrite"):
        export_student(teacher_dirs["sd-eps"], tmp_path / "adapter", out)
    assert (out / "precious.txt").read_text() == "keep me"
    export_student(teacher_dirs["sd-eps"], tmp_path / "adapter", out, overwrite=True)
    assert (out / "model_index.json").is_file() and not (out / "precious.txt").exists()
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        export_student(teacher_dirs["sd-eps"], tmp_path / "missing", tmp_path / "o2")


def test_save_pipeline_from_a_backbone_without_text_encoder(teacher_dirs, tmp_path):
    """Training from precomputed embeddings: export reads text encoder + tokenizer from the teacher."""
    ref, _, _ = _student_and_reference(teacher_dirs["pixart"])
    b = load_backbone(teacher_dirs["pixart"], load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)  # same angles as ref
    out = save_pipeline(b, lorad.merge_and_unload(b.denoiser, "student"), tmp_path / "pipe")
    assert b.text_encoder is None  # nothing kept in memory
    got, _ = _run_stock(PixArtAlphaPipeline, out)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_save_pipeline_full_disk_is_one_line_and_keeps_the_old_folder(
    teacher_dirs, tmp_path, monkeypatch
):
    import errno

    import wadi.backbones.export as export

    b = load_backbone(teacher_dirs["sd-eps"], load_text_encoder=False)
    old = tmp_path / "pipe"
    old.mkdir()
    (old / "keep.txt").write_text("old")

    def full_disk(directory, dtype):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_cast_safetensors", full_disk)
    with pytest.raises(ValueError, match=f"cannot write {old}: No space left on device"):
        save_pipeline(b, b.denoiser, old, dtype="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


def test_export_student_refuses_outputs_over_its_inputs(teacher_dirs, tmp_path):
    b = load_backbone(teacher_dirs["sd-eps"], load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2)
    adapter = lorad.save_adapter(b.denoiser, tmp_path / "adapter", "student")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    for out in (adapter, adapter / "pipeline", tmp_path, teacher_dirs["sd-eps"]):
        with pytest.raises(ValueError, match="would destroy the input"):
            export_student(teacher_dirs["sd-eps"], adapter, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
