import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wadi.toy.demo import GENERATORS, DemoConfig, format_table, run_demo


def test_short_demo_writes_report_and_grid(tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(
        out_dir=str(out), steps=2, samples=20, batch_size=2, teacher_steps=3, progress=False
    )
    report = run_demo(cfg)
    saved = json.loads((out / "report.json").read_text())
    assert saved["generators"].keys() == set(GENERATORS)
    for name in GENERATORS:
        m = saved["generators"][name]
        assert {"fd", "accuracy", "nfe", "ms_per_image"} <= set(m)
        assert np.isfinite(m["fd"]) and m["fd"] >= 0 and 0 <= m["accuracy"] <= 1
        assert m["ms_per_image"] > 0
    assert saved["generators"]["teacher_multistep"]["nfe"] == 6  # 3 steps x (cond + null)
    assert saved["generators"]["student_onestep"]["nfe"] == 1
    assert saved["config"]["demo"]["steps"] == 2 and saved["wall_seconds"] > 0
    # the 25-step baseline uses the VSD guidance unless told otherwise; real digits give the floor
    assert saved["reference"]["teacher_guidance"] == cfg.vsd_guidance
    real = saved["reference"]["real_train"]
    assert real["samples"] == 20 and real["accuracy"] >= 0.9
    assert np.isfinite(real["fd"]) and real["fd"] >= 0
    grid = Image.open(out / "grid.png")
    assert grid.format == "PNG" and grid.size[1] == 4 * 66 + 2  # real + three generators
    assert "student_onestep" in format_table(report)
    # FD from 20 samples gets the caveat; the saved run config points at the final folder
    assert "biased upward" in saved["fd_note"] and "20 samples" in saved["fd_note"]
    assert saved["distill"]["final_dir"] == str(out / "run" / "final")
    run_config = (out / "run" / "config.yaml").read_text()
    assert str(out / "run") in run_config and ".tmp" not in run_config
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary leftovers


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("wadi demo: error: "), err
    return err


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    from wadi.cli import main

    target = tmp_path / "results"
    target.write_text("precious")
    assert main(["demo", "--out", str(target), "--steps", "1", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert str(target) in err and "is a file" in err
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_demo_refuses_a_folder_with_other_files(tmp_path, capsys):
    from wadi.cli import main

    (tmp_path / "thesis.tex").write_text("keep")
    assert main(["demo", "--out", str(tmp_path), "--steps", "1", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert "thesis.tex" in err and "choose a new or empty folder" in err
    assert (tmp_path / "thesis.tex").read_text() == "keep"


def test_demo_under_a_file_is_one_line_naming_it(tmp_path, capsys):
    from wadi.cli import main

    blocker = tmp_path / "notes"
    blocker.write_text("keep")
    out = blocker / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and f"{blocker} is a file" in err
    assert blocker.read_text() == "keep"


def test_full_disk_midway_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import wadi.distill
    from wadi.cli import main

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("previous")

    def fills_the_disk(config, **kwargs):
        run = Path(config.output_dir)
        run.mkdir(parents=True)
        (run / "half.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wadi.distill, "train", fills_the_disk)
    assert main(["demo", "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and "disk is full" in err
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert (out / "report.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores chmod")
def test_demo_in_a_read_only_folder_is_one_line(tmp_path, capsys):
    from wadi.cli import main

    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / "demo"
        assert main(["demo", "--out", str(out), "--steps", "1", "--no-progress"]) == 2
        err = _one_line(capsys)
        assert f"cannot write {out}" in err and "permission" in err
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_demo_command_is_quiet_but_keeps_its_own_bar(tmp_path):
    """Run as a user would: no diffusers/transformers bars or torchvision notes, wadi's bar
    and the small-sample FD note shown."""
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["demo", "--out", str(out), "--steps", "2", "--samples", "10", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "wadi.cli", *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wadi distill" in proc.stderr  # wadi's own progress bar
    for noise in ("Loading weights", "Writing model shards", "requires torchvision"):
        assert noise not in proc.stderr, noise
    assert "note: FD from only 10 samples" in proc.stdout and "biased upward" in proc.stdout


def test_read_only_file_system_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    """The read-only case where chmod cannot make one (running as root): EROFS on create."""
    import errno
    import tempfile

    import wadi.distill
    from wadi.cli import main

    real = tempfile.mkdtemp
    ro = tmp_path / "mounted"
    ro.mkdir()

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the output cannot be written")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(wadi.distill, "train", no_training)
    out = ro / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and "read-only" in err
    assert list(ro.iterdir()) == []


def test_demo_with_a_relative_out_as_make_demo_runs_it(tmp_path, monkeypatch):
    """`make demo` passes the default relative folder; the run inside stores absolute paths."""
    monkeypatch.chdir(tmp_path)
    cfg = DemoConfig(
        out_dir="demo-output", steps=1, samples=20, batch_size=2, teacher_steps=2, progress=False
    )
    run_demo(cfg)
    assert (tmp_path / "demo-output" / "report.json").is_file()
    assert (tmp_path / "demo-output" / "run" / "final" / "pipeline").is_dir()


def test_demo_teacher_option_reaches_the_run_config(tmp_path):
    """--teacher swaps the distilled and evaluated teacher; the default is the shipped one."""
    from wadi.toy import TEACHER_DIR
    from wadi.toy.demo import DemoConfig, distill_config

    prompts = tmp_path / "p.txt"
    assert distill_config(DemoConfig(), prompts).teacher == str(TEACHER_DIR)
    other = DemoConfig(teacher=str(tmp_path / "mine"))
    assert other.teacher_dir == tmp_path / "mine"
    assert distill_config(other, prompts).teacher == str(tmp_path / "mine")


def test_demo_with_a_missing_teacher_is_one_line_naming_it(tmp_path, capsys):
    from wadi.cli import main

    out = tmp_path / "out"
    args = ["demo", "--teacher", str(tmp_path / "nope"), "--out", str(out), "--steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"teacher folder {tmp_path / 'nope'} not found" in err
    assert not out.exists()
