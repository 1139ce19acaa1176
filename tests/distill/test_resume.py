"""Resume: a SIGKILLed run continues bit for bit; a crash while writing a checkpoint loses nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from wadi.distill import checkpoint as ckpt
from wadi.distill import train

from .conftest import tiny_config


def _cli(config, *extra):
    args = [sys.executable, "-m", "wadi.cli", "distill", "--config", str(config), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _final_tensors(out):
    tensors = load_file(out / "final" / "student.safetensors")
    tensors.update(
        {
            f"fake.{k}": v
            for k, v in load_file(
                out / "final" / "fake_adapter" / "adapter_model.safetensors"
            ).items()
        }
    )
    return tensors


def test_sigkill_then_resume_is_bitwise_equal(teachers, prompts, tmp_path):
    knobs = dict(max_steps=6, checkpoint_every=2, export_pipeline=False, ema_decay=0.9, seed=3)
    straight = tiny_config(teachers["sd-eps"], prompts, tmp_path / "straight", **knobs)
    straight.save(tmp_path / "straight.yaml")
    killed = tiny_config(teachers["sd-eps"], prompts, tmp_path / "killed", **knobs)
    killed.save(tmp_path / "killed.yaml")

    proc = _cli(tmp_path / "killed.yaml")
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoints" / "step-000002").is_dir():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()

    assert _cli(tmp_path / "straight.yaml").wait() == 0
    resumed = _cli(tmp_path / "killed.yaml", "--resume", "latest")
    output = resumed.communicate()[0].decode()
    assert resumed.returncode == 0, output

    a, b = _final_tensors(tmp_path / "straight"), _final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(tmp_path / "straight" / "final" / "ema.safetensors")
    ema_b = load_file(tmp_path / "killed" / "final" / "ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_crash_while_writing_checkpoint_keeps_previous(teachers, prompts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = tiny_config(
        teachers["sd-eps"], prompts, out, max_steps=4, checkpoint_every=2, export_pipeline=False
    )
    real_write_json = ckpt.write_json

    def crash_on_second_state(data, path):
        if path.name == "state.json" and data["step"] == 4:
            raise OSError("simulated crash during checkpoint write")
        real_write_json(data, path)

    monkeypatch.setattr(ckpt, "write_json", crash_on_second_state)
    with pytest.raises(OSError, match="simulated crash"):
        train(config)
    monkeypatch.undo()
    # the half-written checkpoint is not listed; the previous one is the latest and loads
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]
    assert ckpt.resolve_resume(out, "latest").name == "step-000002"
    result = train(config, resume="latest")
    assert result.steps == 4
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002", "step-000004"]


def test_resume_with_changed_recipe_is_refused(teachers, prompts, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(teachers["sd-eps"], prompts, out, max_steps=2, export_pipeline=False))
    with pytest.raises(ValueError, match=r"different config \(lr_fake\)"):
        train(
            tiny_config(teachers["sd-eps"], prompts, out, max_steps=4, lr_fake=0.5), resume="latest"
        )
    # a longer run of the same recipe resumes
    result = train(
        tiny_config(teachers["sd-eps"], prompts, out, max_steps=3, export_pipeline=False),
        resume="latest",
    )
    assert result.steps == 3 and len(result.history) == 1
