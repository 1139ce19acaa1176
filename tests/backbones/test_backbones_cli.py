"""`wadi export` and `wadi generate` end to end on the tiny SD teacher."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
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
    path.write_text("a photo of a cat\nred car\na photo of a cat\nblue house\n")
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
    # image i is line i, the repeated prompt included
    assert [r["prompt"] for r in records] == [
        "a photo of a cat", "red car", "a photo of a cat", "blue house",
    ]  # fmt: skip
    assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(4)]
    assert [r["seed"] for r in records] == [7, 8, 9, 10]
    a, b = _pixels(stock), _pixels(ours)
    assert len(a) == 4 and a[0].shape == (16, 16, 3)
    # same noise per prompt index whatever the batch size and route; <= 1 level of rounding
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], a[2])  # same prompt, its own seed


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


def _tree(folder):
    """Every file under ``folder`` with its bytes, to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_line(capsys, *needles):
    """The command's stderr, wadi's own progress bars aside, is one line holding ``needles``."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    lines = [line for line in lines if not line.startswith(("generate:", "embed:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def run_dir(tmp_path):
    """A run folder shaped like distill's output (the export refuses before reading it)."""
    final = tmp_path / "run" / "final"
    (final / "student_adapter").mkdir(parents=True)
    (final / "config.yaml").write_text("teacher: nowhere\n")
    (final / "student.safetensors").write_bytes(b"weights")
    step = tmp_path / "run" / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text("teacher: nowhere\n")
    (step / "student.safetensors").write_bytes(b"weights")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "checkpoint,out",
    [
        ("final", "final"),  # the reported bug: the run's files were deleted
        ("final", "."),  # the run folder itself
        ("final", "final/pipeline"),
        ("final", "checkpoints/step-10"),  # another checkpoint of the run
        ("checkpoints/step-10", "checkpoints"),
        ("checkpoints/step-10", "final/student_adapter"),
    ],
)
def test_export_refuses_output_over_its_inputs(run_dir, capsys, checkpoint, out):
    before = _tree(run_dir)
    assert main(["export", "--checkpoint", str(run_dir / checkpoint), "--out",
                 str(run_dir / out), "--overwrite"]) == 2  # fmt: skip
    _one_line(capsys, "writing it would destroy the input")
    assert _tree(run_dir) == before


def test_export_refuses_output_reaching_an_input_through_a_symlink(run_dir, tmp_path, capsys):
    (tmp_path / "alias").symlink_to(run_dir / "final")
    before = _tree(run_dir)
    assert main(["export", "--checkpoint", str(run_dir / "final"), "--out",
                 str(tmp_path / "alias"), "--overwrite"]) == 2  # fmt: skip
    _one_line(capsys, "is the input")
    assert _tree(run_dir) == before


def test_export_refuses_output_over_teacher_or_adapter(sd_dir, adapter_dir, capsys):
    before = _tree(adapter_dir)
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(adapter_dir), "--overwrite"]) == 2  # fmt: skip
    _one_line(capsys, "is the input")
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir),
                 "--out", str(sd_dir / "unet"), "--overwrite"]) == 2  # fmt: skip
    _one_line(capsys, "lies inside the input")
    assert _tree(adapter_dir) == before and (sd_dir / "unet" / "config.json").is_file()


