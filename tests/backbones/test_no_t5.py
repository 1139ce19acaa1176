"""`wadi distill --no-t5`: an SD3 teacher trains and exports without its T5; others refuse."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from tests.distill.conftest import PROMPTS as LINES
from tests.distill.conftest import tiny_config

from wadi.backbones import load_backbone
from wadi.cli import main
from wadi.distill import DistillConfig, train
from wadi.testing import make_tiny_flux, make_tiny_sd3

PROMPTS = ["a photo of a cat", "red car"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("sd3") / "t5")  # WITH text_encoder_3


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(LINES)
    return path


def test_load_backbone_t5_false_leaves_t5_out(sd3_dir):
    b = load_backbone(sd3_dir, t5=False)
    assert b.text_encoder_3 is None and b.tokenizer_3 is None and b.load_t5 is False
    full = load_backbone(sd3_dir)
    assert full.text_encoder_3 is not None and full.load_t5 is True
    ours, theirs = b.encode_prompts(PROMPTS), full.encode_prompts(PROMPTS)
    # the CLIP part is the same, the T5 part zeros (the stock pipeline without T5)
    torch.testing.assert_close(ours.embeds[:, :16], theirs.embeds[:, :16], rtol=0, atol=0)
    assert not ours.embeds[:, 16:].any() and theirs.embeds[:, 16:].any()
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    torch.testing.assert_close(ours.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_distill_no_t5_trains_and_exports_without_t5(sd3_dir, prompts, tmp_path):
    """A 2-step run with t5=False on a teacher that HAS a T5: final/pipeline, and the
    checkpoint exported again with `wadi export --checkpoint`, are T5-less SD3 pipelines."""
    config = tiny_config(sd3_dir, prompts, tmp_path / "run", max_steps=2, t5=False)
    result = train(config)
    assert result.steps == 2
    assert DistillConfig.load(tmp_path / "run" / "config.yaml").t5 is False
    for folder in (result.final_dir / "pipeline", tmp_path / "again"):
        if folder.name == "again":
            assert (
                main(["export", "--checkpoint", str(result.final_dir), "--out", str(folder)]) == 0
            )
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
        assert not (folder / "text_encoder_3").exists()
        assert (folder / "text_encoder_2").is_dir()
    a = (result.final_dir / "pipeline" / "transformer").glob("*.safetensors")
    b = (tmp_path / "again" / "transformer").glob("*.safetensors")
    assert [p.read_bytes() for p in sorted(a)] == [p.read_bytes() for p in sorted(b)]
    # the T5-less export samples through `wadi generate --pipeline` and `wadi eval generate`
    # (DiffusionPipeline.from_pretrained needs text_encoder_3=None passed), the same PNGs
    from wadi.eval.generate import generate_images
    from wadi.eval.protocol import Captions

    folder = result.final_dir / "pipeline"
    images = tmp_path / "images"
    args = ["generate", "--pipeline", str(folder), "--out", str(images), "--resolution", "16"]
    assert main([*args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    generate_images(folder, Captions(PROMPTS, "inline", "-", "all"), tmp_path / "eval")
    for name in ("00000.png", "00001.png"):
        a = np.asarray(Image.open(images / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "eval" / name)).astype(int)
        assert a.shape == (16, 16, 3) and np.abs(a - b).max() <= 1
    # resuming with T5 back on is another recipe: refused in one line
    with pytest.raises(ValueError, match=r"different config \(t5\)"):
        train(config.replace(t5=True, max_steps=3), resume="latest")


def test_no_t5_on_a_teacher_that_needs_its_t5_is_one_line(tmp_path, prompts, capsys):
    flux = make_tiny_flux(tmp_path / "flux", guidance=False)
    with pytest.raises(ValueError, match=r"FLUX needs its T5") as err:
        load_backbone(flux, t5=False)
    assert "\n" not in str(err.value) and "drop --no-t5" in str(err.value)
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(flux), "--prompts", str(prompts), "--output-dir", str(out)]
    assert main([*args, "--no-t5", "--max-steps", "1", "--resolution", "16"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "FLUX needs its T5" in lines[0], lines


def test_flux_checkpoint_export_keeps_the_runs_guidance_input(tmp_path, prompts):
    """FLUX.1-dev trained at guidance_scale 2.0: `wadi export --checkpoint` records 2.0 (the
    guidance input the student was trained with), as the run's own final/pipeline does."""
    flux = make_tiny_flux(tmp_path / "dev")
    config = tiny_config(flux, prompts, tmp_path / "run", max_steps=1, guidance_scale=2.0)
    result = train(config.replace(export_pipeline=True))
    own = json.loads((result.final_dir / "pipeline" / "wadi_export.json").read_text())
    assert own["pipeline_call"]["guidance_scale"] == 2.0
    out = tmp_path / "again"
    assert main(["export", "--checkpoint", str(result.final_dir), "--out", str(out)]) == 0
    info = json.loads((out / "wadi_export.json").read_text())
    assert info["pipeline_call"] == own["pipeline_call"]
