"""Training on tiny teachers built offline: what changes, what must not, what comes out."""

import json

import pytest
import torch
from safetensors.torch import load_file

from wadi import lorad
from wadi.backbones import load_backbone, one_step
from wadi.distill import train

from .conftest import tiny_config


def _base_state(model):
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "lorad_" not in n and "lora_" not in n
    }


@pytest.mark.parametrize("kind", ["sd-eps", "sd-v", "pixart"])
def test_training_changes_both_adapters_and_leaves_base_bitwise(kind, teachers, prompts, tmp_path):
    teacher = load_backbone(teachers[kind])
    reference = _base_state(teacher.denoiser)
    seen = {}

    def check(step, ctx):
        base = ctx["roles"].base
        state = {n.replace(".base_layer", ""): p for n, p in _base_state(base).items()}
        seen[step] = all(torch.equal(state[n], reference[n]) for n in reference) and len(
            state
        ) == len(reference)

    config = tiny_config(teachers[kind], prompts, tmp_path / "run", export_pipeline=False)
    result = train(config, callback=check, callback_every=3)
    assert result.steps == 3 and result.skipped_steps == 0
    assert seen == {0: True, 3: True}  # base weights bitwise intact before and after training
    final = result.final_dir
    for adapter in ("student_adapter", "fake_adapter"):
        factors = load_file(final / adapter / "adapter_model.safetensors")
        a_norm = sum(v.abs().sum().item() for k, v in factors.items() if k.endswith("lorad_A"))
        assert a_norm > 0, f"{adapter} did not change (A is zero at init)"
    assert all(torch.isfinite(torch.tensor(r["loss_fake"])) for r in result.history)
    cfg = json.loads((final / "student_adapter" / "adapter_config.json").read_text())
    assert cfg["rank"] == 4


def test_exported_pipeline_equals_wadi_one_step(teachers, prompts, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = tiny_config(teachers["sd-eps"], prompts, tmp_path / "run")
    result = train(config)
    pipe = StableDiffusionPipeline.from_pretrained(result.final_dir / "pipeline")
    backbone = load_backbone(teachers["sd-eps"])
    lorad.load_adapter(backbone.denoiser, result.final_dir / "student_adapter", "student")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = ["a cat", "a dog"]
    expected = one_step(
        backbone,
        z,
        backbone.encode_prompts(prompt),
        json.loads((result.final_dir / "summary.json").read_text())["alpha_bar_T"],
    )
    out = pipe(
        prompt, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="latent"
    )
    torch.testing.assert_close(out.images, expected.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter", ["lora", "dora", "dora-fixed", "full"])
def test_baseline_adapters_train(adapter, teachers, prompts, tmp_path):
    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", adapter=adapter, max_steps=2
    )
    result = train(config)
    student = load_file(result.final_dir / "student.safetensors")
    assert student and all(torch.isfinite(v).all() for v in student.values())
    assert (result.final_dir / "pipeline" / "unet").is_dir()


def test_refuses_output_dir_of_another_run(teachers, prompts, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(teachers["sd-eps"], prompts, out, max_steps=1, export_pipeline=False))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(
        ValueError, match=r"different config \(seed\).*--resume latest.*--overwrite"
    ):
        train(tiny_config(teachers["sd-eps"], prompts, out, max_steps=1, seed=5))
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(teachers["sd-eps"], prompts, out, max_steps=1, export_pipeline=False))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_bad_inputs_fail_with_one_clear_line(teachers, tmp_path):
    from wadi.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    cases = [
        (["--teacher", str(tmp_path / "missing"), "--prompts", str(empty)], "not found"),
        (["--teacher", str(teachers["sd-eps"]), "--prompts", str(empty)], "no prompts"),
        (
            ["--teacher", str(teachers["sd-eps"]), "--prompts", str(tmp_path / "nope.txt")],
            "not found",
        ),
        (["--teacher", str(teachers["sd-eps"])], "no prompts given"),
    ]
    for extra, message in cases:
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            code = main(
                ["distill", "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *extra]
            )
        line = err.getvalue().strip().splitlines()[-1]  # loaders may draw progress bars before
        assert code == 2, line
        assert message in line and line.startswith("wadi distill: error:"), line


@pytest.mark.parametrize("adapter", ["lorad", "dora"])
def test_export_any_checkpoint_matches_final_pipeline(adapter, teachers, prompts, tmp_path):
    from diffusers import StableDiffusionPipeline

    from wadi.cli import main

    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", adapter=adapter, max_steps=2
    )
    result = train(config)
    step = result.output_dir / "checkpoints" / "step-000002"
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "exported")]) == 0
    a = StableDiffusionPipeline.from_pretrained(result.final_dir / "pipeline")
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(pipe):
        out = pipe(
            "a dog",
            num_inference_steps=1,
            guidance_scale=1.0,
            latents=z.clone(),
            output_type="latent",
        )
        return out.images

    torch.testing.assert_close(run(a), run(b), rtol=1e-5, atol=1e-5)
    assert (
        main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "exported")]) == 2
    )  # no overwrite
