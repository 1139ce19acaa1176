"""The generation core of ``wadi serve``, without any UI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from wadi.serve.engine import MAX_PROMPT_CHARS, Engine, check_seed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _array(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def test_student_image_is_a_png_of_the_model_size(engine):
    image = engine.generate("a photo of a cat", 7)
    pixels = _array(image.png)
    side = engine.student.denoiser.config.sample_size * engine.student.vae_scale_factor
    assert (image.width, image.height) == (side, side) == pixels.shape[:2]
    assert image.steps == image.nfe == 1
    assert image.ms > 0
    assert pixels.std() > 0, "a blank image"


def test_same_seed_same_image_other_seed_or_prompt_another(engine):
    a = engine.generate("a photo of a cat", 1).png
    assert engine.generate("a photo of a cat", 1).png == a
    assert engine.generate("a photo of a cat", 2).png != a
    assert engine.generate("red car", 1).png != a


def test_page_image_is_wadi_generates_first_image(engine, serve_models, tmp_path):
    """The page shows what `wadi generate --pipeline DIR --prompt P --seed S` writes."""
    from wadi.backbones.generate import generate_images

    [path] = generate_images(
        ["red car"], tmp_path / "out", pipeline=serve_models["pipeline"], seed=5, progress=False
    )
    expected = np.asarray(Image.open(path)).astype(np.int16)
    got = _array(engine.generate("red car", 5).png)
    assert np.abs(got - expected).max() <= 1  # stock pipeline vs wadi's route: float rounding


def test_teacher_comparison_runs_its_steps_with_cfg(engine):
    info = engine.info()
    assert info["teacher_steps"] == 3 and info["guidance"] == 3.0 and info["student_steps"] == 1
    teacher = engine.generate("a photo of a cat", 1, "teacher")
    student = engine.generate("a photo of a cat", 1, "student")
    assert (teacher.steps, teacher.nfe) == (3, 6)
    assert _array(teacher.png).shape == _array(student.png).shape
    assert teacher.png != student.png


def test_teacher_comes_from_the_export_record(serve_models):
    record = json.loads((serve_models["pipeline"] / "wadi_export.json").read_text())
    assert record["teacher"]
    engine = Engine(serve_models["pipeline"], teacher_steps=2)
    assert engine.teacher is not None and engine.info()["teacher"] == str(record["teacher"])
    alone = Engine(serve_models["pipeline"], teacher=False)
    assert alone.info()["teacher"] is None
    with pytest.raises(ValueError, match="no teacher is loaded.*--teacher DIR"):
        alone.generate("cat", 0, "teacher")


@pytest.mark.parametrize(
    "seed,message",
    [(-1, "got -1"), ("abc", "got 'abc'"), (2**32, "0-4294967295"), ("1.5", "whole number")],
)
def test_bad_seed_is_one_line(engine, seed, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("cat", seed)


def test_seed_as_text_is_accepted():
    assert check_seed(" 42 ") == 42 and check_seed(0) == 0


def test_bad_prompt_and_model(engine):
    with pytest.raises(ValueError, match=f"more than {MAX_PROMPT_CHARS}; shorten it"):
        engine.generate("x" * (MAX_PROMPT_CHARS + 1), 0)
    with pytest.raises(ValueError, match="prompt must be text"):
        engine.generate(None, 0)
    with pytest.raises(ValueError, match="model must be one of student, teacher"):
        engine.generate("cat", 0, "fake")


def test_bad_folders_name_the_fix(tmp_path, serve_models):
    with pytest.raises(ValueError, match="is not a folder; give a diffusers pipeline folder"):
        Engine(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json; give a diffusers pipeline"):
        Engine(tmp_path / "empty")
    with pytest.raises(ValueError, match="--teacher .* no model_index.json"):
        Engine(serve_models["pipeline"], tmp_path / "empty")
    with pytest.raises(ValueError, match="--teacher without --pipeline"):
        Engine(teacher=serve_models["teacher"])
    with pytest.raises(ValueError, match="--teacher-steps must be at least 2"):
        Engine(serve_models["pipeline"], teacher_steps=1)


def test_shipped_student_draws_the_digit_asked_for():
    """The default page: the shipped digits student, merged, recognised by the evaluator."""
    from wadi.toy.evaluator import load_evaluator
    from wadi.toy.prompts import prompt_for

    engine = Engine()
    info = engine.info()
    assert info["size"] == 16 and info["teacher"] and info["guidance"] == 1.5
    digits = [d for d in range(10) for _ in range(2)]
    images = [engine.generate(prompt_for(d), seed).png for seed, d in enumerate(digits)]
    pixels = torch.tensor(np.stack([_array(p) for p in images]), dtype=torch.float32)
    x = (pixels / 127.5 - 1.0).unsqueeze(1)
    with torch.no_grad():
        predicted = load_evaluator().classify(x).argmax(1)
    accuracy = (predicted == torch.tensor(digits)).float().mean().item()
    assert accuracy >= 0.8, f"shipped student accuracy {accuracy:.2f}"
    # the adapter is merged in (plain modules) and changed the teacher's weights
    from wadi.lorad import lorad_layers

    assert not any(True for _ in lorad_layers(engine.student.denoiser))
    student, teacher = engine.student.denoiser.state_dict(), engine.teacher.denoiser.state_dict()
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)
