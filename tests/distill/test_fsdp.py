"""``--fsdp`` on two CPU processes (gloo): the frozen base sharded per block with FSDP2.

One launch runs, in one process group: the plain 2-process run, the same run with the
base sharded, a resumption of the sharded run's checkpoint without sharding, and a
measurement of each process's parameter bytes after sharding.  The pytest process then
compares what each process saved.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from wadi.distill.plan import plan_run

from .conftest import tiny_config

SCRIPT = textwrap.dedent(
    """
    import json
    import shutil
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from wadi.distill import DistillConfig, train
    from wadi.distill.fsdp import shard_bytes
    from wadi.distill.run import build_run

    tmp = Path(sys.argv[1])
    rank, world = None, None

    def save(result, name):
        tensors = {**result.student_state, **{"fake." + k: v for k, v in result.fake_state.items()}}
        path = tmp / f"{name}-rank{dist.get_rank()}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)

    plain = DistillConfig.load(tmp / "run.yaml")
    save(train(plain), "plain")
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = plain.replace(output_dir=str(tmp / "run-fsdp"), fsdp=True)
    save(train(sharded), "fsdp")

    # the sharded run's step-2 checkpoint, resumed without --fsdp
    if rank == 0:
        shutil.copytree(tmp / "run-fsdp", tmp / "run-resume")
        shutil.rmtree(tmp / "run-resume" / "final")
        shutil.rmtree(tmp / "run-resume" / "checkpoints" / "step-000002")
    dist.barrier()
    resumed = plain.replace(output_dir=str(tmp / "run-resume"))
    save(train(resumed, resume="step-000001"), "resumed")

    # what each process holds once the base is sharded
    run, _ = build_run(
        plain.replace(output_dir=str(tmp / "run-bytes"), fsdp=True),
        torch.device("cpu"), rank, world, None, True,
    )
    measured = shard_bytes(run.roles.base)
    trained = sum(p.numel() * p.element_size() for p in run.roles.base.parameters() if p.requires_grad)
    measured["trained"] = trained
    measured["dtensors"] = sum(
        type(p).__name__ == "DTensor" for p in run.roles.base.parameters()
    )
    (tmp / f"bytes-rank{rank}.json").write_text(json.dumps(measured))
    """
)


def _launch(tmp_path, port, *args):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate launcher not installed beside this python"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(tmp_path / "job.py"), str(tmp_path), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fsdp_job(teachers, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red car\na blue house\na green tree\n")
    # adam_eps above the gradients' size keeps AdamW's step linear in the gradient, so
    # float rounding (backward sums in another order under FSDP) is not amplified by
    # g / sqrt(v) ~ sign(g) where g is near zero; default eps: 1 % on the smallest A
    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", max_steps=2, checkpoint_every=1,
        adam_eps=1e-3, validation_prompts=["a cat"], validate_every=2,
    )  # fmt: skip
    config.save(tmp_path / "run.yaml")
    (tmp_path / "job.py").write_text(SCRIPT)
    proc = _launch(tmp_path, 29547)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return tmp_path, config


def _adapters(tmp_path, name):
    return [load_file(tmp_path / f"{name}-rank{r}.safetensors") for r in (0, 1)]


def _max_diff(a, b):
    """The largest difference of two tensor dicts, relative to each tensor's largest entry."""
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


def test_sharded_run_ends_with_the_unsharded_adapters(fsdp_job):
    tmp_path, _ = fsdp_job
    plain, sharded = _adapters(tmp_path, "plain"), _adapters(tmp_path, "fsdp")
    for r in (0, 1):
        assert _max_diff(plain[r], sharded[r]) < 1e-5
    print(
        f"FSDP vs unsharded adapters: max relative difference {_max_diff(plain[0], sharded[0]):.2e}"
    )
    assert all(torch.equal(sharded[0][k], sharded[1][k]) for k in sharded[0])
    moved = sum(float(v.abs().sum()) for k, v in sharded[0].items() if k.endswith("lorad_A"))
    assert moved > 0  # training changed the adapters (A starts at zero)
    # the checkpoint holds the adapters only, as whole tensors, the same files as unsharded
    step = "checkpoints/step-000001"
    for name in ("student.safetensors", "fake_adapter/adapter_model.safetensors"):
        a = load_file(tmp_path / "run" / step / name)
        b = load_file(tmp_path / "run-fsdp" / step / name)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert _max_diff(a, b) < 1e-5
    listing = sorted(p.name for p in (tmp_path / "run-fsdp" / step).iterdir())
    assert listing == sorted(p.name for p in (tmp_path / "run" / step).iterdir())
    # final/pipeline: merged into a whole denoiser loaded again, as the unsharded run's
    weights = "final/pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "run" / weights), load_file(tmp_path / "run-fsdp" / weights)
    assert _max_diff(a, b) < 1e-5 and not any("lorad" in k for k in b)
    # validation samples: every process ran the sharded student, the main process wrote
    assert (tmp_path / "run-fsdp" / "samples" / "step-000002.png").is_file()


def test_sharded_checkpoint_resumes_without_fsdp(fsdp_job):
    tmp_path, _ = fsdp_job
    plain, resumed = _adapters(tmp_path, "plain"), _adapters(tmp_path, "resumed")
    for r in (0, 1):
        assert _max_diff(plain[r], resumed[r]) < 1e-5
    print(
        f"resumed without FSDP vs unsharded: max relative difference {_max_diff(plain[0], resumed[0]):.2e}"
    )


