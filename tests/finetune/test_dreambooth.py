"""wadi finetune (DreamBooth with LoRaD / LoRA / DoRA) on a tiny SD base."""

import json

import pytest
import torch

from wadi.finetune import finetune
from wadi.finetune.dreambooth import CLASS_IMAGES, build_run

from .conftest import tiny_config

CPU = torch.device("cpu")


def _run(config):
    run, _ = build_run(config.with_absolute_paths(), CPU, 0, 1, None, False)
    return run


def _adapter_name(name: str) -> bool:
    return "lorad_" in name or "lora_" in name


@pytest.mark.parametrize("adapter", ["lorad", "lora"])
def test_only_adapter_parameters_change(bases, subject, tmp_path, adapter):
    config = tiny_config(
        bases["sd-eps"], subject, tmp_path / "out", adapter=adapter, learning_rate=1e-2,
        class_prompt="a photo of a dog",
    )  # fmt: skip
    run = _run(config)
    modules = {"unet": run.backbone.denoiser, "text": run.backbone.text_encoder}
    modules["vae"] = run.backbone.vae
    before = {
        f"{m}.{n}": p.detach().clone()
        for m, mod in modules.items()
        for n, p in mod.named_parameters()
    }
    for step in range(2):
        result = run.iteration(run.data.get([0, 1]), None, run.shape, run.rng, step)
        assert result.ok and result.loss_fake == result.loss_fake  # the prior term is there
    changed = {
        k for m, mod in modules.items() for n, p in mod.named_parameters()
        if not torch.equal(p, before[k := f"{m}.{n}"])
    }  # fmt: skip
    assert changed, "nothing trained"
    assert all(_adapter_name(k) for k in changed), sorted(changed)[:5]
    ids = {id(p) for p in run.roles.student_parameters()}
    trained = {f"unet.{n}" for n, p in run.backbone.denoiser.named_parameters() if id(p) in ids}
    assert trained == {k for k in before if _adapter_name(k)}  # every adapter tensor, no other
    assert changed <= trained


def test_loss_decreases_on_a_fixed_batch(bases, subject, tmp_path):
    run = _run(tiny_config(bases["sd-eps"], subject, tmp_path / "out", learning_rate=3e-2))
    x0 = run.data.get([0, 1])
    state = run.rng.get_state()
    losses = []
    for step in range(15):
        run.rng.set_state(state)  # the same noise and timesteps every step
        losses.append(run.iteration(x0, None, run.shape, run.rng, step).loss_generator)
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 12, losses  # steadily down


@pytest.mark.parametrize("kind", ["sd-eps", "sd-v"])
def test_loss_target_matches_float64(bases, subject, tmp_path, kind):
    """x_t, t and the regression target (eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0) of
    the iteration against a float64 hand computation from the scheduler's table."""
    config = tiny_config(
        bases[kind], subject, tmp_path / "out", class_prompt="a photo of a dog", t_min=100
    )
    run = _run(config)
    it = run.iteration
    seen = {}

    def predict(x_t, t, cond):
        seen.update(x_t=x_t.detach().double(), t=t.clone(), n=len(cond))
        return torch.zeros_like(x_t)

    run.backbone.predict = predict
    x0 = run.data.get([2, 0])
    draws = it.draws(x0, run.rng)
    loss_i, loss_c = it.losses(x0, draws, slice(0, 2))
    abar = torch.as_tensor(run.backbone.scheduler.alphas_cumprod, dtype=torch.float64)
    xs = torch.cat([x0, it.class_latents[draws["pick"]]]).double()
    eps = torch.cat([draws["eps"], draws["eps_class"]]).double()
    t = torch.cat([draws["t"], draws["t_class"]])
    assert torch.equal(seen["t"], t) and seen["n"] == 4 and (t >= 100).all()
    a = abar[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], a * xs + s * eps, rtol=0, atol=1e-5)
    target = eps if kind == "sd-eps" else a * eps - s * xs
    hand = target.square().flatten(1).mean(1)  # the loss of a zero prediction
    torch.testing.assert_close(loss_i.double(), hand[:2].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_c.double(), hand[2:].mean(), rtol=1e-5, atol=0)
    if kind == "sd-v":  # v differs from eps: the test tells the two apart
        assert not torch.allclose(target, eps, atol=1e-2)


def test_flow_target_is_velocity():
    from wadi.backbones.parametrization import FlowMatchingParametrization

    param = FlowMatchingParametrization(1000, shift=3.0)
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(param.target(x0, eps, t), eps.double() - x0, rtol=0, atol=0)
    # the velocity is what to_x0 inverts: x0 = x_t - s v
    x_t = param.add_noise(x0, eps.double(), t)
    torch.testing.assert_close(param.to_x0(param.target(x0, eps, t), x_t, t), x0)


def test_prior_images_generated_once_and_reused(bases, subject, tmp_path, monkeypatch):
    import wadi.backbones.sampling as sampling

    calls = []
    real = sampling.sample_multistep
    monkeypatch.setattr(
        sampling, "sample_multistep", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k)
    )
    out = tmp_path / "out"
    config = tiny_config(
        bases["sd-eps"], subject, out, class_prompt="a photo of a dog", prior_images=3
    )
    finetune(config)
    files = sorted((out / CLASS_IMAGES).glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"] and calls == [3]
    stamps = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    finetune(config.replace(max_steps=3), resume="latest")  # resumed: reused, not redrawn
    assert calls == [3]
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == stamps
    files[1].unlink()  # a run killed mid-generation: only the missing image is made, the same
    finetune(config.replace(max_steps=4), resume="latest")
    assert calls == [3, 1] and files[1].read_bytes() == stamps["00001.png"][1]
    info = json.loads((out / "class-images.json").read_text())
    assert info["class_prompt"] == "a photo of a dog" and info["count"] == 3


@pytest.mark.parametrize("adapter", ["lorad", pytest.param("dora", marks=pytest.mark.slow)])
def test_resume_equals_uninterrupted(bases, subject, tmp_path, adapter):
    knobs = dict(adapter=adapter, class_prompt="a photo of a dog", learning_rate=1e-2)
    whole = finetune(tiny_config(bases["sd-v"], subject, tmp_path / "a", max_steps=4, **knobs))
    config = tiny_config(bases["sd-v"], subject, tmp_path / "b", max_steps=2, **knobs)
    finetune(config)
    resumed = finetune(config.replace(max_steps=4), resume="latest")
    assert resumed.steps == 4 and resumed.steps_run == 2
    assert whole.adapter_state.keys() == resumed.adapter_state.keys()
    for name, value in whole.adapter_state.items():
        assert torch.equal(value, resumed.adapter_state[name]), name
    assert [h["loss_generator"] for h in whole.history[2:]] == [
        h["loss_generator"] for h in resumed.history
    ]
