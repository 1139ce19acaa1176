"""wadi.paths (output checks, damaged files) and wadi.devices (--device, fp16 on CPU)."""

import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from wadi.devices import NO_CUDA, resolve_device, warn_if_half_on_cpu
from wadi.paths import (
    DamagedFileError,
    check_output_folder,
    check_output_separate,
    check_safetensors,
    find_damaged_safetensors,
    writing_output,
)


@pytest.fixture
def run(tmp_path):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "student.safetensors").write_bytes(b"x")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "out,relation",
    [
        ("run/final", "is"),
        ("run", "contains"),
        ("run/final/pipeline", "lies inside"),
        (".", "contains"),
    ],
)
def test_output_overlapping_an_input_is_refused(run, tmp_path, out, relation):
    with pytest.raises(ValueError, match=f"output .* {relation} the input .*final"):
        check_output_separate(tmp_path / out, run / "final")


def test_overlap_is_found_through_symlinks(run, tmp_path):
    (tmp_path / "link").symlink_to(run / "final")
    with pytest.raises(ValueError, match="is the input"):
        check_output_separate(tmp_path / "link", run / "final")
    (tmp_path / "out").symlink_to(run)
    with pytest.raises(ValueError, match="lies inside"):
        check_output_separate(tmp_path / "out" / "final" / "x", run / "final")


def test_separate_outputs_pass(run, tmp_path):
    check_output_separate(tmp_path / "exported", run / "final", None, "org/not-a-local-folder")
    check_output_separate(tmp_path / "run-2", run)  # a sibling whose name extends the input's


def test_output_folder_checks(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("keep")
    with pytest.raises(ValueError, match="is a file, and the output is a folder: remove the file"):
        check_output_folder(file, overwrite=True)
    with pytest.raises(ValueError, match=f"cannot create --out .*: {file} is a file"):
        check_output_folder(file / "sub" / "out", overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        check_output_folder(full, overwrite=False)
    check_output_folder(full, overwrite=True)
    check_output_folder(tmp_path / "new" / "deeper", overwrite=False)
    assert file.read_text() == "keep" and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_output_folder(ro / "out", overwrite=False)
    finally:
        ro.chmod(0o755)


def test_writing_output_names_the_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"cannot write {out}: No space left.*disk is full"):
        with writing_output(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError):  # an input's error is not the output's
        with writing_output(out):
            raise FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "teacher"))


def test_damaged_safetensors_are_named(tmp_path):
    good = tmp_path / "m" / "good.safetensors"
    good.parent.mkdir()
    save_file({"w": torch.ones(64)}, str(good))
    check_safetensors(good)
    assert find_damaged_safetensors(tmp_path) is None
    bad = tmp_path / "m" / "sub" / "weights.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:-10])  # truncated
    with pytest.raises(DamagedFileError, match=f"{bad} is damaged"):
        check_safetensors(bad)
    assert find_damaged_safetensors(tmp_path) == bad
    bad.write_bytes(os.urandom(300))
    with pytest.raises(DamagedFileError, match="re-download, re-export or re-create it"):
        check_safetensors(bad)


def test_resolve_device():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="wadi runs on cpu, cuda or mps"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(ValueError, match=NO_CUDA):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=NO_CUDA):
        resolve_device("cuda:1")


def test_fp16_on_cpu_warns_once(capsys):
    assert warn_if_half_on_cpu("cpu", torch.float16, "wadi generate")
    err = capsys.readouterr().err
    assert err.startswith("wadi generate: warning: fp16 on CPU") and err.count("\n") == 1
    assert not warn_if_half_on_cpu("cpu", torch.float32)
    assert not warn_if_half_on_cpu("cuda", torch.float16)
    assert capsys.readouterr().err == ""
