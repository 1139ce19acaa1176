"""Extractors loaded from local files of random weights; clear errors for missing ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wadi.eval.extractors import available_extractors, load_extractor
from wadi.eval.inception import (
    PUBLIC_WEIGHTS_NAME,
    FIDInceptionV3,
    convert_inception_weights,
    file_sha256,
    load_inception,
)


def test_inception_weights_round_trip_and_2048_features(inception_file):
    from safetensors.torch import load_file

    model = load_inception(inception_file)
    saved = load_file(str(inception_file))
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, saved[key]), key
    assert not model.training
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    feats = model(images)
    assert feats.shape == (2, 2048)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLU outputs
    assert not torch.allclose(feats[0], feats[1])  # different images, different features


def test_inception_extractor_both_resizes(inception_file, monkeypatch):
    monkeypatch.setattr("wadi.eval.inception.INPUT_SIZE", 96)  # 299 in use; 96 keeps CPU time low
    images = np.random.default_rng(0).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()

    torchfid = load_extractor("inception", weights=inception_file, inception_resize="pytorch-fid")
    feats = torchfid.features(images)
    ref = torchfid.model(x.float() / 255).numpy()
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)

    clean = load_extractor("inception", weights=inception_file)  # clean-fid by default
    assert clean.resize == "clean"
    resized = torch.from_numpy(_bicubic_reference(images, 96)).permute(0, 3, 1, 2)
    ref = clean.model.features_from_normalized(((resized - 128) / 128).float()).numpy()
    np.testing.assert_allclose(clean.features(images), ref, rtol=1e-3, atol=1e-4)
    assert not np.allclose(clean.features(images), feats, rtol=1e-3)  # the two resizes differ

    info = clean.describe()
    assert (
        info["weights_sha256"] == file_sha256(inception_file) and len(info["weights_sha256"]) == 64
    )
    assert info["resize"] == "clean" and torchfid.describe()["input"] != info["input"]
    with pytest.raises(ValueError, match="unknown Inception resize"):
        load_extractor("inception", weights=inception_file, inception_resize="nearest")


def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(
        x < 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0),
    )


def _bicubic_matrix(n_in, n_out):
    """Float64 resampling matrix of PIL's BICUBIC upsampling (half-pixel centres,
    taps cut at the border and renormalised)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 + 0.5), 0), min(int(centre + 2 + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic(j + 0.5 - centre)
        m[i, lo:hi] = w / w.sum()
    return m


def _bicubic_reference(images, size):
    """clean-fid's resize written independently: separable float64 bicubic, clip 0-255."""
    h, w = images.shape[1:3]
    mh, mw = _bicubic_matrix(h, size), _bicubic_matrix(w, size)
    out = np.einsum("ih,bhwc,jw->bijc", mh, images.astype(np.float64), mw)
    return out.clip(0, 255)


def test_clean_resize_matches_float64_bicubic():
    from wadi.eval.inception import clean_resize

    images = np.random.default_rng(5).integers(0, 256, size=(2, 23, 31, 3), dtype=np.uint8)
    got = clean_resize(images, 50)
    assert got.shape == (2, 50, 50, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, _bicubic_reference(images, 50), atol=2e-3)
    flat = np.full((1, 20, 20, 3), 77, np.uint8)
    np.testing.assert_allclose(clean_resize(flat, 299), 77.0, atol=1e-4)


def test_missing_inception_weights_names_the_public_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_extractor("inception", weights=tmp_path / "nope.safetensors")
    message = str(err.value)
    assert PUBLIC_WEIGHTS_NAME in message and "convert-inception" in message
    assert "\n" not in message


def test_wrong_inception_file_is_a_clear_error(tmp_path, random_inception_state):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not FID Inception-v3 weights"):
        load_inception(path)
    state = random_inception_state()
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        load_inception(path)


def test_convert_inception_from_pth(tmp_path, random_inception_state):
    state = random_inception_state(seed=3)
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros(1008, 2048)
    pth = tmp_path / PUBLIC_WEIGHTS_NAME
    torch.save(state, pth)
    out = convert_inception_weights(pth, tmp_path / "sub" / "inc.safetensors")
    assert out.is_file() and not list(out.parent.glob("*.tmp*"))
    model = load_inception(out)
    assert torch.equal(
        model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"]
    )
    # a .pth passed where safetensors is expected points at the converter
    with pytest.raises(ValueError, match="convert-inception"):
        load_inception(pth)
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not the FID Inception-v3 state dict"):
        convert_inception_weights(tmp_path / "bad.pth", tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_fid_pooling_quirks():
    """The TF FID graph averages pools without padding and max-pools in Mixed_7c."""
    model = FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    from wadi.eval.inception import _avg_pool

    x = torch.ones(1, 1, 4, 4)
    assert torch.allclose(_avg_pool(x), x)  # count_include_pad=True would give 4/9 in corners


def test_transformers_clip_from_local_folder(clip_folder):
    from transformers import CLIPModel

    ext = load_extractor("clip", folder=clip_folder)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 48, 48, 3), dtype=np.uint8)
    img = ext.features(images)
    txt = ext.text_features(["a photo depicts a cat", "a cat", "photo"])
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    # text path against a direct call of the model saved in the folder
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = ext.processor.tokenizer(["a cat"], return_tensors="pt")
    with torch.no_grad():
        direct = model.get_text_features(**tok)
    direct = direct if torch.is_tensor(direct) else direct.pooler_output
    np.testing.assert_allclose(txt[1], direct[0].numpy(), rtol=1e-4, atol=1e-5)
    assert (
        ext.describe()["weights_sha256"] == ext.sha256
        and ext.describe()["backend"] == "transformers"
    )


def test_clip_errors(tmp_path):
    with pytest.raises(ValueError, match="--clip-model"):
        load_extractor("clip")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_extractor("clip", folder=tmp_path)


def test_registry_lists_and_rejects():
    assert {"inception", "clip", "digits"} <= set(available_extractors())
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_extractor("vgg")


def test_digits_extractor_uses_the_toy_evaluator_lazily(monkeypatch):
    import sys
    import types

    seen = {}

    class FakeEvaluator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 5)

        def features(self, x):
            seen["x"] = x
            return self.proj(x.flatten(1))

    module = types.ModuleType("wadi.toy.evaluator")
    module.load_evaluator = FakeEvaluator
    monkeypatch.setitem(sys.modules, "wadi.toy.evaluator", module)
    ext = load_extractor("digits")
    assert ext.default_resize is None
    images = np.zeros((3, 16, 16, 3), np.uint8)
    images[0] = 255
    images[1, :, :, 0] = 255  # mean of RGB: 85 -> -1 + 85/127.5
    feats = ext.features(images)
    assert feats.shape == (3, 5)
    x = seen["x"]
    assert x.shape == (3, 1, 16, 16)
    assert torch.allclose(x[0], torch.tensor(1.0)) and torch.allclose(x[2], torch.tensor(-1.0))
    assert torch.allclose(x[1], torch.tensor(85 / 127.5 - 1))
    assert len(ext.describe()["weights_sha256"]) == 64
    assert ext.features(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 5)  # resized to 16


