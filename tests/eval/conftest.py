"""Shared fixtures: local files of random weights for the extractors (no download)."""

from __future__ import annotations

import pytest
import torch

from wadi.eval.inception import FIDInceptionV3


def _random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full state dict with random values; BN running stats kept sane."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif key.endswith("bn.weight"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:  # conv weights, He-like scale so activations neither vanish nor explode
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    state = _random_inception_state()
    # the public file also carries the 1008-way classifier: it must be ignored
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    save_file(state, str(path))
    return path


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from wadi.testing import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(folder / "tok", words=["a", "photo", "depicts", "cat"])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tokenizer.vocab_size + 2,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    return _tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def random_inception_state():
    """``make(seed) -> state dict`` of random FID Inception-v3 weights."""
    return _random_inception_state


@pytest.fixture()
def read_only(monkeypatch):
    """``make(folder)``: a folder nothing can be written into, also when tests run as root.

    chmod 0o555 is the real fault; root ignores it, so for root the calls that create
    entries (``tempfile.mkstemp``/``mkdtemp``, ``os.mkdir``) are refused inside those
    folders with the PermissionError the kernel gives everyone else.
    """
    import errno
    import os
    import tempfile
    from pathlib import Path

    folders: list[Path] = []

    def inside(path) -> bool:
        path = Path(path).resolve()
        return any(path == f or f in path.parents for f in folders)

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    if os.geteuid() == 0:
        mkstemp, mkdtemp, mkdir = tempfile.mkstemp, tempfile.mkdtemp, os.mkdir

        def guarded_mkstemp(*args, dir=None, **kwargs):
            if dir is not None and inside(dir):
                refuse(dir)
            return mkstemp(*args, dir=dir, **kwargs)

        def guarded_mkdtemp(*args, dir=None, **kwargs):
            if dir is not None and inside(dir):
                refuse(dir)
            return mkdtemp(*args, dir=dir, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            if inside(Path(path).parent):
                refuse(path)
            return mkdir(path, *args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", guarded_mkstemp)
        monkeypatch.setattr(tempfile, "mkdtemp", guarded_mkdtemp)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)
