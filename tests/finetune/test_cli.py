"""wadi finetune on the command line: bad inputs in one line, output for export and generate."""

import pytest

from wadi.cli import main


def _flags(base, images, out, *extra):
    return [
        "finetune", "--base", str(base), "--images", str(images), "--output-dir", str(out),
        "--resolution", "16", "--batch-size", "1", "--rank", "2", "--max-steps", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("wadi finetune: error:")
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.mark.parametrize(
    "case, needles",
    [
        ("empty", ["holds no images", "--images"]),
        ("stray", ["notes.txt is not an image", "move it out"]),
        ("no-prompt", ["--instance-prompt"]),
    ],
)
def test_bad_inputs_one_line(bases, subject, tmp_path, capsys, case, needles):
    images = tmp_path / "images"
    images.mkdir()
    extra = ["--instance-prompt", "a photo of sks dog"]
    if case == "stray":
        for f in subject.iterdir():
            (images / f.name).write_bytes(f.read_bytes())
        (images / "notes.txt").write_text("not an image")
    elif case == "no-prompt":
        images, extra = subject, []
    out = tmp_path / "out"
    assert main(_flags(bases["sd-eps"], images, out, *extra)) == 2
    _one_line_error(capsys, *needles)
    assert not out.exists()  # nothing written for a run that cannot start


def test_output_exports_and_generates(bases, subject, tmp_path, capsys):
    """final/adapter merges with `wadi export --teacher --adapter` into the same weights as
    final/pipeline, and `wadi generate` samples the tuned model in several steps."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    base = bases["sd-eps"]
    flags = _flags(base, subject, out, "--instance-prompt", "a photo of sks dog",
                   "--learning-rate", "0.05", "--export")  # fmt: skip
    assert main(flags) == 0
    final = out / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert main(["export", "--teacher", str(base), "--adapter", str(final / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0  # fmt: skip
    mine = load_file(final / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    untouched = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch_close(mine[k], theirs[k])
    assert any(not (mine[k] == untouched[k]).all() for k in mine)  # the tuning is in there
    assert (tmp_path / "merged" / "scheduler" / "scheduler_config.json").read_text() == (
        base / "scheduler" / "scheduler_config.json"
    ).read_text()  # the base's own multi-step scheduler, not a one-step one
    gen = ["generate", "--teacher", str(final / "pipeline"), "--prompt", "a photo of sks dog",
           "--steps", "3", "--guidance", "3", "--out", str(tmp_path / "png")]  # fmt: skip
    assert main(gen) == 0
    assert (tmp_path / "png" / "00000.png").is_file()


def torch_close(a, b):
    import torch

    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
