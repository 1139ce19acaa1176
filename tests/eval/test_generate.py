"""`wadi eval generate` on a tiny stock StableDiffusionPipeline: seeding, resume, sidecar."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from wadi.backbones.export import save_pipeline
from wadi.eval.generate import SIDECAR, generate_images, image_name, load_pipeline, to_uint8
from wadi.eval.protocol import get_protocol, load_captions

CAPTIONS = ["a cat", "a dog on a mat", "a red car", "two birds", "a photo of a tree"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from wadi.testing import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe", scheduler="DDIMScheduler")


@pytest.fixture()
def captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return load_captions(path, get_protocol("custom"))


KNOBS = dict(steps=2, guidance=3.0, resolution=16, seed=7, dtype="float32")


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


def test_generate_seeded_resumable_with_sidecar(tiny_sd, captions, tmp_path):
    import torch

    out = tmp_path / "images"
    record = generate_images(tiny_sd, captions, out, batch_size=2, protocol="custom", **KNOBS)
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [image_name(i, 5) for i in range(5)] == [f"{i:05d}.png" for i in range(5)]
    assert record["skipped_finished"] == 0

    # image i is the pipeline's output for caption i with noise seeded by seed + i
    pipe = load_pipeline(tiny_sd, torch.float32, "cpu")
    direct = pipe(
        prompt=[CAPTIONS[3]],
        num_inference_steps=2,
        guidance_scale=3.0,
        height=16,
        width=16,
        generator=[torch.Generator("cpu").manual_seed(7 + 3)],
        output_type="np",
    ).images
    np.testing.assert_array_equal(_pixels(out / "00003.png"), to_uint8(direct)[0])
    assert np.abs(_pixels(out / "00000.png") - _pixels(out / "00001.png")).max() > 0

    # sidecar records every knob
    side = json.loads((out / SIDECAR).read_text())
    for key, value in KNOBS.items():
        assert side[key] == value, key
    assert side["pipeline"] == "StableDiffusionPipeline"
    assert side["scheduler"] == "DDIMScheduler"
    assert side["captions"]["count"] == 5 and len(side["captions"]["file_sha256"]) == 64
    assert side["captions"]["list_sha256"] == captions.list_sha256
    assert len(side["model_sha256"]) == 64 and side["model"] == str(tiny_sd.resolve())
    assert "seed + caption_index" in side["seeding"] and side["batch_size"] == 2

    # resume: a missing and a truncated image are made again (identically), the rest kept
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.png")}
    (out / "00003.png").unlink()
    (out / "00001.png").write_bytes(before["00001.png"][0][:40])
    record = generate_images(tiny_sd, captions, out, batch_size=3, **KNOBS)
    assert record["skipped_finished"] == 3
    for name in ("00000.png", "00002.png", "00004.png"):
        assert (out / name).stat().st_mtime_ns == before[name][1], name
    for name in ("00001.png", "00003.png"):  # other batch size, same pixels (up to rounding)
        again = np.asarray(Image.open(out / name)).astype(np.int16)
        first = np.asarray(Image.open(io.BytesIO(before[name][0]))).astype(np.int16)
        assert np.abs(again - first).max() <= 1, name
    assert not list(out.glob(".*tmp*"))


def test_resume_with_other_knobs_is_refused(tiny_sd, captions, tmp_path):
    out = tmp_path / "images"
    generate_images(tiny_sd, captions, out, batch_size=5, **KNOBS)
    with pytest.raises(ValueError, match="other settings \\(steps"):
        generate_images(tiny_sd, captions, out, **{**KNOBS, "steps": 3})
    # the same captions from a moved file resume; other captions are refused
    moved = tmp_path / "elsewhere.txt"
    moved.write_text("\n".join(CAPTIONS) + "\n")
    custom = get_protocol("custom")
    record = generate_images(tiny_sd, load_captions(moved, custom), out, batch_size=5, **KNOBS)
    assert record["skipped_finished"] == 5
    moved.write_text("\n".join(reversed(CAPTIONS)) + "\n")
    with pytest.raises(ValueError, match="captions_list_sha256"):
        generate_images(tiny_sd, load_captions(moved, custom), out, **KNOBS)


def test_generate_clear_errors(tmp_path, captions):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        generate_images(tmp_path / "missing", captions, tmp_path / "o", **KNOBS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        generate_images(tmp_path / "empty", captions, tmp_path / "o", **KNOBS)


def test_generate_cli_then_resume(tiny_sd, tmp_path, capsys):
    from wadi.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:3]) + "\n")
    out = tmp_path / "cli"
    args = [
        "eval", "generate", "--protocol", "custom", "--captions", str(captions),
        "--model", str(tiny_sd), "--output-dir", str(out), "--steps", "1",
        "--resolution", "16", "--dtype", "float32", "--batch-size", "2", "--seed", "3",
    ]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    side = json.loads((out / SIDECAR).read_text())
    assert (side["steps"], side["guidance"], side["seed"], side["protocol"]) == (
        1,
        0.0,
        3,
        "custom",
    )
    capsys.readouterr()
    assert main(args) == 0
    assert "(3 were already there)" in capsys.readouterr().out
    # a COCO protocol with a 3-line captions file is refused with the fix in one line
    assert main([a if a != "custom" else "coco2017-5k" for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs 5000" in err and "--protocol custom" in err and "\n" not in err


@pytest.mark.slow
def test_generate_split_across_two_processes(tiny_sd, captions, tmp_path):
    """Two CPU processes (torchrun; accelerate reads its env): the same images as one process."""
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "wadi.cli", "eval", "generate", "--protocol", "custom",
        "--captions", captions.source, "--model", str(tiny_sd), "--output-dir", str(out),
        "--steps", "2", "--guidance", "3", "--resolution", "16", "--seed", "7",
        "--dtype", "float32", "--batch-size", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((out / SIDECAR).read_text())["num_processes"] == 2
    assert "generate [0]" in run.stderr and "generate [1]" in run.stderr
    single = tmp_path / "one"
    generate_images(tiny_sd, captions, single, batch_size=5, **KNOBS)
    for i in range(len(CAPTIONS)):
        a, b = _pixels(out / image_name(i, 5)), _pixels(single / image_name(i, 5))
        assert np.abs(a - b).max() <= 1, i


def test_exported_one_step_student_images_equal_the_one_step_generator(tiny_sd, captions, tmp_path):
    """A pipeline exported by wadi.backbones, run by `generate` with 1 step and no CFG, gives
    the method's one-step sample x0 = (z - sqrt(1-a) eps(z, 999, c)) / sqrt(a) for z of seed + i."""
    import torch

    backbones = pytest.importorskip("wadi.backbones")
    backbone = backbones.load_backbone(tiny_sd)
    exported = save_pipeline(backbone, backbone.denoiser, tmp_path / "student")
    out = tmp_path / "images"
    generate_images(exported, captions, out, steps=1, guidance=0.0, resolution=16, seed=11,
                    batch_size=5, dtype="float32")  # fmt: skip
    a = backbones.alpha_bar_from_scheduler(backbone.scheduler)
    for i in (0, 4):
        z = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(11 + i))
        with torch.no_grad():
            cond = backbone.encode_prompts([CAPTIONS[i]])
            x = backbone.decode(backbones.one_step(backbone, z, cond, a))
        expected = to_uint8((x / 2 + 0.5).permute(0, 2, 3, 1).numpy())[0].astype(np.int16)
        assert np.abs(_pixels(out / image_name(i, 5)) - expected).max() <= 1, i


