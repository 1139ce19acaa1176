"""Options of the training loop: precomputed embeddings, checkpointing, bf16, non-finite steps, 8-bit."""

import pytest
import torch
from safetensors.torch import load_file

from wadi.distill import NonFiniteError, train

from .conftest import tiny_config


def _student(result):
    return load_file(result.final_dir / "student.safetensors")


def test_embeddings_give_the_same_run_as_the_text_encoder(teachers, prompts, tmp_path):
    from wadi.data.embeddings import embed_prompts

    embed_prompts(teachers["pixart"], prompts, tmp_path / "emb", shard_size=3, progress=False)
    knobs = dict(max_steps=2, export_pipeline=False)
    a = train(tiny_config(teachers["pixart"], prompts, tmp_path / "a", **knobs))
    b = train(
        tiny_config(
            teachers["pixart"], None, tmp_path / "b", embeddings=str(tmp_path / "emb"), **knobs
        )
    )
    sa, sb = _student(a), _student(b)
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7) for k in sa)


def test_gradient_checkpointing_gives_the_same_training(teachers, prompts, tmp_path):
    knobs = dict(max_steps=2, export_pipeline=False)
    a = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "a", **knobs))
    b = train(
        tiny_config(
            teachers["sd-eps"], prompts, tmp_path / "b", gradient_checkpointing=True, **knobs
        )
    )
    sa, sb = _student(a), _student(b)
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7) for k in sa)
    assert any(sa[k].abs().sum() > 0 for k in sa if k.endswith("lorad_A"))


def test_bf16_mixed_precision_trains_with_float32_angles(teachers, prompts, tmp_path):
    result = train(
        tiny_config(
            teachers["sd-eps"], prompts, tmp_path / "run", max_steps=2, mixed_precision="bf16"
        )
    )
    student = _student(result)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.values())
    assert result.skipped_steps == 0


def test_non_finite_steps_are_skipped_then_stop_the_run(teachers, prompts, tmp_path, monkeypatch):
    import wadi.distill.objectives.base as t

    real = t.fake_score_loss
    calls = {"n": 0}

    def nan_after_first(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 1 else loss

    monkeypatch.setattr(t, "fake_score_loss", nan_after_first)
    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", max_steps=6, max_nonfinite_steps=3
    )
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row at step 4"):
        train(config)


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(teachers, prompts, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    config = tiny_config(teachers["sd-eps"], prompts, tmp_path / "run", optimizer="adamw8bit")
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("adapter", ["lorad", "lora"])
def test_include_conv_adapts_the_blocks_convolutions(adapter, teachers):
    from wadi import lorad
    from wadi.backbones import load_backbone
    from wadi.distill import Roles

    backbone = load_backbone(teachers["sd-eps"])
    roles = Roles(backbone, adapter, student_rank=2, fake_rank=2, include_conv=True)
    convs = [
        n for n, layer in lorad.lorad_layers(roles.base) if isinstance(layer, lorad.LoRaDConv2d)
    ]
    assert convs and all(n.startswith(("down_blocks", "mid_block", "up_blocks")) for n in convs)
    if adapter == "lora":
        peft_convs = [n for n, _ in roles.base.named_parameters() if "lora_A" in n and ".conv" in n]
        assert peft_convs


def test_final_pipeline_holds_the_ema_weights(teachers, prompts, tmp_path):
    import json

    from wadi.distill.export import export_checkpoint

    config = tiny_config(teachers["sd-eps"], prompts, tmp_path / "run", max_steps=3, ema_decay=0.5)
    result = train(config)
    assert json.loads((result.final_dir / "summary.json").read_text())["pipeline_weights"] == "ema"
    export_checkpoint(result.final_dir, tmp_path / "ema", use_ema=True)
    export_checkpoint(result.final_dir, tmp_path / "raw")
    unet = "unet/diffusion_pytorch_model.safetensors"
    final, ema, raw = (
        load_file(p / unet)
        for p in (result.final_dir / "pipeline", tmp_path / "ema", tmp_path / "raw")
    )
    assert all(torch.allclose(final[k], ema[k], rtol=0, atol=1e-6) for k in final)
    assert any(not torch.allclose(final[k], raw[k], rtol=0, atol=1e-6) for k in final)


def test_fake_updates_step_the_fake_score_k_times_per_iteration(
    teachers, prompts, tmp_path, monkeypatch
):
    from wadi.distill.optim import OptimizerStep

    calls = []
    real_step = OptimizerStep.step

    def counting_step(self, *args, **kwargs):
        calls.append(self.name)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(OptimizerStep, "step", counting_step)
    knobs = dict(max_steps=2, export_pipeline=False)
    one = train(tiny_config(teachers["sd-eps"], prompts, tmp_path / "one", **knobs))
    assert calls == ["student", "fake"] * 2
    calls.clear()
    three = train(
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "three", fake_updates=3, **knobs)
    )
    assert calls == ["student", "fake", "fake", "fake"] * 2
    # the first generator step sees the same (initial) fake score, so only the fake differs then;
    # after it the student follows a different fake score
    assert any(not torch.equal(one.fake_state[k], three.fake_state[k]) for k in one.fake_state)
    assert any(
        not torch.equal(one.student_state[k], three.student_state[k]) for k in one.student_state
    )


