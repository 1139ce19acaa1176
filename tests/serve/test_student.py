"""The shipped student's recipe: a run's EMA written as a LoRaD adapter folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.lorad.io import adapter_role
from wadi.serve.student import INFO_NAME, STUDENT_DIR, student_info, write_student_adapter
from wadi.testing import attach_random_adapter, make_tiny_pixel_teacher


@pytest.fixture()
def final_dir(tmp_path):
    teacher = make_tiny_pixel_teacher(tmp_path / "teacher")
    backbone = load_backbone(teacher, load_text_encoder=False)
    attach_random_adapter(backbone.denoiser, backbone.student_preset, rank=2, seed=1)
    final = tmp_path / "run" / "final"
    lorad.save_adapter(backbone.denoiser, final / "student_adapter", "student")
    state = lorad.adapter_state_dict(backbone.denoiser, "student")
    save_file({k: v + 0.5 for k, v in state.items()}, str(final / "ema.safetensors"))
    save_file(dict(state), str(final / "student.safetensors"))
    (final / "summary.json").write_text(json.dumps({"alpha_bar_T": 0.01, "timesteps": [999]}))
    return teacher, final


def test_writes_the_ema_as_an_adapter_that_loads(final_dir, tmp_path):
    teacher, final = final_dir
    out = write_student_adapter(final, tmp_path / "student")
    backbone = load_backbone(teacher, load_text_encoder=False)
    lorad.load_adapter(backbone.denoiser, out, "student")
    loaded = lorad.adapter_state_dict(backbone.denoiser, "student")
    ema = load_file(str(final / "ema.safetensors"))
    assert loaded.keys() == ema.keys()
    for key, value in ema.items():
        torch.testing.assert_close(loaded[key], value)
    info = student_info(out)
    assert info["alpha_bar_T"] == 0.01 and info["weights"] == "ema"


def test_refuses_what_is_not_a_run(final_dir, tmp_path):
    teacher, final = final_dir
    with pytest.raises(ValueError, match="not the final/ folder of a LoRaD run"):
        write_student_adapter(teacher, tmp_path / "out")
    (final / "ema.safetensors").unlink()
    with pytest.raises(ValueError, match="no EMA"):
        write_student_adapter(final, tmp_path / "out")
    save_file({"other.lorad_A": torch.zeros(1)}, str(final / "ema.safetensors"))
    with pytest.raises(ValueError, match="does not hold the tensors"):
        write_student_adapter(final, tmp_path / "out")


def test_shipped_student_is_small_and_recorded():
    weights = STUDENT_DIR / "adapter_model.safetensors"
    assert weights.stat().st_size < 1_000_000
    assert adapter_role(STUDENT_DIR) == "student"
    info = json.loads((STUDENT_DIR / INFO_NAME).read_text())
    assert 0 < info["alpha_bar_T"] < 0.05 and info["weights"] == "ema"
