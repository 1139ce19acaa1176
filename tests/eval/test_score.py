"""`wadi eval score` end to end on tiny local weights: values, sidecar, cache, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wadi.cli import main
from wadi.eval.extractors import load_extractor
from wadi.eval.metrics import clip_score, frechet_distance, precision_recall
from wadi.eval.protocol import center_crop_resize, get_protocol, load_captions
from wadi.files import write_json

CAPTIONS = ["a cat", "a photo of a cat", "a dog", "two cats", "a red photo", "a cat and a dog"]


def _write_images(folder, n, size, seed, suffix=".png", names=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        name = names(i) if names else f"{i:05d}{suffix}"
        Image.fromarray(arr).save(folder / name, quality=95)
    return folder


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    # Inception at 96 px instead of 299: same code path, a tenth of the CPU time
    monkeypatch.setattr("wadi.eval.inception.INPUT_SIZE", 96)
    images = _write_images(tmp_path / "gen", len(CAPTIONS), (40, 40), seed=0)
    reference = _write_images(
        tmp_path / "ref", 8, (36, 48), seed=1, names=lambda i: f"COCO_val_{i:03d}.jpg"
    )
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return images, reference, captions


def _features(ext, folder, size):
    arrays = [
        np.asarray(center_crop_resize(Image.open(p), size)) for p in sorted(folder.glob("*.*g"))
    ]
    return ext.features(np.stack(arrays))


def test_score_cli_values_sidecar_and_cache(setup, tmp_path, inception_file, clip_folder, capsys):
    images, reference, captions_file = setup
    caps = load_captions(captions_file, get_protocol("custom"))
    # a generation sidecar is carried into the record
    write_json(images / "generation.json", {"steps": 1, "captions": caps.describe()})
    args = [
        "eval", "score", "--protocol", "custom", "--captions", str(captions_file),
        "--images", str(images), "--reference", str(reference),
        "--inception-weights", str(inception_file), "--clip-model", str(clip_folder),
        "--resize", "32", "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    record = json.loads((images / "scores.json").read_text())

    inc = load_extractor("inception", weights=inception_file)
    gen, ref = _features(inc, images, 32), _features(inc, reference, 32)
    res = record["results"]
    assert res["fid"] == pytest.approx(frechet_distance(gen, ref), rel=1e-4)
    p, r = precision_recall(ref, gen, k=3)
    assert (res["precision"], res["recall"]) == (p, r)
    clip = load_extractor("clip", folder=clip_folder)
    txt = clip.text_features(["A photo depicts " + c for c in CAPTIONS])
    assert res["clip_score"] == pytest.approx(
        clip_score(_features(clip, images, 32), txt), rel=1e-4
    )

    # every knob
    assert record["protocol"]["resize"] == 32 and record["protocol"]["resample"] == "lanczos"
    assert record["protocol"]["clip_prefix"] == "A photo depicts "
    assert record["extractor"]["weights_sha256"] == inc.sha256
    assert record["clip"]["weights_sha256"] == clip.sha256
    assert record["captions"]["file_sha256"] == caps.file_sha256
    assert record["generation"]["steps"] == 1 and record["pr_k"] == 3
    assert record["reference"]["key"]["reference_count"] == 8
    assert not record["reference"]["cache_hit"]
    assert "fid" in capsys.readouterr().out

    # second run: reference features come from the cache, same numbers
    out = tmp_path / "again.json"
    assert main(args + ["--metrics", "fid", "--output", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["reference"]["cache_hit"] and again["results"]["fid"] == res["fid"]
    assert set(again["results"]) == {"fid"}


def _run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_score_clear_errors(setup, tmp_path, inception_file, capsys):
    images, reference, captions_file = setup
    base = ["eval", "score", "--protocol", "custom", "--metrics", "fid", "--no-cache"]

    # missing weight file: names the public file and the converter
    rc, err = _run(
        base + ["--captions", str(captions_file), "--images", str(images),
                "--reference", str(reference), "--inception-weights", str(tmp_path / "no.safetensors")],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "pt_inception-2015-12-05-6726825d.pth" in err and "\n" not in err

    good = ["--inception-weights", str(inception_file), "--reference", str(reference)]
    # empty image folder
    (tmp_path / "empty").mkdir()
    rc, err = _run(
        base + good + ["--captions", str(captions_file), "--images", str(tmp_path / "empty")],
        capsys,
    )
    assert rc == 2 and "no images" in err and "\n" not in err

    # captions file of another length than the images
    short = tmp_path / "short.txt"
    short.write_text("\n".join(CAPTIONS[:5]) + "\n")
    rc, err = _run(base + good + ["--captions", str(short), "--images", str(images)], capsys)
    assert rc == 2 and "has 5 captions but" in err and "holds 6 images" in err

    # images generated from other captions than the ones given
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(CAPTIONS)) + "\n")
    caps = load_captions(captions_file, get_protocol("custom"))
    write_json(images / "generation.json", {"captions": caps.describe()})
    rc, err = _run(base + good + ["--captions", str(other), "--images", str(images)], capsys)
    assert rc == 2 and "generated from other captions" in err

    # protocol count: the COCO-2014 mode wants 30,000 captions
    rc, err = _run(
        ["eval", "score", "--captions", str(captions_file), "--images", str(images)] + good,
        capsys,
    )
    assert rc == 2 and "needs 30000" in err


def test_images_must_be_named_by_caption_index(tmp_path, setup):
    from wadi.eval.score import match_images_to_captions

    _, _, captions_file = setup
    caps = load_captions(captions_file, get_protocol("custom"))
    folder = _write_images(tmp_path / "odd", 6, (8, 8), 3, names=lambda i: f"{i * 2:05d}.png")
    with pytest.raises(ValueError, match="no image for caption 1"):
        match_images_to_captions(folder, caps)
