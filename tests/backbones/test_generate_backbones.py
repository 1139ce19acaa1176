"""`wadi generate` and `wadi eval generate` on SDXL, SD3 and FLUX students (tiny teachers).

The stock route (an exported folder run by its diffusers pipeline with the call its
``wadi_export.json`` records) must give the same PNGs as calling the stock pipeline by
hand and as wadi's own generator, also away from the teacher's native resolution (SDXL's
time ids and FLUX's resolution-dependent shift follow ``--resolution``).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export import save_pipeline
from wadi.backbones.generate import RENOISE_SEED, seeded_noise, to_pil
from wadi.cli import main
from wadi.generators import MultiStep, OneStep
from wadi.testing import attach_random_adapter, make_tiny_flux, make_tiny_sd3, make_tiny_sdxl

PROMPTS = ["a photo of a cat", "red car", "blue house"]


def _pixels(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def _max_diff(a, b):
    assert len(a) == len(b) and a
    return max(np.abs(x - y).max() for x, y in zip(a, b))


def _student(teacher, tmp_path, generator, resolution=None):
    """(adapter folder, exported folder) of a random rank-2 student of ``teacher``."""
    b = load_backbone(teacher)
    if resolution:
        b.resolution = resolution
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    adapter = lorad.save_adapter(b.denoiser, tmp_path / "adapter", "student")
    merged = lorad.merge_and_unload(b.denoiser, "student")
    return adapter, save_pipeline(b, merged, tmp_path / "export", generator=generator)


def _generate(tmp_path, name, *source, resolution, extra=()):
    out = tmp_path / name
    args = ["generate", *source, "--out", str(out), "--seed", "7", "--batch-size", "2"]
    args += [a for p in PROMPTS for a in ("--prompt", p)]
    assert main([*args, "--resolution", str(resolution), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "flux": make_tiny_flux(root / "flux"),
        "sd3": make_tiny_sd3(root / "sd3"),
        "sdxl": make_tiny_sdxl(root / "sdxl"),
    }


@pytest.mark.parametrize(
    "kind,generator",
    [("flux", OneStep(749)), ("sd3", OneStep(749)), ("sd3", MultiStep([999, 499]))],
    ids=["flux-t749", "sd3-t749", "sd3-2step"],
)
def test_generate_on_flow_exports_is_the_stock_call(teachers, tmp_path, kind, generator):
    """FLUX (packed latents, guidance input 3.5, shift of 16 px, not its native 256) and SD3:
    ``wadi generate --pipeline`` is ``pipe(prompt, **pipeline_call)`` on the seeded noise."""
    _, export = _student(teachers[kind], tmp_path, generator)
    ours = _pixels(_generate(tmp_path, "ours", "--pipeline", str(export), resolution=16))
    call = json.loads((export / "wadi_export.json").read_text())["pipeline_call"]
    assert ("sigmas" in call) and call["num_inference_steps"] == generator.num_steps
    pipe_cls = FluxPipeline if kind == "flux" else StableDiffusion3Pipeline
    pipe = pipe_cls.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    z = seeded_noise(range(len(PROMPTS)), 7, (16, 8, 8))
    if kind == "flux":
        assert call["guidance_scale"] == 3.5
        z = FluxPipeline._pack_latents(z, *z.shape)
    stock = []
    for start in (0, 2):  # the batches of `wadi generate`, each re-noised from its own seed
        torch.manual_seed(RENOISE_SEED + 7 + start)
        images = pipe(
            PROMPTS[start : start + 2],
            latents=z[start : start + 2],
            height=16,
            width=16,
            output_type="pt",
            **call,
        ).images
        stock += [np.asarray(to_pil(image)).astype(int) for image in images]
    assert ours[0].shape == (16, 16, 3)
    assert _max_diff(ours, stock) <= 1
    assert not np.array_equal(ours[0], ours[1])


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_routes_agree_away_from_the_native_resolution(teachers, tmp_path, kind):
    """SDXL at 24 px (native 16: time ids) and FLUX at 16 px (native 256: the shift at
    t = 749): stock export, wadi's generator on the export, and teacher + adapter agree,
    and `wadi eval generate` gives the same PNGs."""
    from wadi.eval.generate import generate_images
    from wadi.eval.protocol import Captions

    resolution = 24 if kind == "sdxl" else 16
    generator = OneStep(749 if kind == "flux" else 999)
    adapter, export = _student(teachers[kind], tmp_path, generator)
    stock = _pixels(_generate(tmp_path, "stock", "--pipeline", str(export), resolution=resolution))
    assert stock[0].shape == (resolution, resolution, 3)
    # wadi's route on the exported folder (the generator it names, t = 749 for FLUX)
    from wadi.backbones.generate import _wadi_runner

    sample = _wadi_runner(export, None, 1, 1.0, None, "cpu", torch.float32, resolution)
    ours = [np.asarray(to_pil(im)).astype(int) for im in sample(PROMPTS, [0, 1, 2], 7)]
    assert _max_diff(stock, ours) <= 1
    if kind == "sdxl":  # teacher + adapter (one step at t = 999, the export's generator)
        route = _generate(
            tmp_path, "route", "--teacher", str(teachers[kind]), "--adapter", str(adapter),
            resolution=resolution,
        )  # fmt: skip
        assert _max_diff(stock, _pixels(route)) <= 1
    captions = Captions(list(PROMPTS), "inline", "-", "all")
    record = generate_images(
        export, captions, tmp_path / "eval", resolution=resolution, seed=7, batch_size=2
    )
    assert record["resolution"] == resolution
    if kind == "flux":
        assert record["pipeline_kwargs"]["guidance_scale"] == 3.5
        assert record["pipeline_kwargs"]["sigmas"] == [0.75]
    assert _max_diff(stock, _pixels(tmp_path / "eval")) <= 1


def test_flux_default_resolution_and_bad_resolution(teachers, tmp_path, capsys):
    """FLUX's transformer has no sample_size: the default is the pipeline's own (128 latent
    pixels x VAE factor 2 = 256 here); a side the 2x2 packing does not tile is one line."""
    _, export = _student(teachers["flux"], tmp_path, OneStep())
    pipe = FluxPipeline.from_pretrained(export)
    from wadi.backbones.generate import stock_resolution

    assert stock_resolution(pipe, pipe.transformer, None) == (256, 128)
    out = tmp_path / "bad"
    args = ["generate", "--pipeline", str(export), "--prompt", "a", "--out", str(out)]
    assert main([*args, "--resolution", "18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resolution 18 is not a multiple of 4 px" in err[0], err
    assert not out.exists()
