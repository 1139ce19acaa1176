"""The core's three capabilities end to end on tiny teachers: gradient accumulation,
multi-step students (exported to a stock LCMScheduler pipeline), DMD's objective; and
torch.compile of the shared denoiser."""

import json

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from wadi.backbones import load_backbone
from wadi.distill import train
from wadi.generators import MultiStep

from .conftest import tiny_config


def _close(a: dict, b: dict, tol: float) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in a)


def test_accumulated_micro_batches_equal_the_whole_batch(teachers, prompts, tmp_path):
    knobs = dict(max_steps=3, export_pipeline=False, seed=5)
    whole = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "whole", batch_size=2, **knobs)
    )
    split = train(
        tiny_config(
            teachers["sd-eps"],
            prompts,
            tmp_path / "split",
            batch_size=1,
            gradient_accumulation_steps=2,
            **knobs,
        )  # fmt: skip
    )
    assert _close(whole.student_state, split.student_state, 1e-5)
    assert _close(whole.fake_state, split.fake_state, 1e-5)
    # and it is not vacuous: one micro-batch alone trains something else
    single = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "one", batch_size=1, **knobs)
    )
    assert not _close(whole.student_state, single.student_state, 1e-5)


def test_accumulation_resumes_bit_for_bit(teachers, prompts, tmp_path):
    knobs = dict(batch_size=1, gradient_accumulation_steps=2, export_pipeline=False, seed=2)
    straight = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "a", max_steps=4, **knobs))
    train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "b", max_steps=2, **knobs))
    resumed = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "b", max_steps=4, **knobs),
        resume="latest",
    )
    assert resumed.steps_run == 2
    assert all(torch.equal(straight.student_state[k], v) for k, v in resumed.student_state.items())
    assert all(torch.equal(straight.fake_state[k], v) for k, v in resumed.fake_state.items())


@pytest.mark.parametrize("name", ["sd-eps", "sd-v"])
def test_multistep_student_trains_and_exports_a_stock_lcm_pipeline(
    teachers, prompts, tmp_path, name
):
    steps = [999, 749, 499, 249]
    result = train(
        tiny_config(teachers[name], prompts, tmp_path / "run", generator_timesteps=steps)
    )
    pipeline = result.final_dir / "pipeline"
    info = json.loads((pipeline / "wadi_export.json").read_text())
    assert info["timesteps"] == steps and info["generator"] == "multi-step"
    summary = json.loads((result.final_dir / "summary.json").read_text())
    assert summary["timesteps"] == steps
    pipe = StableDiffusionPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    stock = pipe(
        ["a cat", "a dog"], generator=torch.Generator().manual_seed(1), output_type="latent",
        height=16, width=16, **info["pipeline_call"],
    ).images  # fmt: skip
    # wadi's own sampler on the exported (merged) student
    b = load_backbone(pipeline)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(stock.shape, generator=g)
    with torch.no_grad():
        ours = MultiStep(steps).sample(b, z, b.encode_prompts(["a cat", "a dog"]), g)
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def test_multistep_training_uses_backward_simulation(teachers, prompts, tmp_path, monkeypatch):
    from wadi.generators import Generator

    seen = []
    real = Generator.train_sample

    def spy(self, backbone, z, cond, step, generator=None, noises=None):
        seen.append(step)
        return real(self, backbone, z, cond, step, generator, noises)

    monkeypatch.setattr(Generator, "train_sample", spy)
    train(
        tiny_config(
            teachers["sd-eps"],
            prompts,
            tmp_path / "run",
            max_steps=8,
            export_pipeline=False,
            generator_timesteps=[999, 499],
        )  # fmt: skip
    )
    assert set(seen) == {0, 1}  # both steps are trained, the second after a no-grad first


def test_dmd_objective_trains_and_differs_from_vsd(teachers, prompts, tmp_path):
    knobs = dict(max_steps=2, export_pipeline=False)
    vsd = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "vsd", **knobs))
    dmd = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "dmd", objective="dmd", **knobs)
    )
    assert dmd.skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in dmd.student_state.values())
    assert not _close(vsd.student_state, dmd.student_state, 1e-6)
    with pytest.raises(ValueError, match="objective must be one of"):
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "x", objective="gan")


def test_compile_flag_compiles_the_shared_denoiser_in_place(
    teachers, prompts, tmp_path, monkeypatch
):
    """The fast check (make test): --compile compiles the one denoiser all roles share."""
    from diffusers import UNet2DConditionModel

    seen = []
    monkeypatch.setattr(
        UNet2DConditionModel, "compile", lambda self, **kw: seen.append(kw), raising=False
    )
    train(
        tiny_config(
            teachers["sd-eps"],
            prompts,
            tmp_path / "run",
            max_steps=1,
            export_pipeline=False,
            compile=True,
            compile_backend="aot_eager",
        )  # fmt: skip
    )
    assert seen == [{"backend": "aot_eager"}]


@pytest.mark.slow  # tracing a U-Net takes a minute or more on 2 cores
def test_compiled_denoiser_trains_like_the_eager_one(teachers, prompts, tmp_path):
    knobs = dict(max_steps=1, export_pipeline=False, seed=1)
    eager = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "eager", **knobs))
    compiled = train(
        tiny_config(
            teachers["sd-eps"],
            prompts,
            tmp_path / "compiled",
            compile=True,
            compile_backend="aot_eager",
            **knobs,
        )  # fmt: skip
    )
    assert _close(eager.student_state, compiled.student_state, 1e-4)


def test_bad_generator_timesteps_are_one_line(teachers, prompts, tmp_path):
    with pytest.raises(ValueError, match="strictly decreasing"):
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "x", generator_timesteps=[499, 999])
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "x", gradient_accumulation_steps=0)


def test_native_resolution_of_backbones_without_sample_size(tmp_path):
    """FLUX's transformer has no sample_size: the run takes the backbone's own resolution."""
    from wadi.distill.report import native_resolution
    from wadi.testing import make_tiny_flux

    b = load_backbone(make_tiny_flux(tmp_path / "flux"))
    assert native_resolution(b) == b.resolution
