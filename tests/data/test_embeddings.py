"""`wadi embed` round trip: stored embeddings equal Backbone.encode_prompts exactly."""

import errno
import json
import os
import pickle

import pytest
import torch

from wadi.backbones import load_backbone
from wadi.cli import main
from wadi.data import EmbeddingStore, write_embeddings
from wadi.testing import make_tiny_pixart, make_tiny_sd

PROMPTS = [
    f"a photo of {n} {w}"
    for n, w in zip(range(7), ["cat", "dog", "car", "tree", "house", "cat", "red"])
]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"sd": make_tiny_sd(root / "sd"), "pixart": make_tiny_pixart(root / "pixart")}


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_round_trip_equals_encode_prompts(teachers, tmp_path, name):
    backbone = load_backbone(teachers[name])
    out = write_embeddings(backbone, PROMPTS, tmp_path / "emb", shard_size=3, batch_size=2,
                           progress=False)  # fmt: skip
    assert not list(tmp_path.glob(".emb.*")), "temporary folder left behind"
    store = EmbeddingStore(out)
    assert len(store) == 7 and store.prompts == PROMPTS
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert index["teacher"] == str(teachers[name].resolve()) and index["kind"] == backbone.kind
    # same batches as written (3 per shard, 2 per encoder call): bitwise equal
    for start, stop in [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]:
        ref = backbone.encode_prompts(PROMPTS[start:stop])
        got = store.get(list(range(start, stop)))
        assert torch.equal(got.embeds, ref.embeds)
        assert (got.mask is None) == (name == "sd")
        if got.mask is not None:
            assert torch.equal(got.mask, ref.mask)
    # any order, across shards
    order = torch.tensor([6, 0, 4, 4, 2])
    picked = store.get(order)
    full = store.get(range(7))
    assert torch.equal(picked.embeds, full.embeds[order])
    assert list(index["embeds_shape"]) == list(full.embeds.shape[1:])
    null = store.null(3)
    ref_null = backbone.encode_prompts([""])
    assert len(null) == 3 and torch.equal(null.embeds[2], ref_null.embeds[0])
    if name == "pixart":
        assert torch.equal(null.mask[1], ref_null.mask[0]) and null.mask.sum() == 3
    # picklable for DataLoader workers
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.get([1]).embeds, store.get([1]).embeds)
    with pytest.raises(IndexError):
        store.get([7])


def test_embed_cli_is_atomic_and_refuses_to_overwrite(teachers, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    out = tmp_path / "emb"
    args = ["embed", "--teacher", str(teachers["pixart"]), "--prompts", str(prompts),
            "--out", str(out), "--shard-size", "4", "--batch-size", "3", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert len(EmbeddingStore(out)) == 7
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # a failure half-way leaves the previous folder intact and no temporary folder
    from wadi.backbones.base import Backbone

    calls = {"n": 0}
    original = Backbone.encode_prompts

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(self, batch)

    monkeypatch.setattr(Backbone, "encode_prompts", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        main(args + ["--overwrite"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="written by `wadi embed`"):
        EmbeddingStore(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a wadi embedding index"):
        EmbeddingStore(tmp_path)


def _one_line(err, *needles):
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("embed:")]  # wadi's own bar
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


def test_damaged_shard_is_named_when_the_store_opens(teachers, tmp_path):
    backbone = load_backbone(teachers["sd"])
    out = write_embeddings(backbone, PROMPTS, tmp_path / "emb", shard_size=4, progress=False)
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard} is damaged"):
        EmbeddingStore(out)
    shard.write_bytes(os.urandom(len(data)))
    with pytest.raises(ValueError, match=f"{shard} is damaged"):
        EmbeddingStore(out)


def test_embed_full_disk_is_one_line_and_leaves_nothing(teachers, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "emb"
    real = safetensors.torch.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["embed", "--teacher", str(teachers["sd"]), "--prompts", str(prompts), "--out",
                 str(out), "--shard-size", "3", "--device", "cpu"]) == 2  # fmt: skip
    _one_line(capsys.readouterr().err, f"cannot write {out}: No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"], "partial output left behind"


def test_embed_output_may_not_overlap_its_inputs(teachers, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    for out in (prompts, teachers["sd"], teachers["sd"] / "embeddings"):
        assert main(["embed", "--teacher", str(teachers["sd"]), "--prompts", str(prompts),
                     "--out", str(out), "--overwrite"]) == 2  # fmt: skip
        _one_line(capsys.readouterr().err)
    assert (teachers["sd"] / "unet" / "config.json").is_file()
    assert not (teachers["sd"] / "embeddings").exists() and prompts.read_text().startswith("a")
