"""Precision/recall by hand, and on VGG-16 fc2 features (the original work's) in `wadi eval score`.

VGG-16 is checked twice: its parameter layout against torchvision's names and shapes
(full size, built on the meta device), and a narrow stand-in of the same code against an
independent float64 forward pass with ``torch.nn.functional``.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wadi.cli import main
from wadi.eval.metrics import precision_recall
from wadi.eval.protocol import load_image
from wadi.eval.vgg import VGG16FC2

TINY = dict(fc_width=16, widths=(4, "M", 8, "M"))


def test_precision_recall_hand_example():
    # 1-D, k = 1.  Real 0, 1, 3, 7: radii (distance to the nearest other real) 1, 1, 2, 4,
    # so balls [-1, 1], [0, 2], [1, 5], [3, 11].  Generated 0.5, 0.6, 4, 20: radii 0.1,
    # 0.1, 3.4, 16, balls [0.4, 0.6], [0.5, 0.7], [0.6, 7.4], [4, 36].
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[0.5], [0.6], [4.0], [20.0]])
    # precision: 0.5, 0.6 and 4 lie in a real ball, 20 in none -> 3/4
    # recall: real 1, 3, 7 lie in a generated ball, 0 in none -> 3/4
    assert precision_recall(real, fake, k=1) == (0.75, 0.75)
    # k = 2: real radii 3, 2, 3, 6 (balls [-3, 3], [-1, 3], [0, 6], [1, 13]): 20 still out;
    # generated radii 3.5, 3.4, 3.5, 19.4: ball [-3, 4] of 0.5 holds real 0 -> recall 1
    assert precision_recall(real, fake, k=2) == (0.75, 1.0)
    # a point exactly on a ball's surface is inside (<=): real 0, 2 with k = 1 have radius 2
    assert precision_recall([[0.0], [2.0]], [[4.0], [9.0]], k=1)[0] == 0.5
    # the same in 2-D with the Euclidean norm: (3, 4) is at distance 5 from the origin
    real2 = np.array([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]])
    fake2 = np.array([[6.0, 8.0], [60.0, 80.0], [60.0, 79.0]])
    # real radii (k=1): 5, 5, 45 -> (6, 8) is 5 from (3, 4): inside; (60, 80) is 50 from
    # (30, 40): outside; (60, 79) is sqrt(900 + 1521) = 49.2 from it: outside
    assert precision_recall(real2, fake2, k=1)[0] == 1 / 3


def test_vgg16_has_torchvision_names_and_shapes():
    with torch.device("meta"):
        state = VGG16FC2().state_dict()
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    expected = {}
    channels = 3
    for index, width in zip(convs, widths):
        expected[f"features.{index}.weight"] = (width, channels, 3, 3)
        expected[f"features.{index}.bias"] = (width,)
        channels = width
    expected |= {
        "classifier.0.weight": (4096, 25088),
        "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096),
        "classifier.3.bias": (4096,),
    }
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # torchvision's vgg16 has 138,357,544 parameters; without the 1000-way fc3 layer:
    assert sum(v.numel() for v in state.values()) == 138_357_544 - (4096 * 1000 + 1000)


def _tiny_vgg_file(path, seed=0):
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in VGG16FC2(**TINY).state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 16)  # the classifier: ignored
    state["classifier.6.bias"] = torch.zeros(1000)
    save_file(state, str(path))
    return path


def _reference_fc2(state, images):
    """float64: PIL bicubic 224, ImageNet normalisation, conv/ReLU/pool stack, fc1, fc2."""
    pil = [Image.fromarray(a).resize((224, 224), Image.Resampling.BICUBIC) for a in images]
    x = np.stack([np.asarray(p, dtype=np.float64) / 255.0 for p in pil])
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    p = {k: v.double() for k, v in state.items()}
    x = F.relu(F.conv2d(x, p["features.0.weight"], p["features.0.bias"], padding=1))
    x = F.max_pool2d(x, 2)
    x = F.relu(F.conv2d(x, p["features.3.weight"], p["features.3.bias"], padding=1))
    x = F.adaptive_avg_pool2d(F.max_pool2d(x, 2), (7, 7)).flatten(1)
    x = F.relu(F.linear(x, p["classifier.0.weight"], p["classifier.0.bias"]))
    return F.linear(x, p["classifier.3.weight"], p["classifier.3.bias"]).numpy()


def _write_images(folder, n, size, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return sorted(folder.glob("*.png"))


def test_vgg16_extractor_matches_float64_forward(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from wadi.eval.extractors import load_extractor

    monkeypatch.setattr("wadi.eval.vgg.VGG16FC2", partial(VGG16FC2, **TINY))
    weights = _tiny_vgg_file(tmp_path / "vgg16.safetensors")
    ext = load_extractor("vgg16", weights=weights)
    images = np.random.default_rng(1).integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    feats = ext.features(images)
    ref = _reference_fc2(load_file(str(weights)), images)
    assert feats.shape == (3, 16) and np.ptp(ref) > 0
    assert (feats < 0).any()  # fc2 before its ReLU, like torchvision's classifier[:4]
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
    assert ext.describe()["weights_sha256"] and ext.default_resize == 224


def test_score_precision_recall_on_vgg16_features(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("wadi.eval.vgg.VGG16FC2", partial(VGG16FC2, **TINY))
    weights = _tiny_vgg_file(tmp_path / "vgg16.safetensors", seed=2)
    gen = _write_images(tmp_path / "gen", 6, 48, seed=3)
    ref = _write_images(tmp_path / "ref", 7, 48, seed=4)
    captions = tmp_path / "c.txt"
    captions.write_text("".join(f"caption {i}\n" for i in range(6)))
    args = [
        "eval", "score", "--protocol", "custom", "--captions", str(captions),
        "--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
        "--metrics", "pr", "--pr-extractor", "vgg16", "--pr-extractor-weights", str(weights),
        "--inception-weights", str(tmp_path / "absent.safetensors"),  # never loaded
        "--no-cache", "--device", "cpu", "--batch-size", "4",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "gen" / "scores.json").read_text())
    from safetensors.torch import load_file

    state = load_file(str(weights))
    # the protocol's LANCZOS centre-crop resize goes straight to 224, as the record says
    f_gen = _reference_fc2(state, np.stack([load_image(p, 224) for p in gen]))
    f_ref = _reference_fc2(state, np.stack([load_image(p, 224) for p in ref]))
    p, r = precision_recall(f_ref, f_gen, k=3)
    assert (record["results"]["precision"], record["results"]["recall"]) == (p, r)
    assert set(record["results"]) == {"precision", "recall"} and "extractor" not in record
    assert record["pr_extractor"]["name"] == "vgg16" and record["pr_extractor"]["resize"] == 224
    assert record["pr_k"] == 3 and record["pr_reference"]["key"]["reference_count"] == 7


def test_vgg16_weights_errors_are_one_line(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from wadi.eval.vgg import load_vgg16

    pth = tmp_path / "vgg16-397923af.pth"
    pth.write_bytes(b"pickle")
    with pytest.raises(ValueError, match="does not unpickle"):
        load_vgg16(pth)
    with pytest.raises(ValueError, match=r"vgg16-397923af\.pth \(https://download"):
        load_vgg16(tmp_path / "absent.safetensors")
    monkeypatch.setattr("wadi.eval.vgg.VGG16FC2", partial(VGG16FC2, **TINY))
    state = load_file(str(_tiny_vgg_file(tmp_path / "tiny.safetensors")))
    save_file(
        {**state, "features.0.weight": torch.zeros(4, 3, 5, 5)}, str(tmp_path / "w.safetensors")
    )
    with pytest.raises(ValueError, match=r"features.0.weight has shape \(4, 3, 5, 5\)"):
        load_vgg16(tmp_path / "w.safetensors")
    del state["classifier.3.bias"]
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="1 tensors missing, first: classifier.3.bias"):
        load_vgg16(tmp_path / "m.safetensors")
