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