def test_folder_outputs_never_replace_a_file(sd_dir, adapter_dir, prompts_file, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    commands = [
        ["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir)],
        ["generate", "--teacher", str(sd_dir), "--prompt", "a cat"],
        ["embed", "--teacher", str(sd_dir), "--prompts", str(prompts_file)],
    ]
    for command in commands:
        assert main([*command, "--out", str(file), "--overwrite"]) == 2
        _one_line(capsys, f"--out {file} is a file", "remove the file or choose another --out")
        # a path under a regular file (what root sees instead of a read-only folder)
        assert main([*command, "--out", str(file / "out")]) == 2
        _one_line(capsys, f"{file} is a file, not a folder")
    assert file.read_text() == "keep me"


def test_generate_overwrite_replaces_the_folder_as_a_whole(sd_dir, tmp_path):
    out = tmp_path / "images"
    prompts = ["--prompt", "a cat", "--prompt", "a dog", "--prompt", "red car"]
    assert main(["generate", "--teacher", str(sd_dir), *prompts, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("stale")
    assert main(["generate", "--teacher", str(sd_dir), "--prompt", "blue house", "--out",
                 str(out), "--overwrite"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "images.jsonl"]
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["blue house"]
    assert not list(tmp_path.glob(".images.*")), "temporary folder left behind"


def test_generate_full_disk_leaves_the_old_images(sd_dir, tmp_path, monkeypatch, capsys):
    import errno

    import wadi.backbones.generate as generate

    out = tmp_path / "images"
    assert main(["generate", "--teacher", str(sd_dir), "--prompt", "a cat", "--out", str(out)]) == 0
    before = _tree(out)
    calls = []
    save = generate._save_png

    def full_disk(image, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(image, path)

    monkeypatch.setattr(generate, "_save_png", full_disk)
    assert main(["generate", "--teacher", str(sd_dir), "--prompt", "a", "--prompt", "b",
                 "--prompt", "c", "--out", str(out), "--overwrite"]) == 2  # fmt: skip
    _one_line(capsys, f"cannot write {out}: No space left on device", "disk is full")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"], "partial output left behind"


def test_generate_keeps_every_prompt_line_and_refuses_empty_ones(sd_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na cat\n\nred car\n")
    assert main(["generate", "--teacher", str(sd_dir), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    _one_line(capsys, "line 3 is empty")
    assert not (tmp_path / "o").exists()
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a"}\n{"other": "b"}\n')
    assert main(["generate", "--teacher", str(sd_dir), "--prompts", str(jsonl), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    err = _one_line(capsys, "line 2 has no", "pass --column KEY")
    assert "--prompt-column" not in err


def test_export_refuses_the_fake_adapter(sd_dir, tmp_path, capsys):
    b = load_backbone(sd_dir, load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, name="fake", rank=2)
    fake = lorad.save_adapter(b.denoiser, tmp_path / "fake_adapter", "fake")
    assert json.loads((fake / "adapter_config.json").read_text())["role"] == "fake"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(fake), "--out",
                 str(tmp_path / "out")]) == 2  # fmt: skip
    _one_line(capsys, "is the fake adapter", "student_adapter")
    assert main(["generate", "--teacher", str(sd_dir), "--adapter", str(fake), "--prompt", "a",
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    _one_line(capsys, "is the fake adapter")
    assert not (tmp_path / "out").exists()


def test_adapters_record_their_role_and_old_ones_still_load(sd_dir, adapter_dir, tmp_path):
    assert lorad.io.adapter_role(adapter_dir) == "student"
    old = tmp_path / "old"
    shutil.copytree(adapter_dir, old)
    config = json.loads((old / "adapter_config.json").read_text())
    del config["role"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    assert lorad.io.adapter_role(old) is None
    b = load_backbone(sd_dir, load_text_encoder=False)
    lorad.load_adapter(b.denoiser, old, "student")
    lorad.load_adapter(load_backbone(sd_dir, load_text_encoder=False).denoiser, adapter_dir, "s")
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(old), "--out",
                 str(tmp_path / "out")]) == 0  # fmt: skip


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))


@pytest.mark.parametrize(
    "part,how",
    [
        ("unet/diffusion_pytorch_model.safetensors", "truncated"),
        ("text_encoder/model.safetensors", "random"),
        ("vae/diffusion_pytorch_model.safetensors", "truncated"),
    ],
)
def test_damaged_teacher_file_is_one_line(sd_dir, tmp_path, capsys, part, how):
    teacher = tmp_path / "teacher"
    shutil.copytree(sd_dir, teacher)
    _damage(teacher / part, how)
    assert main(["generate", "--teacher", str(teacher), "--prompt", "a", "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    _one_line(capsys, f"{teacher / part} is damaged")
    assert not (tmp_path / "o").exists()


def test_damaged_adapter_and_exported_pipeline_are_one_line(sd_dir, adapter_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    _damage(adapter / "adapter_model.safetensors", "truncated")
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    _one_line(capsys, f"{adapter / 'adapter_model.safetensors'} is damaged")
    exported = tmp_path / "exported"
    assert main(["export", "--teacher", str(sd_dir), "--adapter", str(adapter_dir), "--out",
                 str(exported)]) == 0  # fmt: skip
    weights = exported / "unet" / "diffusion_pytorch_model.safetensors"
    _damage(weights, "random")
    assert main(["generate", "--pipeline", str(exported), "--prompt", "a", "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    _one_line(capsys, f"{weights} is damaged")
    assert not (tmp_path / "o").exists()


def test_damaged_student_checkpoint_is_one_line(sd_dir, run_dir, tmp_path, capsys):
    from wadi.distill import DistillConfig

    final = run_dir / "final"
    DistillConfig(teacher=str(sd_dir), prompts=None, output_dir=str(run_dir)).save(
        final / "config.yaml"
    )
    (final / "student.safetensors").write_bytes(os.urandom(200))
    assert main(["export", "--checkpoint", str(final), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"{final / 'student.safetensors'} is damaged")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["generate", "embed"])
def test_cuda_without_cuda_is_one_line_before_loading(tmp_path, capsys, command):
    args = ["--prompt", "a"] if command == "generate" else ["--prompts", str(tmp_path / "p.txt")]
    # the teacher does not exist: the device is checked first
    assert main([command, "--teacher", str(tmp_path / "none"), *args, "--out",
                 str(tmp_path / "o"), "--device", "cuda"]) == 2  # fmt: skip
    _one_line(capsys, "CUDA is not available on this machine; use --device cpu")


def test_generate_fp16_on_cpu_warns_in_one_line(sd_dir, tmp_path, capsys):
    main(["generate", "--teacher", str(sd_dir), "--prompt", "a", "--out", str(tmp_path / "o"),
          "--device", "cpu", "--dtype", "fp16"])  # fmt: skip
    err = capsys.readouterr().err
    assert "wadi generate: warning: fp16 on CPU" in err
    assert "Traceback" not in err


def test_teacher_plus_adapter_samples_with_the_generator_its_run_trained(
    sd_dir, adapter_dir, tmp_path
):
    """An adapter inside a run folder (RUN/final/student_adapter) is sampled with the run's
    generator (here two steps, 999 and 499), as its export would be; a loose one in one step."""
    from wadi.backbones.generate import RENOISE_SEED, seeded_noise
    from wadi.distill import DistillConfig
    from wadi.generators import MultiStep

    final = tmp_path / "run" / "final"
    shutil.copytree(adapter_dir, final / "student_adapter")
    (tmp_path / "p.txt").write_text("a cat\n")
    DistillConfig(
        teacher=str(sd_dir), prompts=str(tmp_path / "p.txt"), generator_timesteps=[999, 499]
    ).save(final / "config.yaml")
    outs = {}
    for name, adapter in (("run", final / "student_adapter"), ("loose", adapter_dir)):
        outs[name] = tmp_path / f"out-{name}"
        assert main(["generate", "--teacher", str(sd_dir), "--adapter", str(adapter),
                     "--prompt", "a red car", "--out", str(outs[name]), "--seed", "3"]) == 0  # fmt: skip
    backbone = load_backbone(sd_dir)
    lorad.load_adapter(backbone.denoiser, adapter_dir, "student")
    size = backbone.latent_size(16)  # the tiny teacher's native 16 px
    z = seeded_noise([0], 3, (backbone.latent_channels, size, size))
    with torch.no_grad():
        x0 = MultiStep([999, 499]).sample(
            backbone, z, backbone.encode_prompts(["a red car"]),
            torch.Generator().manual_seed(RENOISE_SEED + 3),
        )  # fmt: skip
        want = (backbone.decode(x0).float() / 2 + 0.5).clamp(0, 1)[0]
    want = np.round(want.permute(1, 2, 0).numpy() * 255).astype(int)
    (got,) = _pixels(outs["run"])
    assert np.abs(got - want).max() <= 1
    assert np.abs(_pixels(outs["loose"])[0] - want).max() > 1
