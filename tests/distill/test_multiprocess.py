"""Two CPU processes (gloo): adapters identical on both ranks and changed by training."""

import os
import shutil
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from .conftest import tiny_config

SCRIPT = textwrap.dedent(
    """
    import sys

    import torch.distributed as dist
    from safetensors.torch import save_file

    from wadi.distill import DistillConfig, train

    result = train(DistillConfig.load(sys.argv[1]))
    assert dist.get_world_size() == 2
    tensors = {**result.student_state, **{"fake." + k: v for k, v in result.fake_state.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{sys.argv[2]}/rank{dist.get_rank()}.safetensors")
    """
)


def test_two_processes_stay_in_sync(teachers, prompts, tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate launcher not installed beside this python"
    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", max_steps=3, export_pipeline=False
    )
    config.save(tmp_path / "run.yaml")
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        str(tmp_path / "job.py"), str(tmp_path / "run.yaml"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    for prefix in ("", "fake."):
        changed = sum(
            v.abs().sum()
            for k, v in ranks[0].items()
            if k.startswith(prefix) and k.endswith("lorad_A")
        )
        assert changed > 0, f"{prefix or 'student'} adapter unchanged"
    # each process keeps its own noise stream, saved in the checkpoint
    step_dir = tmp_path / "run" / "checkpoints" / "step-000002"
    rng = [load_file(step_dir / f"rng-rank{r}.safetensors")["generator"] for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])
