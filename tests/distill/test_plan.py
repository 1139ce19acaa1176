"""The --dry-run memory plan equals what a real run holds (weights, adapters, optimizer)."""

import torch

from wadi.cli import main
from wadi.distill.plan import plan_run
from wadi.distill.run import build_run

from .conftest import tiny_config


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_plan_matches_the_loaded_run(teachers, prompts, tmp_path):
    config = tiny_config(teachers["sd-eps"], prompts, tmp_path / "run", ema_decay=0.9)
    plan = plan_run(config)
    run, config = build_run(config, torch.device("cpu"), 0, 1, None, False)
    b = run.backbone
    assert plan.denoiser == _bytes(p for n, p in b.denoiser.named_parameters() if "lora" not in n)
    assert plan.text_encoders == _bytes(b.text_encoder.parameters())
    assert plan.vae == _bytes(b.vae.parameters())
    assert plan.student_params == run.counts["student"]
    assert plan.fake_params == run.counts["fake"]
    assert plan.ema == _bytes(run.ema.tensors.values())
    # one iteration creates the optimizer moments the plan counts
    cond = run.data.get([0, 1])
    run.iteration(cond, run.null_cond, run.shape, run.rng, 0)
    moments = [
        v
        for opt in run.optimizers.values()
        for state in opt.optimizer.state.values()
        for k, v in state.items()
        if k in ("exp_avg", "exp_avg_sq")
    ]
    assert plan.optimizer == _bytes(moments)
    assert plan.total(2) < plan.total()


def test_dry_run_prints_the_plan_and_touches_nothing(teachers, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["distill", "--teacher", str(teachers["sd-eps"]), "--prompts", str(prompts),
         "--output-dir", str(out), "--mixed-precision", "bf16", "--dry-run"]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "frozen denoiser" in text and "optimizer moments" in text and "sharded over 8" in text
    assert not out.exists()
