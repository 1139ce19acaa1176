"""`wadi export` and `wadi generate` end to end on the tiny SD teacher."""

import json

import numpy as np
import pytest
from PIL import Image

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.cli import main
from wadi.testing import attach_random_adapter


@pytest.fixture(scope="module")
def adapter_dir(sd_dir, tmp_path_factory):
    b = load_backbone(sd_dir, load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=5)
    return lorad.save_adapter(b.denoiser, tmp_path_factory.mktemp("adapter"), "student")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("a photo of a cat\nred car\n\na photo of a cat\nblue house\n")
    return path


def _pixels(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def test_export_then_generate_matches_teacher_plus_adapter(
    sd_dir, adapter_dir, prompts_file, tmp_path, capsys
):
    exported = tmp_path / "exported"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(exported)]) == 0  # fmt: skip
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionPipeline"
    )
    # refuses to overwrite; the folder is untouched
    before = sorted(p.name for p in exported.iterdir())
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(exported)]) == 2  # fmt: skip
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in exported.iterdir()) == before

    stock, ours = tmp_path / "stock", tmp_path / "ours"
    assert main(["generate", "--pipeline", str(exported), "--prompts", str(prompts_file),
                 "--out", str(stock), "--batch-size", "2", "--seed", "7"]) == 0  # fmt: skip
    assert main(["generate", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--prompts", str(prompts_file), "--out", str(ours), "--batch-size", "3",
                 "--seed", "7"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (stock / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a photo of a cat", "red car", "blue house"]
    assert [r["seed"] for r in records] == [7, 8, 9]
    a, b = _pixels(stock), _pixels(ours)
    assert len(a) == 3 and a[0].shape == (16, 16, 3)
    # same noise per prompt index whatever the batch size and route; <= 1 level of rounding
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1
    assert not np.array_equal(a[0], a[1])


def test_generate_teacher_multistep_and_errors(sd_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["generate", "--teacher", str(sd_dir), "--prompt", "a cat", "--prompt", "a dog",
                 "--out", str(out), "--steps", "3", "--guidance", "3"]) == 0  # fmt: skip
    assert len(_pixels(out)) == 2
    assert main(["generate", "--teacher", str(sd_dir), "--prompt", "a cat", "--out",
                 str(tmp_path / "x"), "--guidance", "3"]) == 2  # fmt: skip
    assert "--guidance applies to multi-step" in capsys.readouterr().err
    assert main(["generate", "--teacher", str(sd_dir), "--adapter", str(adapter_dir), "--prompt",
                 "a cat", "--out", str(tmp_path / "y"), "--steps", "4"]) == 2  # fmt: skip
    assert "--steps > 1 samples the multi-step teacher" in capsys.readouterr().err
    assert main(["generate", "--teacher", str(sd_dir), "--prompt", "a cat", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["generate", "--teacher", str(tmp_path / "none"), "--prompt", "a", "--out",
                 str(tmp_path / "z")]) == 2  # fmt: skip
    assert "not found" in capsys.readouterr().err
