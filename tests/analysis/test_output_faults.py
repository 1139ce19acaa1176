"""`wadi analyze` output faults: swaps copy (never hard-link), ordinary modes, one-line errors
for a file in the way, a read-only folder or a full disk, and nothing partial left behind."""

import errno
import os
import shutil
import stat

import pytest

from wadi.cli import main

QUICK = ["--quiet", "--no-svd"]


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _pipeline(tmp_path, student_dir):
    pipe = tmp_path / "pipe"
    shutil.copytree(student_dir, pipe / "unet")
    (pipe / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    (pipe / "text_encoder").mkdir()
    (pipe / "text_encoder" / "config.json").write_text('{"hidden_size": 8}')
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text("{}")
    return pipe


def test_swap_copies_the_other_files_never_hard_links(tmp_path, teacher_dir, student_dir):
    pipe = _pipeline(tmp_path, student_dir)
    private = pipe / "text_encoder" / "config.json"
    private.chmod(0o600)  # a private source file still gives an ordinary copy
    out = tmp_path / "out"
    args = ["analyze", str(teacher_dir), str(pipe), "--out", str(out), "--swap", "norm"]
    assert main(args + QUICK + ["--no-plots"]) == 0
    swapped = out / "swap-norm"
    for rel in ("model_index.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        src, dst = pipe / rel, swapped / rel
        assert src.stat().st_nlink == 1 and dst.stat().st_nlink == 1
        assert not os.path.samefile(src, dst)
        assert dst.read_bytes() == src.read_bytes()
    (swapped / "text_encoder" / "config.json").write_text('{"hidden_size": 999}')
    assert private.read_text() == '{"hidden_size": 8}'
    # what was written is ordinary: folders 0755, files 0644, at every depth
    for path in [swapped, *swapped.rglob("*")]:
        assert _mode(path) & (0o755 if path.is_dir() else 0o644) == (
            0o755 if path.is_dir() else 0o644
        ), path
    assert _mode(swapped) == 0o755
    assert _mode(swapped / "unet" / "diffusion_pytorch_model.safetensors") == 0o644
    for name in ("report.json", "layers.csv"):
        assert _mode(out / name) == 0o644


def test_single_file_swap_is_an_ordinary_file(tmp_path, teacher_dir, student_dir):
    s_file = tmp_path / "s.safetensors"
    shutil.copy(student_dir / "diffusion_pytorch_model.safetensors", s_file)
    out = tmp_path / "out"
    args = ["analyze", str(teacher_dir), str(s_file), "--out", str(out), "--swap", "direction"]
    assert main(args + QUICK + ["--no-plots"]) == 0
    assert _mode(out / "swap-direction.safetensors") == 0o644


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("wadi analyze: error: "), err
    return err


def test_out_that_is_a_file_is_refused_and_kept(tmp_path, teacher_dir, student_dir, capsys):
    out = tmp_path / "results.txt"
    out.write_text("precious")
    rc = main(["analyze", str(teacher_dir), str(student_dir), "--out", str(out), *QUICK])
    assert rc == 2
    err = _one_line(capsys)
    assert str(out) in err and "not a folder" in err
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_out_under_a_file_is_one_line_naming_the_file(tmp_path, teacher_dir, student_dir, capsys):
    blocker = tmp_path / "notes"
    blocker.write_text("keep")
    out = blocker / "out"
    args = ["analyze", str(teacher_dir), str(student_dir), "--out", str(out), "--swap", "norm"]
    assert main(args + QUICK) == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and f"{blocker} is a file" in err
    assert blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores chmod")
def test_read_only_out_is_one_line(tmp_path, teacher_dir, student_dir, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "out"
    try:
        rc = main(["analyze", str(teacher_dir), str(student_dir), "--out", str(out), *QUICK])
        assert rc == 2
        err = _one_line(capsys)
        assert f"cannot write {out}" in err and "permission" in err
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_the_report_keeps_the_old_one(
    tmp_path, teacher_dir, student_dir, capsys, monkeypatch
):
    import wadi.analysis.plots as plots

    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.json", "layers.csv", "norm_vs_direction.png"):
        (out / name).write_text("old")
    monkeypatch.setattr(plots, "_svd_energy", _full_disk)  # the last file of the report
    rc = main(["analyze", str(teacher_dir), str(student_dir), "--out", str(out), "--quiet"])
    assert rc == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and "disk is full" in err
    # nothing of the new report replaced the old one, and no temporary files are left
    assert sorted(p.name for p in out.iterdir()) == [
        "layers.csv",
        "norm_vs_direction.png",
        "report.json",
    ]
    assert all((out / name).read_text() == "old" for name in os.listdir(out))


def test_full_disk_while_writing_a_swap_leaves_nothing(
    tmp_path, teacher_dir, student_dir, capsys, monkeypatch
):
    from wadi.analysis.swap import StreamingSafetensorsWriter

    calls = {"n": 0}
    real = StreamingSafetensorsWriter.write

    def fills_up(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            _full_disk()
        return real(self, name, tensor)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", fills_up)
    out = tmp_path / "new" / "out"
    args = ["analyze", str(teacher_dir), str(student_dir), "--out", str(out), "--swap", "norm"]
    assert main(args + QUICK) == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and "disk is full" in err
    assert not out.exists()  # a first run that failed leaves no empty --out either


def test_missing_input_is_not_reported_as_an_output_problem(tmp_path, teacher_dir, capsys):
    missing = tmp_path / "nowhere" / "unet"
    rc = main(["analyze", str(teacher_dir), str(missing), "--out", str(tmp_path / "o"), *QUICK])
    assert rc == 2
    err = _one_line(capsys)
    assert "cannot write" not in err and "nowhere" in err


def test_read_only_file_system_is_one_line_before_any_work(
    tmp_path, teacher_dir, student_dir, capsys, monkeypatch
):
    """The read-only case where chmod cannot make one (running as root): EROFS on create."""
    import tempfile

    import wadi.analysis.report as report_mod

    real = tempfile.mkstemp
    ro = tmp_path / "mounted"
    ro.mkdir()

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    def no_work(*args, **kwargs):
        raise AssertionError("the analysis ran although its output cannot be written")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(report_mod, "analyze", no_work)
    out = ro / "out"
    rc = main(["analyze", str(teacher_dir), str(student_dir), "--out", str(out), *QUICK])
    assert rc == 2
    err = _one_line(capsys)
    assert f"cannot write {out}" in err and "read-only" in err
    assert list(ro.iterdir()) == []
