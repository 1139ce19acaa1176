"""The run folder: one run at a time (lock), resuming it from its folder alone, damaged
checkpoints, places that cannot be written, interrupting."""

import errno
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from wadi.cli import main
from wadi.distill import checkpoint as ckpt
from wadi.distill import train
from wadi.distill.run_dir import LOCK_NAME, RunLock

from .conftest import tiny_config

KNOBS = dict(max_steps=4, checkpoint_every=2, export_pipeline=False)


def _write_lock(out, pid):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def _last_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# -- lock ------------------------------------------------------------------------------------------


def test_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match=rf"in use by another wadi run \(pid {os.getpid()} on"):
            RunLock(out).acquire()
        assert (out / LOCK_NAME).is_file()  # the refused one did not take it away
    assert not (out / LOCK_NAME).exists()


def test_second_run_into_a_held_folder_is_one_line(teachers, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(out, holder.pid)
        code = main(
            ["distill", "--teacher", str(teachers["sd-eps"]), "--prompts", str(prompts)]
            + ["--output-dir", str(out), "--max-steps", "1", "--resolution", "16"]
        )
        line = _last_line(capsys)
        assert code == 2 and f"pid {holder.pid} on {socket.gethostname()}" in line, line
        assert line.startswith("wadi distill: error:") and str(out / LOCK_NAME) in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_reclaimed(teachers, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, dead.pid)
    result = train(tiny_config(teachers["sd-eps"], prompts, out, max_steps=1, **_no_export()))
    assert result.steps == 1
    assert f"reclaiming {out / LOCK_NAME} left by pid {dead.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_failed_start_leaves_no_folder_and_no_lock(teachers, prompts, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="resolution 15 must be a positive multiple"):
        train(tiny_config(teachers["sd-eps"], prompts, out, resolution=15))
    assert not (tmp_path / "new").exists()


def _no_export():
    return dict(export_pipeline=False)


# -- resuming from the run folder ------------------------------------------------------------------


def test_resume_from_the_folder_alone_from_anywhere_after_a_move(
    teachers, prompts, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(prompts, work / "prompts.txt")
    monkeypatch.chdir(work)
    # relative paths, as a user types them
    assert (
        main(
            ["distill", "--teacher", os.path.relpath(teachers["sd-eps"]), "--prompts"]
            + ["prompts.txt", "--output-dir", "run", "--max-steps", "2", "--checkpoint-every"]
            + ["1", "--student-rank", "4", "--fake-rank", "2", "--batch-size", "2", "--no-export"]
            + ["--no-progress"]
        )
        == 0
    )
    saved = json.dumps(ckpt_config(work / "run"))
    assert str(work / "prompts.txt") in saved  # written absolute
    assert ckpt_config(work / "run")["resolution"] == 16  # the teacher's own size, recorded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for spelling, steps in [(str(work / "run") + "/", 3), (os.path.relpath(work / "run"), 4)]:
        args = ["distill", "--output-dir", spelling, "--resume", "latest", "--max-steps"]
        assert main([*args, str(steps), "--no-progress"]) == 0
        assert ckpt.list_checkpoints(work / "run")[-1].name == f"step-{steps:06d}"
    moved = tmp_path / "moved"
    shutil.move(work / "run", moved)
    monkeypatch.chdir(tmp_path)
    assert (
        main(["distill", "--output-dir", "./moved", "--resume", "latest", "--max-steps", "5"]) == 0
    )
    assert ckpt.read_state(ckpt.list_checkpoints(moved)[-1])["step"] == 5


def ckpt_config(out):
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())


def test_resume_without_a_run_is_one_line(tmp_path, capsys):
    assert main(["distill", "--output-dir", str(tmp_path / "none"), "--resume", "latest"]) == 2
    assert "holds no wadi run (no config.yaml)" in _last_line(capsys)


def test_resuming_a_finished_run_reports_no_speed(teachers, prompts, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(teachers["sd-eps"], prompts, out, **KNOBS))
    assert first.steps_run == 4 and first.seconds_per_step > 0
    again = train(tiny_config(teachers["sd-eps"], prompts, out, **KNOBS), resume="latest")
    assert again.steps == 4 and again.steps_run == 0 and math.isnan(again.seconds_per_step)


# -- damaged checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na dog\na red car\n")
    out = root / "run"
    train(tiny_config(teachers["sd-eps"], prompts, out, **KNOBS))
    return out


def _truncate(step):
    path = step / "student.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _garbage_state(step):
    (step / "state.json").write_text("{not json")


def _no_state(step):
    (step / "state.json").unlink()


def _no_manifest(step):
    (step / ckpt.MANIFEST).unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, "student.safetensors has 100 bytes"),
        (_no_state, "state.json missing"),
        (_garbage_state, "state.json"),
        (_no_manifest, "manifest.json missing"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_complete(
    damage, reason, finished_run, teachers, tmp_path, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)  # a copied run folder is the same run
    damage(out / "checkpoints" / "step-000004")
    config = ckpt_config(out)
    config["output_dir"] = str(out)
    from wadi.distill import DistillConfig

    with pytest.raises(ValueError, match=rf"step-000004 is damaged \({reason}.*--resume latest"):
        train(DistillConfig.from_dict(config), resume="step-4")
    capsys.readouterr()
    result = train(DistillConfig.from_dict(config), resume="latest")
    err = capsys.readouterr().err
    assert result.steps == 4 and result.steps_run == 2  # from step 2
    assert "step-000004 is damaged" in err and reason in err
    assert "resuming from step-000002" in err
    assert ckpt.verify(out / "checkpoints" / "step-000004") is None  # rewritten whole


def test_no_complete_checkpoint_is_one_line(finished_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    for step in ckpt.step_folders(out):
        _truncate(step)
    with pytest.raises(ValueError, match="no complete checkpoint .* --overwrite"):
        ckpt.resolve_resume(out, "latest")


def test_checkpoint_manifest_covers_every_file(finished_run):
    step = ckpt.list_checkpoints(finished_run)[-1]
    files = json.loads((step / ckpt.MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {ckpt.MANIFEST} and "fake_adapter/adapter_config.json" in files


# -- places that cannot be written ------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_one(teachers, prompts, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out, message in [(blocker, "is a file, not a folder"), (blocker / "run", "is a file")]:
        code = main(
            ["distill", "--teacher", str(teachers["sd-eps"]), "--prompts", str(prompts)]
            + ["--output-dir", str(out), "--max-steps", "1"]
        )
        line = _last_line(capsys)
        assert code == 2 and message in line and str(blocker) in line, line
    assert blocker.read_text() == "keep me"


def test_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_partial(
    teachers, prompts, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    real = ckpt.save_tensors

    def full_at_step_4(tensors, path):
        if ".tmp-step-000004" in str(path) and "optimizer" in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", full_at_step_4)
    config = tiny_config(teachers["sd-eps"], prompts, out, **KNOBS)
    with pytest.raises(ValueError, match=r"cannot write .*No space left on device; free some"):
        train(config)
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert ckpt.verify(out / "checkpoints" / "step-000002") is None
    assert not (out / LOCK_NAME).exists()
    assert train(config, resume="latest").steps == 4


# -- interrupting ---------------------------------------------------------------------------------


def test_interrupt_prints_the_resume_command_that_works(
    teachers, prompts, tmp_path, monkeypatch, capsys
):
    from wadi.distill.iteration import WaDiIteration

    out = tmp_path / "run"
    real = WaDiIteration.__call__
    calls = {"n": 0}

    def interrupted_at_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(WaDiIteration, "__call__", interrupted_at_third)
    tiny_config(teachers["sd-eps"], prompts, out, **KNOBS).save(tmp_path / "c.yaml")
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 130
    err = capsys.readouterr().err
    command = f"wadi distill --output-dir {shlex.quote(str(out))} --resume latest"
    assert command in err
    assert not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0
    assert ckpt.read_state(ckpt.list_checkpoints(out)[-1])["step"] == 4


def test_cuda_device_on_a_machine_without_one_is_one_line(
    teachers, prompts, tmp_path, monkeypatch, capsys
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    code = main(
        ["distill", "--teacher", str(teachers["sd-eps"]), "--prompts", str(prompts)]
        + ["--output-dir", str(out), "--device", "cuda"]
    )
    line = _last_line(capsys)
    assert code == 2 and "CUDA is not available on this machine; use --device cpu" in line
    assert not out.exists()
