"""Resume and 2-process sync on the SDXL, SD3 and FLUX backbones (tiny teachers).

The default run keeps one cheap in-process resume per backbone; the SIGKILL + resume
and 2-process tests of test_resume.py / test_multiprocess.py, per backbone, are slow.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from wadi.distill import train
from wadi.testing import make_tiny_flux, make_tiny_sd3, make_tiny_sdxl

from .conftest import tiny_config
from .test_multiprocess import SCRIPT
from .test_resume import _cli, _final_tensors

KINDS = ["sdxl", "sd3", "flux"]
#: small adapters (the tiny bases are smaller than the presets' ranks)
KNOBS = dict(student_rank=2, fake_rank=2, export_pipeline=False, seed=3)


@pytest.fixture(scope="module")
def new_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "sdxl": make_tiny_sdxl(root / "sdxl"),
        "sd3": make_tiny_sd3(root / "sd3"),
        "flux": make_tiny_flux(root / "flux"),  # FLUX.1-dev-like: guidance embedding
    }


def _states(result):
    return {**result.student_state, **{f"fake.{k}": v for k, v in result.fake_state.items()}}


def _assert_bitwise(a, b):
    assert a.keys() == b.keys() and a
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}"


@pytest.mark.parametrize("kind", KINDS)
def test_resume_in_process_is_bitwise_equal(new_teachers, prompts, tmp_path, kind):
    """2 steps straight == 1 step, checkpoint, resume, 1 more step (adapters, Adam, RNG)."""
    teacher = new_teachers[kind]
    knobs = dict(KNOBS, max_steps=2, checkpoint_every=1)
    straight = train(tiny_config(teacher, prompts, tmp_path / "straight", **knobs))
    train(tiny_config(teacher, prompts, tmp_path / "split", **{**knobs, "max_steps": 1}))
    resumed = train(tiny_config(teacher, prompts, tmp_path / "split", **knobs), resume="latest")
    assert straight.steps == resumed.steps == 2
    _assert_bitwise(_states(straight), _states(resumed))
    # the second step changed the student (the comparison is not of untouched adapters)
    first = load_file(tmp_path / "split" / "checkpoints" / "step-000001" / "student.safetensors")
    assert first.keys() == straight.student_state.keys()
    assert any(not torch.equal(v, straight.student_state[k]) for k, v in first.items())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_then_resume_is_bitwise_equal(new_teachers, prompts, tmp_path, kind):
    knobs = dict(KNOBS, max_steps=4, checkpoint_every=2, ema_decay=0.9)
    for name in ("straight", "killed"):
        config = tiny_config(new_teachers[kind], prompts, tmp_path / name, **knobs)
        config.save(tmp_path / f"{name}.yaml")
    proc = _cli(tmp_path / "killed.yaml")
    deadline = time.time() + 400
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
    _assert_bitwise(_final_tensors(tmp_path / "straight"), _final_tensors(tmp_path / "killed"))
    ema = [load_file(tmp_path / n / "final" / "ema.safetensors") for n in ("straight", "killed")]
    _assert_bitwise(*ema)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_stay_in_sync(new_teachers, prompts, tmp_path, kind):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate launcher not installed beside this python"
    config = tiny_config(new_teachers[kind], prompts, tmp_path / "run", **KNOBS, max_steps=3)
    config.save(tmp_path / "run.yaml")
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    port = str(29540 + KINDS.index(kind))
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
        str(tmp_path / "job.py"), str(tmp_path / "run.yaml"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    _assert_bitwise(*ranks)
    for prefix in ("", "fake."):
        changed = sum(
            v.abs().sum()
            for k, v in ranks[0].items()
            if k.startswith(prefix) and k.endswith("lorad_A")
        )
        assert changed > 0, f"{prefix or 'student'} adapter unchanged"
    step_dir = tmp_path / "run" / "checkpoints" / "step-000002"
    rng = [load_file(step_dir / f"rng-rank{r}.safetensors")["generator"] for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])
