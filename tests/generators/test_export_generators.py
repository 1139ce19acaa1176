"""Every generator exports to a stock pipeline whose call reproduces wadi's own sampler."""

import json

import pytest
import torch
from diffusers import LCMScheduler, PixArtAlphaPipeline, StableDiffusionPipeline

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export import save_pipeline
from wadi.generators import MultiStep, OneStep
from wadi.testing import attach_random_adapter

PROMPTS = ["a photo of a cat", "red car"]


def _student(folder):
    b = load_backbone(folder)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    return b


@pytest.mark.parametrize(
    "name,generator",
    [
        ("sd-eps", MultiStep([999, 749, 499, 249])),
        ("sd-v", MultiStep([999, 499])),
        ("pixart", MultiStep([999, 666, 333])),
        ("sd-eps", OneStep(899)),
        ("sd-v", OneStep(899)),
    ],
)
def test_stock_call_equals_the_generator(gen_teachers, tmp_path, name, generator):
    b = _student(gen_teachers[name])
    size = b.denoiser.config.sample_size
    g = torch.Generator().manual_seed(7)
    z = torch.randn((len(PROMPTS), b.latent_channels, size, size), generator=g)
    with torch.no_grad():
        ours = generator.sample(b, z, b.encode_prompts(PROMPTS), g)
        with lorad.disabled(b.denoiser):
            teacher = generator.sample(b, z, b.encode_prompts(PROMPTS), torch.Generator())
    assert not torch.allclose(ours, teacher, atol=1e-3), "the adapter must change the model"
    out = save_pipeline(
        b, lorad.merge_and_unload(b.denoiser, "student"), tmp_path / "pipe", generator=generator
    )
    info = json.loads((out / "wadi_export.json").read_text())
    assert info["timesteps"] == list(generator.timesteps)
    cls = PixArtAlphaPipeline if name == "pixart" else StableDiffusionPipeline
    pipe = cls.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    extra = {"clean_caption": False} if name == "pixart" else {}
    if generator.num_steps > 1:
        assert isinstance(pipe.scheduler, LCMScheduler)
    stock = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        **info["pipeline_call"],
        **extra,
    ).images
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_alpha_bar_override_exports_only_at_999(gen_teachers, tmp_path):
    b = load_backbone(gen_teachers["sd-eps"])
    with pytest.raises(ValueError, match="one-step generator at t = 999"):
        save_pipeline(b, b.denoiser, tmp_path / "x", generator=MultiStep([999, 499], 0.0047))
    assert not (tmp_path / "x").exists()