# ---- pixel space: the shipped digits teacher and its exported pipeline (no vae/) ----


@pytest.fixture(scope="module")
def digits_teacher():
    from pathlib import Path

    import wadi.toy

    return Path(wadi.toy.__file__).parent / "assets" / "teacher"


@pytest.fixture(scope="module")
def digits_export(digits_teacher, tmp_path_factory):
    """The digits teacher exported as a one-step pipeline folder, as `wadi export` writes it."""
    from wadi.backbones import load_backbone

    backbone = load_backbone(digits_teacher)
    return save_pipeline(backbone, backbone.denoiser, tmp_path_factory.mktemp("toy") / "student")


def _raw_parts(folder):
    """U-Net and prompt encoder straight from diffusers / transformers, without wadi."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")

    def encode(prompts):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return text_encoder(ids)[0]

    return unet, encode


def _noise(seed, shape):
    import torch

    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def _grey_uint8(x):
    """(1, 1, H, W) in [-1, 1] -> (H, W) uint8, the PNG `generate` should have written."""
    return to_uint8((x[0, 0] / 2 + 0.5).numpy()).astype(np.int16)


DIGIT_PROMPTS = ["a handwritten 7", "the digit three"]


@pytest.fixture()
def digit_captions(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text("\n".join(DIGIT_PROMPTS) + "\n")
    return path


def test_generate_shipped_digits_teacher_ddim_cfg(digits_teacher, digit_captions, tmp_path):
    """`wadi eval generate` on the shipped pixel teacher (model_index WadiPixelTeacher, no VAE):
    each PNG is a 2-step DDIM with CFG 3 written out with diffusers' scheduler by hand."""
    import torch
    from diffusers import DDIMScheduler

    from wadi.cli import main

    out = tmp_path / "teacher"
    args = [
        "eval", "generate", "--protocol", "custom", "--captions", str(digit_captions),
        "--model", str(digits_teacher), "--output-dir", str(out), "--steps", "2",
        "--guidance", "3", "--seed", "5", "--dtype", "float32",
    ]  # fmt: skip
    assert main(args) == 0
    side = json.loads((out / SIDECAR).read_text())
    assert (side["space"], side["resolution"], side["steps"], side["guidance"]) == (
        "pixel", 16, 2, 3.0,
    )  # fmt: skip
    assert "sample_multistep" in side["sampler"]

    unet, encode = _raw_parts(digits_teacher)
    scheduler = DDIMScheduler.from_pretrained(digits_teacher, subfolder="scheduler")
    scheduler = DDIMScheduler.from_config(
        scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    scheduler.set_timesteps(2)
    with torch.no_grad():
        null = encode([""])
        for i, prompt in enumerate(DIGIT_PROMPTS):
            x = _noise(5 + i, (1, 1, 16, 16))
            cond = encode([prompt])
            for t in scheduler.timesteps:
                eps_null = unet(x, t, encoder_hidden_states=null).sample
                eps_cond = unet(x, t, encoder_hidden_states=cond).sample
                step = scheduler.step(eps_null + 3.0 * (eps_cond - eps_null), t, x, eta=0.0)
                x, x0 = step.prev_sample, step.pred_original_sample
            with Image.open(out / image_name(i, 2)) as im:
                assert im.mode == "L" and im.size == (16, 16)
            assert np.abs(_pixels(out / image_name(i, 2)) - _grey_uint8(x0)).max() <= 1, i
    assert _pixels(out / "00000.png").std() > 0


def test_generate_exported_pixel_pipeline_one_step(digits_export, digit_captions, tmp_path):
    """An exported pixel-space pipeline (model_index StableDiffusionPipeline, vae null):
    one step gives x0 = (z - sqrt(1 - a) eps(z, 999, c)) / sqrt(a), and resume works."""
    import torch
    from diffusers import DDIMScheduler

    captions = load_captions(digit_captions, get_protocol("custom"))
    out = tmp_path / "student"
    record = generate_images(digits_export, captions, out, steps=1, seed=9, dtype="float32")
    assert record["space"] == "pixel" and record["resolution"] == 16
    assert "OneStep" in record["sampler"]

    unet, encode = _raw_parts(digits_export)
    a = float(
        DDIMScheduler.from_pretrained(digits_export, subfolder="scheduler").alphas_cumprod[999]
    )
    with torch.no_grad():
        for i, prompt in enumerate(DIGIT_PROMPTS):
            z = _noise(9 + i, (1, 1, 16, 16))
            eps = unet(z, 999, encoder_hidden_states=encode([prompt])).sample
            x0 = (z - (1 - a) ** 0.5 * eps) / a**0.5
            assert np.abs(_pixels(out / image_name(i, 2)) - _grey_uint8(x0)).max() <= 1, i

    again = generate_images(digits_export, captions, out, steps=1, seed=9, dtype="float32")
    assert again["skipped_finished"] == 2


def test_load_pipeline_names_pixel_space(digits_teacher):
    with pytest.raises(ValueError, match="no vae/"):
        load_pipeline(digits_teacher, None, "cpu")
