"""wadi.files: every write lands complete or not at all."""

import json

import pytest

from wadi.files import atomic_directory, atomic_file, write_json, write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_file_replaces_on_success_keeps_suffix(tmp_path):
    target = tmp_path / "sub" / "grid.png"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert _leftovers(target.parent) == []


def test_atomic_file_error_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "good"
    assert _leftovers(tmp_path) == []


def test_write_json_round_trip_and_unicode(tmp_path):
    data = {"b": 1.5, "a": "siebenß", "path": tmp_path}
    path = write_json(tmp_path / "x.json", data, sort_keys=True)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == {"a": "siebenß", "b": 1.5, "path": str(tmp_path)}
    assert list(loaded) == ["a", "b", "path"]
    write_text(tmp_path / "x.json", "plain\n")
    assert (tmp_path / "x.json").read_text() == "plain\n"


def test_atomic_directory_swaps_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError("bad input")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert _leftovers(tmp_path) == []


def _mode(path):
    return path.stat().st_mode & 0o777


def test_atomic_directory_publishes_ordinary_modes_at_every_depth(tmp_path):
    import os
    import tempfile

    target = tmp_path / "model"
    old_umask = os.umask(0o077)  # writers inside may make private files and folders
    try:
        with atomic_directory(target) as tmp:
            (tmp / "sub" / "deeper").mkdir(parents=True)
            (tmp / "sub" / "deeper" / "weights.bin").write_bytes(b"w")
            fd, private = tempfile.mkstemp(dir=tmp / "sub")
            os.close(fd)
            (tmp / "top.json").write_text("{}")
    finally:
        os.umask(old_umask)
    assert _mode(target) == 0o755
    dirs = [target / "sub", target / "sub" / "deeper"]
    files = [target / "top.json", target / "sub" / "deeper" / "weights.bin"]
    files.append(target / "sub" / os.path.basename(private))
    assert [_mode(d) for d in dirs] == [0o755, 0o755]
    assert [_mode(f) for f in files] == [0o644, 0o644, 0o644]


def test_atomic_file_and_directory_fsync_before_the_rename(tmp_path, monkeypatch):
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the fsynced file")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "a.json"
    with atomic_file(target) as tmp:
        tmp.write_text("1")
    i = events.index(("replace", str(tmp), str(target)))
    assert ("fsync", str(tmp)) in events[:i]  # the data is on disk before the name is
    assert ("fsync", str(tmp_path)) in events[i:]  # and the rename after it
    events.clear()
    folder = tmp_path / "folder"
    with atomic_directory(folder) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    i = events.index(("replace", str(tmp), str(folder)))
    assert ("fsync", str(tmp / "w.bin")) in events[:i]
    assert ("fsync", str(tmp_path)) in events[i:]


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("1")
    assert target.read_text() == "precious"
    assert _leftovers(tmp_path) == []


def test_atomic_files_publishes_all_or_none(tmp_path):
    from wadi.files import atomic_files

    (tmp_path / "keep.txt").write_text("other")
    (tmp_path / "report.json").write_text("old")
    with pytest.raises(OSError):
        with atomic_files(tmp_path) as stage:
            write_text(stage / "report.json", "new")
            raise OSError(28, "No space left on device")
    assert (tmp_path / "report.json").read_text() == "old"
    with atomic_files(tmp_path) as stage:
        write_text(stage / "report.json", "new")
        write_text(stage / "table.csv", "a,b\n")
    assert (tmp_path / "report.json").read_text() == "new"
    assert (tmp_path / "table.csv").read_text() == "a,b\n"
    assert (tmp_path / "keep.txt").read_text() == "other"
    assert _leftovers(tmp_path) == []


def test_copy_file_is_a_new_file_not_a_link(tmp_path):
    import os

    from wadi.files import copy_file

    src = tmp_path / "teacher.json"
    src.write_text("teacher")
    src.chmod(0o600)
    copy_file(src, tmp_path / "copy.json")
    assert not os.path.samefile(src, tmp_path / "copy.json")
    assert src.stat().st_nlink == 1 and _mode(tmp_path / "copy.json") == 0o644
    (tmp_path / "copy.json").write_text("edited")
    assert src.read_text() == "teacher"


@pytest.mark.parametrize(
    "code, fix",
    [
        (28, "the disk is full"),
        (13, "no permission to write there"),
        (30, "read-only"),
        (5, "check that the location exists and can be written"),
    ],
)
def test_output_error_is_one_line_naming_the_path_and_fix(tmp_path, code, fix):
    import os

    from wadi.files import output_error

    err = output_error(tmp_path / "out", OSError(code, os.strerror(code)))
    assert isinstance(err, ValueError)
    text = str(err)
    assert (
        "\n" not in text and text.startswith(f"cannot write {tmp_path / 'out'}: ") and fix in text
    )


def test_output_errors_names_a_file_in_the_way_and_passes_other_files_through(tmp_path):
    from wadi.files import check_writable, output_errors

    blocker = tmp_path / "notes"
    blocker.write_text("keep")
    with pytest.raises(ValueError, match=f"{blocker} is a file, not a folder"):
        check_writable(blocker / "out")
    assert blocker.read_text() == "keep"
    with pytest.raises(FileNotFoundError):  # an input elsewhere: not the output's problem
        with output_errors(tmp_path / "out"):
            open(tmp_path / "input.bin", "rb")


def test_output_errors_passes_wadis_own_messages_through(tmp_path):
    """An OSError wadi raised itself (no errno: a missing teacher, say) keeps its message;
    one from the system without a file name (a full disk) becomes the output's."""
    import errno

    from wadi.files import output_errors

    with pytest.raises(FileNotFoundError, match="^teacher folder /x not found$"):
        with output_errors(tmp_path / "out"):
            raise FileNotFoundError("teacher folder /x not found")
    with pytest.raises(ValueError, match="out"):
        with output_errors(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
