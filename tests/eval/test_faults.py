"""`wadi eval score | generate` on bad input: one line naming the problem, nothing partial.

Uses the shipped digits evaluator as the feature extractor: same code path as
Inception, a fraction of the CPU time.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from wadi.cli import main
from wadi.eval.metrics import SMALL_SAMPLE, warn_small_sample
from wadi.eval.score import save_record

CAPTIONS = ["a cat", "a dog", "a car", "a bird", "a tree", "a mat"]


def _png_bytes(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def folders(tmp_path):
    images, reference = tmp_path / "gen", tmp_path / "ref"
    images.mkdir()
    reference.mkdir()
    for i in range(len(CAPTIONS)):
        (images / f"{i:05d}.png").write_bytes(_png_bytes(i))
    for i in range(8):
        (reference / f"ref_{i}.png").write_bytes(_png_bytes(100 + i))
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return images, reference, captions


def _score_args(images, reference, captions, *extra):
    return [
        "eval", "score", "--protocol", "custom", "--captions", str(captions),
        "--images", str(images), "--reference", str(reference), "--metrics", "fid",
        "--extractor", "digits", "--device", "cpu", "--workers", "1", *extra,
    ]  # fmt: skip


def _run(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip(), captured.out


def _one_line_error(rc, err):
    """Exit status 2 and one error line, the last on stderr (progress bars may precede it)."""
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith("wadi eval: error: "), err


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: np.random.default_rng(9).bytes(300),  # random bytes
        lambda data: data[:40],  # cut inside the header
        lambda data: data[: len(data) // 2],  # cut inside the pixel data
    ],
    ids=["random-bytes", "truncated-header", "truncated-data"],
)
@pytest.mark.parametrize("where", ["generated", "reference"])
def test_corrupt_png_is_one_line_naming_the_file(folders, corrupt, where, capsys):
    images, reference, captions = folders
    bad = images / "00003.png" if where == "generated" else reference / "ref_5.png"
    bad.write_bytes(corrupt(bad.read_bytes()))
    rc, err, _ = _run(_score_args(images, reference, captions, "--no-cache"), capsys)
    _one_line_error(rc, err)
    assert str(bad) in err and "cannot decode image" in err and "replace or delete" in err
    assert not (images / "scores.json").exists()


def test_output_paths_that_are_files_or_folders_are_refused(folders, tmp_path, capsys):
    images, reference, captions = folders
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")

    # --output is a folder where a file is expected
    rc, err, _ = _run(_score_args(images, reference, captions, "--output", str(tmp_path)), capsys)
    _one_line_error(rc, err)
    assert f"--output {tmp_path} is a folder" in err

    # --output under a regular file
    out = a_file / "scores.json"
    rc, err, _ = _run(_score_args(images, reference, captions, "--output", str(out)), capsys)
    _one_line_error(rc, err)
    assert str(a_file) in err and "not a folder" in err

    # --cache-dir is a regular file
    rc, err, _ = _run(_score_args(images, reference, captions, "--cache-dir", str(a_file)), capsys)
    _one_line_error(rc, err)
    assert f"--cache-dir {a_file} is an existing file" in err

    # generate: --output-dir is a regular file (refused before the model is even looked at)
    rc, err, _ = _run(
        ["eval", "generate", "--protocol", "custom", "--captions", str(captions),
         "--model", str(tmp_path / "no-model"), "--output-dir", str(a_file)],
        capsys,
    )  # fmt: skip
    _one_line_error(rc, err)
    assert f"--output-dir {a_file} is an existing file, not a folder" in err

    assert a_file.read_text() == "keep me\n"
    assert not (images / "scores.json").exists()


def test_read_only_output_is_one_line_and_leaves_nothing(folders, tmp_path, read_only, capsys):
    images, reference, captions = folders
    locked = read_only(tmp_path / "locked")

    out = locked / "scores.json"
    rc, err, _ = _run(_score_args(images, reference, captions, "--output", str(out)), capsys)
    _one_line_error(rc, err)
    assert f"cannot write --output {out}: {locked} is not writable" in err
    assert list(locked.iterdir()) == []

    # the default output inside a read-only image folder
    read_only(images)
    rc, err, _ = _run(_score_args(images, reference, captions, "--no-cache"), capsys)
    _one_line_error(rc, err)
    assert f"cannot write --output {images / 'scores.json'}" in err
    assert sorted(p.name for p in images.iterdir()) == [f"{i:05d}.png" for i in range(6)]

    # generate into a folder that cannot be created
    rc, err, _ = _run(
        ["eval", "generate", "--protocol", "custom", "--captions", str(captions),
         "--model", str(tmp_path / "no-model"), "--output-dir", str(locked / "images")],
        capsys,
    )  # fmt: skip
    _one_line_error(rc, err)
    assert f"cannot write --output-dir {locked / 'images'}: {locked} is not writable" in err
    assert list(locked.iterdir()) == []


def test_save_record_failing_late_names_the_path_and_leaves_nothing(tmp_path, read_only):
    # the up-front check passed but the folder became read-only before the write
    locked = read_only(tmp_path / "late")
    with pytest.raises(ValueError, match=r"cannot write .*late/scores\.json"):
        save_record({"results": {}}, locked / "scores.json")
    assert list(locked.iterdir()) == []


def test_read_only_cache_warns_and_still_scores(folders, tmp_path, read_only, capsys):
    images, reference, captions = folders
    cache = read_only(tmp_path / "cache")
    args = _score_args(images, reference, captions, "--cache-dir", str(cache))
    rc, err, _ = _run(args, capsys)
    assert rc == 0, err
    assert "reference features not cached" in err and str(cache) in err
    assert "fid" in json.loads((images / "scores.json").read_text())["results"]
    assert list(cache.iterdir()) == []


def test_small_sample_warning_function():
    with pytest.warns(UserWarning, match="FID from only 1999 samples"):
        assert warn_small_sample(1999) is not None
    with pytest.warns(UserWarning, match="FD of toy features from only 10 samples"):
        warn_small_sample(10, "FD of toy features")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert warn_small_sample(SMALL_SAMPLE) is None
        assert warn_small_sample(30_000) is None


def test_score_warns_once_about_few_samples(folders, capsys):
    images, reference, captions = folders
    rc, err, _ = _run(_score_args(images, reference, captions, "--no-cache"), capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "samples" in line]
    assert lines == [
        "wadi eval score: warning: FD of digits features from only 6 samples (fewer than "
        "2,000) is biased upward; compare it only with values computed from the same "
        "number of samples"
    ]
    record = json.loads((images / "scores.json").read_text())
    assert record["warnings"] == [lines[0].removeprefix("wadi eval score: warning: ")]
