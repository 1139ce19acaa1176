"""``export_dtype``: the dtype of a run's ``final/pipeline``, with stock variant names and a card."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wadi.cli import main
from wadi.distill import DistillConfig, train

from .conftest import tiny_config

UNET = "unet/diffusion_pytorch_model"


def test_final_pipeline_in_fp16_has_variant_names_and_a_model_card(teachers, prompts, tmp_path):
    from wadi.distill.export import export_checkpoint

    config = tiny_config(teachers["sd-eps"], prompts, tmp_path / "run", max_steps=1,
                         export_dtype="fp16", checkpoint_every=100)  # fmt: skip
    result = train(config)
    pipeline = result.final_dir / "pipeline"
    stored = pipeline / f"{UNET}.fp16.safetensors"
    plain = pipeline / f"{UNET}.safetensors"
    assert stored.is_file() and plain.is_symlink() and plain.resolve() == stored.resolve()
    with safe_open(str(stored), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    summary = json.loads((result.final_dir / "summary.json").read_text())
    assert (summary["pipeline_dtype"], summary["pipeline_variant"]) == ("float16", "fp16")
    # the same merged student, rounded once: fp32 export of the same final/ cast to fp16
    export_checkpoint(result.final_dir, tmp_path / "fp32")
    full = load_file(tmp_path / "fp32" / f"{UNET}.safetensors")
    half = load_file(stored)
    assert set(full) == set(half)
    assert all(torch.equal(full[k].to(torch.float16), half[k]) for k in full)
    card = (pipeline / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and "distillation" in meta["tags"]
    assert 'torch_dtype=torch.float16, variant="fp16"' in card
    assert "| `student_rank` | 4 |" in card and "| `max_steps` | 1 |" in card
    assert str(prompts.parent) not in card.replace(str(pipeline), "")  # only the prompt file's name


def test_export_dtype_default_is_the_teachers_stored_dtype(tmp_path):
    from wadi.distill.run_state import _export_dtype

    teacher = tmp_path / "teacher"
    (teacher / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2, dtype=torch.bfloat16)}, str(teacher / "unet" / "w.safetensors"))
    config = DistillConfig(teacher=str(teacher))
    assert _export_dtype(config) == torch.bfloat16
    assert _export_dtype(config.replace(export_dtype="fp32")) == torch.float32
    assert _export_dtype(config.replace(export_dtype="float16")) == torch.float16


def test_bad_export_dtype_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="export_dtype must be fp16, bf16 or fp32"):
        DistillConfig(export_dtype="fp8")
    assert main(["distill", "--teacher", str(tmp_path), "--export-dtype", "int8",
                 "--print-config"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "export_dtype must be fp16, bf16 or fp32" in err and len(err.splitlines()) == 1
    assert main(["distill", "--teacher", str(tmp_path), "--export-dtype", "bf16",
                 "--print-config"]) == 0  # fmt: skip
    assert "export_dtype: bf16" in capsys.readouterr().out
    # a resumption may change it: it is how final/ is stored, not the recipe
    assert not DistillConfig(export_dtype="fp16").differences(DistillConfig())


def test_a_failing_model_card_costs_final_nothing_but_a_warning(tmp_path, monkeypatch):
    from wadi.backbones import model_card
    from wadi.distill.run_state import _model_card

    def broken(*args, **kwargs):
        raise RuntimeError("card bug")

    monkeypatch.setattr(model_card, "folder_card", broken)
    pipeline = tmp_path / "final" / "pipeline"
    pipeline.mkdir(parents=True)
    (pipeline / "wadi_export.json").write_text("{}")
    config = DistillConfig(teacher=str(tmp_path))
    with pytest.warns(UserWarning, match=r"no model card \(RuntimeError: card bug\)"):
        variant = _model_card(pipeline, tmp_path / "final", config, {"pipeline_weights": "student"},
                              torch.float32)  # fmt: skip
    assert variant is None and not (pipeline / "README.md").exists()