def test_fake_updates_below_one_is_a_clear_error(teachers, prompts, tmp_path):
    with pytest.raises(ValueError, match="fake_updates must be >= 1"):
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "x", fake_updates=0)


def test_full_scope_preset_trains_the_presets_layers_and_all_trains_everything(teachers):
    from torch import nn

    from wadi import lorad
    from wadi.backbones import load_backbone
    from wadi.distill import Roles

    lorad_roles = Roles(load_backbone(teachers["sd-eps"]), "lorad", student_rank=2, fake_rank=2)
    layers = {n for n, layer in lorad.lorad_layers(lorad_roles.base) if "student" in layer.lorad_A}
    preset = Roles(load_backbone(teachers["sd-eps"]), "full", fake_rank=2)
    assert preset.full_scope == "preset"
    trainable = {n for n, p in preset.student_copy.named_parameters() if p.requires_grad}
    assert {n.rpartition(".")[0] for n in trainable} == layers  # exactly the adapters' layers
    expected = sum(
        p.numel()
        for name, m in preset.student_copy.named_modules()
        if name in layers and isinstance(m, nn.Linear)
        for p in m.parameters()
    )
    counts = preset.parameter_counts()
    assert counts["student"] == expected < counts["base"]
    assert set(preset.student_named_state()) == trainable  # checkpoints hold just those
    everything = Roles(load_backbone(teachers["sd-eps"]), "full", fake_rank=2, full_scope="all")
    assert everything.parameter_counts()["student"] == counts["base"]


def test_start_summary_share_warning_and_checkpoint_lines(teachers, prompts, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    config = tiny_config(
        teachers["sd-eps"], prompts, out, max_steps=2, checkpoint_every=1, export_pipeline=False,
        resolution=None, student_rank=64, progress=True,
    )  # fmt: skip
    train(config)
    err = capsys.readouterr().err
    assert "warning: the lorad student trains 148,992 parameters, 74% of the base's 200,644" in err
    assert "lower --student-rank (now 64)" in err
    for row in ("device", "teacher", "resolution  16 px (latent 8x8)", "2 per process, 2 in all"):
        assert row in err, row
    assert "fake score  lorad: 3,728 (1.86% of the base's 200,644) trainable" in err
    assert f"output      {out}" in err and "steps       0 -> 2 (from scratch)" in err
    assert f"checkpoint of step 1 in {out / 'checkpoints' / 'step-000001'}" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["resolution"] == 16
    train(config.replace(progress=False, max_steps=3), resume="latest")
    assert "device" not in capsys.readouterr().err  # quiet: no summary, no checkpoint lines


def test_share_warning_only_for_rank_adapters():
    from wadi.distill import DistillConfig
    from wadi.distill.report import share_warning

    counts = {"base": 100, "student": 51, "fake": 1}
    assert "51%" in share_warning(DistillConfig(student_rank=9), counts)
    assert share_warning(DistillConfig(), {**counts, "student": 50}) is None
    assert share_warning(DistillConfig(adapter="full"), counts) is None


def test_full_scope_all_run_exports(teachers, prompts, tmp_path):
    from wadi.distill.export import export_checkpoint

    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", adapter="full", full_scope="all",
        max_steps=1, export_pipeline=False, device="cpu",
    )  # fmt: skip
    result = train(config)
    assert len(_student(result)) == len(list(result.student_state))
    export_checkpoint(result.final_dir, tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet").is_dir()