def test_digits_extractor_without_the_toy_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wadi.toy.evaluator", None)  # import fails
    with pytest.raises(ValueError, match="wadi.toy.evaluator"):
        load_extractor("digits")


def test_digits_extractor_with_the_real_toy_classifier(tmp_path):
    evaluator = pytest.importorskip("wadi.toy.evaluator")
    torch.manual_seed(0)
    model = evaluator.DigitClassifier()
    folder = evaluator.save_evaluator(model, tmp_path / "evaluator")
    ext = load_extractor("digits", weights=folder)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    grey = torch.from_numpy(images.mean(-1, dtype=np.float64)).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        expected = model.eval().features(grey).numpy()
    np.testing.assert_allclose(ext.features(images), expected, rtol=1e-5, atol=1e-6)
    assert str(folder) in ext.describe()["model"]


def test_convert_inception_cli(tmp_path, random_inception_state, capsys):
    from wadi.cli import main

    pth = tmp_path / PUBLIC_WEIGHTS_NAME
    torch.save(random_inception_state(seed=4), pth)
    out = tmp_path / "inc.safetensors"
    assert main(["eval", "convert-inception", str(pth), str(out)]) == 0
    assert file_sha256(out) in capsys.readouterr().out
    assert main(["eval", "convert-inception", str(tmp_path / "missing.pth"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pth not found" in err and "pytorch-fid" in err and "\n" not in err


def test_open_clip_path_with_a_stand_in_module(tmp_path, monkeypatch):
    """The open_clip wiring (not a dependency): local .safetensors only, encode_image/text."""
    import sys
    import types

    calls = {}

    class Model(torch.nn.Module):
        def encode_image(self, x):
            return x.flatten(1)[:, :4] + 1.0

        def encode_text(self, tokens):
            return tokens[:, :4].float() + 1.0

    def create(name, pretrained, device):
        calls["create"] = (name, pretrained)
        return (
            Model(),
            None,
            lambda im: torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1),
        )

    fake = types.SimpleNamespace(
        create_model_and_transforms=create,
        get_tokenizer=lambda name: lambda texts: torch.tensor([[len(t)] * 5 for t in texts]),
    )
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    with pytest.raises(FileNotFoundError, match=".safetensors"):
        load_extractor("clip", open_clip_model="ViT-g-14", open_clip_weights=tmp_path / "w.bin")
    with pytest.raises(ValueError, match="--open-clip-weights"):
        load_extractor("clip", open_clip_model="ViT-g-14")
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"weights")
    ext = load_extractor("clip", open_clip_model="ViT-g-14", open_clip_weights=weights)
    assert calls["create"] == ("ViT-g-14", str(weights))
    images = np.full((2, 4, 4, 3), 3, np.uint8)
    assert ext.features(images).shape == (2, 4) and (ext.features(images) == 4.0).all()
    assert (ext.text_features(["ab", "abc"])[:, 0] == [3.0, 4.0]).all()
    info = ext.describe()
    assert info["backend"] == "open_clip" and info["weights_sha256"] == file_sha256(weights)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ValueError, match="open_clip is not installed"):
        load_extractor("clip", open_clip_model="ViT-g-14", open_clip_weights=weights)