def test_each_process_holds_half_the_base(fsdp_job):
    tmp_path, config = fsdp_job
    measured = [json.loads((tmp_path / f"bytes-rank{r}.json").read_text()) for r in (0, 1)]
    plan = plan_run(config)  # fp32 run: the plan's frozen denoiser bytes, unsharded
    for m in measured:
        assert m["dtensors"] > 0
        assert m["whole"] == m["trained"]  # only the trained adapters are whole tensors
        assert m["trained"] == plan.student + plan.fake
        # half, up to FSDP2's padding of dim 0 to a multiple of 2 (last rank: a bit less)
        assert 0.45 * plan.denoiser < m["sharded"] <= 0.55 * plan.denoiser
    assert measured[0]["sharded"] + measured[1]["sharded"] == plan.denoiser
    # the dry-run plan's figure for 2 processes is what the largest shard holds
    assert plan.sharded_denoiser(2) == max(m["sharded"] for m in measured)
    print(
        f"frozen denoiser {plan.denoiser} B unsharded; per process "
        f"{[m['sharded'] for m in measured]} B sharded + {measured[0]['whole']} B adapters whole"
    )


def test_fsdp_needs_several_processes(teachers, prompts, tmp_path):
    from wadi.distill import train

    config = tiny_config(teachers["sd-eps"], prompts, tmp_path / "run", fsdp=True)
    with pytest.raises(ValueError, match="1 process") as err:
        train(config)
    assert "\n" not in str(err.value) and "--num_processes" in str(err.value)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(adapter="full"), "--adapter full"),
        (dict(compile=True), "--compile"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(teachers, prompts, tmp_path, changes, words):
    with pytest.raises(ValueError, match=words) as err:
        tiny_config(teachers["sd-eps"], prompts, tmp_path / "run", fsdp=True, **changes)
    assert "\n" not in str(err.value)


def test_a_backend_that_cannot_all_gather_is_one_line(monkeypatch):
    """Only gloo exists on this CPU build, and it all-gathers: the failing call is simulated
    with the error gloo gives for a device it has no backend for."""
    import torch.distributed as dist

    from wadi.distill import fsdp

    def refuse(out, tensor):
        raise RuntimeError("No backend type associated with device type cuda\nmore detail")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_gather_into_tensor", refuse)
    with pytest.raises(ValueError) as err:
        fsdp.check_process_group(2, torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and "'gloo'" in message and "nccl on GPUs" in message
    assert "No backend type associated" in message


PAIRS = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import save_file

    from wadi.distill import DistillConfig, train

    tmp = Path(sys.argv[1])
    base = DistillConfig.load(tmp / "run.yaml")
    for variant, changes in json.loads(sys.argv[2]).items():
        for fsdp in (False, True):
            name = f"{variant}-{'fsdp' if fsdp else 'plain'}"
            config = base.replace(output_dir=str(tmp / name), fsdp=fsdp, **changes)
            result = train(config)
            tensors = {**result.student_state, **{"fake." + k: v for k, v in result.fake_state.items()}}
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"{name}-rank{dist.get_rank()}.safetensors")
    """
)


@pytest.mark.slow
def test_sharded_bf16_base_and_checkpointing_match(teachers, prompts, tmp_path):
    """Activation checkpointing (each block's forward recomputed inside its sharded
    backward) agrees at fp32 tolerance; a bf16 base (the fp32 adapters beside it, ignored
    by FSDP) differs from its unsharded run by bf16 rounding (backward sums in another
    order), a thousandth of what bf16 changes against fp32."""
    config = tiny_config(
        teachers["sd-eps"], prompts, tmp_path / "run", max_steps=2, export_pipeline=False,
        adam_eps=1e-3,
    )  # fmt: skip
    config.save(tmp_path / "run.yaml")
    (tmp_path / "job.py").write_text(PAIRS)
    variants = {
        "fp32": {},
        "ckpt": {"gradient_checkpointing": True},
        "bf16": {"mixed_precision": "bf16"},
    }
    launcher = _launch(tmp_path, 29549, json.dumps(variants))
    assert launcher.returncode == 0, launcher.stdout[-3000:] + launcher.stderr[-8000:]
    got = {v: {k: _adapters(tmp_path, f"{v}-{k}")[0] for k in ("plain", "fsdp")} for v in variants}
    assert all(t.dtype == torch.float32 for t in got["bf16"]["fsdp"].values())
    ckpt = _max_diff(got["ckpt"]["plain"], got["ckpt"]["fsdp"])
    bf16 = _max_diff(got["bf16"]["plain"], got["bf16"]["fsdp"])
    bf16_vs_fp32 = _max_diff(got["fp32"]["plain"], got["bf16"]["plain"])
    print(
        f"FSDP vs unsharded, max relative difference: checkpointing {ckpt:.2e}, bf16 base "
        f"{bf16:.2e} (bf16 vs fp32 unsharded: {bf16_vs_fp32:.2e})"
    )
    assert ckpt < 1e-5
    assert bf16 < 0.1 and bf16 < 1e-3 * bf16_vs_fp32  # measured: 3e-2, 1e-4 of it


def test_plan_pads_dim0_as_fsdp2_does():
    """FSDP2 splits dim 0 like torch.chunk: ceil(d0 / N) rows on the first process."""
    from wadi.distill.plan import MemoryPlan

    rows = ((5, 3), (2, 1), (1, 4))  # 15 + 2 + 4 elements, fp32
    plan = MemoryPlan(84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 21, denoiser_rows=rows)
    assert plan.sharded_denoiser(1) == 84
    assert plan.sharded_denoiser(2) == 4 * (3 * 3 + 1 * 1 + 1 * 4)
    assert plan.sharded_denoiser(4) == 4 * (2 * 3 + 1 * 1 + 1 * 4)
    chunks = [torch.empty(d0, rest).chunk(2)[0].numel() for d0, rest in rows]
    assert plan.sharded_denoiser(2) == 4 * sum(chunks)
