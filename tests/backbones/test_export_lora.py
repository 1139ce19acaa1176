"""The student as a LoRA on its teacher: stock ``load_lora_weights`` reads it, full rank is exact."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export_lora import (
    lora_layers,
    lora_state_dict,
    low_rank_factors,
    parse_rank,
    read_unet_state,
)
from wadi.cli import main
from wadi.testing import attach_random_adapter

PROMPTS = ["a photo of a cat", "red car"]


@pytest.fixture(scope="module")
def student(sd_dir, tmp_path_factory):
    """(adapter folder, exported diffusers student folder) of a random LoRaD student."""
    b = load_backbone(sd_dir)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    root = tmp_path_factory.mktemp("lora-student")
    lorad.save_adapter(b.denoiser, root / "adapter", "student")
    argv = ["export", "--teacher", str(sd_dir), "--adapter", str(root / "adapter")]
    assert main([*argv, "--out", str(root / "pipe")]) == 0
    return root / "adapter", root / "pipe"


def _export_lora(sd_dir, adapter, out, rank="full", keys="peft"):
    argv = ["export", "--teacher", str(sd_dir), "--adapter", str(adapter), "--format", "lora"]
    assert main([*argv, "--lora-rank", str(rank), "--lora-keys", keys, "--out", str(out)]) == 0
    return out


def _latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    out = pipe(
        PROMPTS,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=generators,
        output_type="latent",
    )
    return out.images


def _teacher_with(sd_dir, student_dir, lora, fuse):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.scheduler = StableDiffusionPipeline.from_pretrained(student_dir).scheduler
    pipe.load_lora_weights(str(lora))
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


@pytest.mark.parametrize("keys,fuse", [("peft", False), ("peft", True), ("kohya", True)])
def test_full_rank_lora_on_the_teacher_is_the_student(sd_dir, student, tmp_path, keys, fuse):
    adapter, student_dir = student
    lora = _export_lora(sd_dir, adapter, tmp_path / "lora.safetensors", "full", keys)
    with safe_open(str(lora), framework="pt") as f:
        names = list(f.keys())
    if keys == "peft":
        assert all(n.startswith("unet.") and ".lora_" in n for n in names)
        assert {n.rsplit(".", 2)[-2] for n in names} == {"lora_A", "lora_B"}
    else:
        assert all(n.startswith("lora_unet_") for n in names)
        assert {n.split(".", 1)[1] for n in names} == {
            "lora_down.weight",
            "lora_up.weight",
            "alpha",
        }
    ref = _latents(StableDiffusionPipeline.from_pretrained(student_dir))
    teacher = StableDiffusionPipeline.from_pretrained(sd_dir)
    teacher.scheduler = StableDiffusionPipeline.from_pretrained(student_dir).scheduler
    assert not torch.allclose(_latents(teacher), ref, atol=1e-3), "the student must differ"
    got = _latents(_teacher_with(sd_dir, student_dir, lora, fuse))
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    if fuse:  # the fused U-Net is the merged student's, weight by weight
        fused = _teacher_with(sd_dir, student_dir, lora, True).unet.state_dict()
        for key, want in read_unet_state(student_dir).items():
            torch.testing.assert_close(fused[key], want, rtol=0, atol=1e-6)


def test_lower_rank_is_worse(sd_dir, student, tmp_path):
    adapter, student_dir = student
    ref = _latents(StableDiffusionPipeline.from_pretrained(student_dir))
    teacher, merged = read_unet_state(sd_dir), read_unet_state(student_dir)
    weight_errors, output_errors = [], []
    for rank in (1, 2, 4, "full"):
        _, errors = lora_state_dict(teacher, merged, parse_rank(rank))
        weight_errors.append(sum(e.error_norm**2 for e in errors) ** 0.5)
        lora = _export_lora(sd_dir, adapter, tmp_path / f"r{rank}.safetensors", rank)
        got = _latents(_teacher_with(sd_dir, student_dir, lora, fuse=True))
        output_errors.append(float((got - ref).square().mean().sqrt()))
    assert weight_errors[-1] < 1e-9
    assert all(a > b for a, b in zip(weight_errors, weight_errors[1:])), weight_errors
    # the weight error falls with every rank (Eckart-Young); the output error of a random
    # tiny student need not (rank 1 vs 2 here), but every truncation is far from exact
    assert all(e > 1e3 * output_errors[-1] for e in output_errors[:-1]), output_errors
    assert output_errors[-1] < 1e-5


def test_truncated_svd_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64)
    rows = delta.reshape(12, -1)
    s = torch.linalg.svdvals(rows)
    for rank in (1, 4, 12):
        down, up, error = low_rank_factors(delta, rank)
        assert down.shape == (rank, 5, 3, 3) and up.shape == (12, rank, 1, 1)
        approx = up.reshape(12, rank).double() @ down.reshape(rank, -1).double()
        assert abs(float((rows - approx).norm()) - error) < 1e-5
        assert abs(error - float(s[rank:].square().sum().sqrt())) < 1e-9
    assert low_rank_factors(delta, None)[2] < 1e-12


def test_lora_refuses_what_it_cannot_carry(sd_dir):
    teacher = read_unet_state(sd_dir)
    student = dict(teacher)
    with pytest.raises(ValueError, match="nothing to export"):
        lora_layers(teacher, student)
    key = next(k for k in teacher if k.endswith(".bias"))
    student[key] = teacher[key] + 1
    with pytest.raises(ValueError, match="a LoRA cannot carry"):
        lora_layers(teacher, student)
    with pytest.raises(ValueError, match="different tensors"):
        lora_layers(teacher, {k: v for k, v in teacher.items() if k != key})
    with pytest.raises(ValueError, match="--lora-rank"):
        parse_rank("0")


def test_lora_cli_checks_flags_before_loading(sd_dir, student, tmp_path, capsys):
    adapter, _ = student
    argv = ["export", "--teacher", str(sd_dir), "--adapter", str(adapter), "--format", "lora"]
    assert main([*argv, "--lora-rank", "big", "--out", str(tmp_path / "a.safetensors")]) != 0
    assert "--lora-rank" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "folder")]) != 0
    assert ".safetensors" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
