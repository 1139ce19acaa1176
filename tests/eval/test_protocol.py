"""Protocol: crop + LANCZOS resize on PIL images, captions files, reference feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wadi.eval.protocol import (
    center_crop_resize,
    get_protocol,
    list_images,
    load_captions,
    reference_features,
)


def _stripes(w, h):
    """Red outside, green inside the centred square of side min(w, h)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = 255
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    arr[top : top + side, left : left + side] = (0, 255, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (201, 200)])
def test_center_crop_keeps_only_the_centre_square(size):
    out = center_crop_resize(_stripes(*size), 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert (np.asarray(out) == (0, 255, 0)).all()  # not one pixel of the red border


def test_resize_is_lanczos_of_the_crop():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    out = np.asarray(center_crop_resize(Image.fromarray(arr), 48))
    crop = Image.fromarray(arr[:, 20:140])  # independent crop in numpy
    lanczos = np.asarray(crop.resize((48, 48), Image.Resampling.LANCZOS))
    bicubic = np.asarray(crop.resize((48, 48), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, lanczos)
    assert not np.array_equal(out, bicubic)


def test_resize_none_and_modes():
    arr = np.random.default_rng(1).integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    rgba = Image.fromarray(arr, "RGBA")
    out = center_crop_resize(rgba, None)
    np.testing.assert_array_equal(np.asarray(out), arr[..., :3])
    grey = Image.fromarray(arr[..., 0], "L")
    assert np.asarray(center_crop_resize(grey, 16)).shape == (16, 16, 3)


def test_captions_txt_and_json(tmp_path):
    custom = get_protocol("custom")
    txt = tmp_path / "c.txt"
    txt.write_text("a cat\r\n a dog \nbird\n")
    caps = load_captions(txt, custom)
    assert caps.texts == ["a cat", "a dog", "bird"] and len(caps.file_sha256) == 64
    js = tmp_path / "c.json"
    js.write_text(json.dumps(["a cat", "a dog", "bird"]))
    assert load_captions(js, custom).list_sha256 == caps.list_sha256
    txt.write_text("a cat\n\nbird\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        load_captions(txt, custom)
    with pytest.raises(ValueError, match="has 2 captions but protocol coco2017-5k needs 5000"):
        load_captions(_write(tmp_path / "two.txt", "a\nb\n"), get_protocol("coco2017-5k"))
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        load_captions(tmp_path / "none.txt", custom)


def _write(path, text):
    path.write_text(text)
    return path


def _coco(path, n_images, per_image):
    anns = [
        {"id": 1000 - (img * per_image + j), "image_id": img, "caption": f"img {img} cap {j}"}
        for img in range(n_images)
        for j in range(per_image)
    ]
    path.write_text(json.dumps({"images": [], "annotations": anns}))
    return path


def test_coco_annotation_modes(tmp_path):
    # 2017 5K: one caption per image, the lowest annotation id, in image-id order
    caps = load_captions(_coco(tmp_path / "v17.json", 5000, 2), get_protocol("coco2017-5k"))
    assert len(caps) == 5000 and caps.texts[0] == "img 0 cap 1" and caps.texts[7] == "img 7 cap 1"
    # 2014 30K: a seeded draw without replacement, the same every time
    path = _coco(tmp_path / "v14.json", 6100, 5)
    proto = get_protocol("coco2014-30k")
    a, b = load_captions(path, proto), load_captions(path, proto)
    assert len(a) == 30000 and a.texts == b.texts and len(set(a.texts)) == 30000
    assert "seed 0" in a.selection


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)


class _MeanColour:
    """A stand-in extractor: mean RGB per image; counts how many images it saw."""

    name = "meancolour"
    default_resize = None

    def __init__(self):
        self.seen = 0

    def features(self, images):
        self.seen += len(images)
        return images.reshape(len(images), -1, 3).mean(1)

    def describe(self):
        return {"name": self.name, "weights_sha256": "0" * 64, "weights": "/somewhere"}


def test_reference_cache_keyed_by_protocol(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    proto = get_protocol("custom").with_resize(8)
    ext = _MeanColour()
    cache = tmp_path / "cache"
    feats, rec = reference_features(ext, ref, proto, cache, batch_size=2)
    assert ext.seen == 5 and not rec["cache_hit"] and feats.shape == (5, 3)
    expected = [
        np.asarray(center_crop_resize(Image.open(ref / f"{i}.png"), 8)).reshape(-1, 3).mean(0)
        for i in range(5)
    ]
    np.testing.assert_allclose(feats, expected, rtol=1e-6)
    again, rec2 = reference_features(ext, ref, proto, cache)
    assert ext.seen == 5 and rec2["cache_hit"] and rec2["hash"] == rec["hash"]
    np.testing.assert_array_equal(again, feats)
    # another resize or another folder content is another key
    _, rec3 = reference_features(ext, ref, proto.with_resize(4), cache)
    assert not rec3["cache_hit"] and rec3["hash"] != rec["hash"]
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(ref / "5.png")
    _, rec4 = reference_features(ext, ref, proto, cache)
    assert not rec4["cache_hit"] and rec4["key"]["reference_count"] == 6
    assert not list(cache.glob("*.tmp*")) and len(list(cache.glob("*.safetensors"))) == 3

    # a damaged cache file (truncated) is not trusted: recomputed with a warning, rewritten
    cached = Path(rec4["cache_file"])
    cached.write_bytes(cached.read_bytes()[:20])
    seen = ext.seen
    with pytest.warns(UserWarning, match="is damaged"):
        feats5, rec5 = reference_features(ext, ref, proto, cache)
    assert ext.seen == seen + 6 and not rec5["cache_hit"] and feats5.shape == (6, 3)
    assert reference_features(ext, ref, proto, cache)[1]["cache_hit"]


def _torchvision_offset(length: int, side: int) -> int:
    """torchvision.transforms.functional.center_crop's offset, written out independently."""
    return int(round((length - side) / 2.0))


@pytest.mark.parametrize("size", [(640, 425), (425, 640), (643, 640), (213, 100)])
def test_center_crop_offset_matches_torchvision(size):
    # 640 - 425 = 215 = 3 mod 4: torchvision rounds 107.5 to 108, floor division gives 107
    w, h = size
    arr = np.random.default_rng(7).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    side = min(w, h)
    left, top = _torchvision_offset(w, side), _torchvision_offset(h, side)
    expected = arr[top : top + side, left : left + side]
    out = np.asarray(center_crop_resize(Image.fromarray(arr), None))
    np.testing.assert_array_equal(out, expected)
    if (max(w, h) - side) % 4 == 3:  # the case the old floor division got wrong
        floor = arr[(h - side) // 2 :, (w - side) // 2 :][:side, :side]
        assert not np.array_equal(out, floor)
