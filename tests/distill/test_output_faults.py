"""A run folder on a read-only file system: one line naming it, nothing left behind."""

import errno
import os

from wadi.cli import main
from wadi.distill import run_dir


def test_read_only_output_is_one_line_and_leaves_nothing(
    teachers, prompts, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "new" / "run"
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_dir.os, "open", read_only)
    code = main(
        ["distill", "--teacher", str(teachers["sd-eps"]), "--prompts", str(prompts)]
        + ["--output-dir", str(out), "--max-steps", "1"]
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("wadi distill: error: cannot write"), line
    assert "Read-only file system; choose a writable --output-dir" in line
    assert str(out / run_dir.LOCK_NAME) in line
    assert not (tmp_path / "new").exists()  # the folders made for the lock are gone again
