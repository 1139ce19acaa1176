"""Bad inputs for the SD3 and FLUX backbones through the CLI: one line each, before training."""

import shutil

import pytest

from wadi.cli import main
from wadi.testing import make_tiny_flux, make_tiny_sd3


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    flux, sd3 = make_tiny_flux(root / "flux"), make_tiny_sd3(root / "sd3")
    no_t5 = root / "flux-no-t5-weights"
    shutil.copytree(flux, no_t5)
    for f in (no_t5 / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    no_te2 = root / "sd3-no-te2"
    shutil.copytree(sd3, no_te2, ignore=shutil.ignore_patterns("text_encoder_2"))
    return {"flux": flux, "sd3": sd3, "flux-no-t5": no_t5, "sd3-no-te2": no_te2}


def _one_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "teacher,resolution,needles",
    [
        (
            "flux-no-t5",
            16,
            ["the T5 weights (text_encoder_2/*.safetensors) missing", "FluxPipeline"],
        ),
        ("sd3-no-te2", 16, ["text_encoder_2/config.json missing", "StableDiffusion3Pipeline"]),
        ("flux", 18, ["FLUX resolution 18 must be a positive multiple of 4"]),
        ("sd3", 14, ["SD3 resolution 14 must be a positive multiple of 4", "patch size 2"]),
    ],
)
def test_distill_bad_teacher_or_resolution_is_one_line(
    teachers, tmp_path, capsys, teacher, resolution, needles
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teachers[teacher]), "--prompts", str(prompts)]
    args += ["--output-dir", str(out), "--resolution", str(resolution), "--max-steps", "1"]
    args += ["--student-rank", "2", "--fake-rank", "2", "--batch-size", "1", "--no-progress"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert all(n in line for n in needles), line
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


@pytest.mark.parametrize("teacher,resolution", [("flux", 18), ("sd3", 14)])
def test_generate_bad_resolution_is_one_line(teachers, tmp_path, capsys, teacher, resolution):
    out = tmp_path / "images"
    args = ["generate", "--teacher", str(teachers[teacher]), "--prompt", "a cat"]
    assert main([*args, "--out", str(out), "--resolution", str(resolution)]) == 2
    assert f"resolution {resolution} must be a positive multiple of 4" in _one_line(capsys)
    assert not out.exists()
