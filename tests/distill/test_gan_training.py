"""DMD2's GAN term inside a run: trains, checkpoints its head, resumes bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from wadi.cli import main
from wadi.distill import checkpoint as ckpt
from wadi.distill import train

from .conftest import tiny_config


@pytest.fixture()
def real_images(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_gan_term_trains_saves_its_head_and_resumes_bitwise(
    teachers, prompts, tmp_path, real_images
):
    knobs = dict(export_pipeline=False, gan_weight=0.1, real_images=str(real_images), seed=4)
    plain = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "plain", max_steps=2, seed=4,
                    export_pipeline=False)
    )  # fmt: skip
    straight = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "a", max_steps=4, **knobs))
    assert straight.skipped_steps == 0
    head = ckpt.list_checkpoints(tmp_path / "a")[-1] / "gan_head.safetensors"
    assert head.is_file()
    train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "b", max_steps=2, **knobs))
    two = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "c", max_steps=2, **knobs))
    # the GAN gradient reaches the student
    assert any(not torch.equal(plain.student_state[k], v) for k, v in two.student_state.items())
    resumed = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "b", max_steps=4, **knobs),
        resume="latest",
    )
    assert all(torch.equal(straight.student_state[k], v) for k, v in resumed.student_state.items())
    assert all(torch.equal(straight.fake_state[k], v) for k, v in resumed.fake_state.items())


def test_gan_without_real_images_is_one_line(teachers, prompts, tmp_path, capsys):
    code = main(
        ["distill", "--teacher", str(teachers["sd-eps"]), "--prompts", str(prompts),
         "--output-dir", str(tmp_path / "run"), "--gan-weight", "0.1"]
    )  # fmt: skip
    assert code == 2
    assert "--real-images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_generator_timesteps_flag_takes_commas(tmp_path, capsys):
    assert main(
        ["distill", "--teacher", "t", "--prompts", "p", "--generator-timesteps", "999,749",
         "499", "--gradient-accumulation-steps", "2", "--print-config"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "generator_timesteps:\n- 999\n- 749\n- 499" in out
    assert "gradient_accumulation_steps: 2" in out
