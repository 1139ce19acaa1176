"""Reading every input format one tensor at a time, LoRaD adapters, mismatch errors, the writer."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wadi.analysis.report import (
    analyze,
    check_compatible,
    is_layer_weight,
    natural_key,
    select_layers,
)
from wadi.analysis.sources import open_source
from wadi.analysis.swap import StreamingSafetensorsWriter

from .conftest import tiny_unet


def _state(source):
    return {k: source.get(k) for k in source.keys()}


def test_model_folder_pipeline_and_single_file_read_the_same(tmp_path, teacher_dir):
    with open_source(teacher_dir) as folder:
        ref = _state(folder)
        assert folder.layout.kind == "model"
    pipe = tmp_path / "pipe"
    shutil.copytree(teacher_dir, pipe / "unet")
    (pipe / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]})
    )
    single = tmp_path / "weights.safetensors"
    shutil.copy(teacher_dir / "diffusion_pytorch_model.safetensors", single)
    for path, kind in ((pipe, "pipeline"), (pipe / "unet", "model"), (single, "file")):
        with open_source(path) as src:
            assert src.layout.kind == kind
            got = _state(src)
            assert got.keys() == ref.keys()
            assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_sharded_folder(tmp_path):
    model = tiny_unet(3)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    with open_source(tmp_path / "sharded") as src:
        got = _state(src)
    want = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_variant_folder_needs_the_flag(tmp_path):
    tiny_unet(0).save_pretrained(tmp_path / "m", safe_serialization=True, variant="fp16")
    with pytest.raises(FileNotFoundError, match="--variant fp16"):
        open_source(tmp_path / "m")
    with open_source(tmp_path / "m", variant="fp16") as src:
        assert len(src.keys()) > 10


def test_bad_inputs_have_clear_errors(tmp_path, teacher_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_source(tmp_path / "nope")
    pickle_file = tmp_path / "model.bin"
    pickle_file.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle-based"):
        open_source(pickle_file)
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="pickle-based"):
        open_source(folder)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        open_source(junk)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--student-adapter"):
        open_source(adapter)
    with pytest.raises(FileNotFoundError, match="not a wadi LoRaD adapter"):
        open_source(teacher_dir, tmp_path / "nope")


def _lorad_student(tmp_path, teacher_dir, seed=0):
    """A LoRaD adapter with random angles on every Linear of the tiny U-Net, and its merged model."""
    from diffusers import UNet2DConditionModel

    from wadi.lorad import LoRaDConfig, attach, merge_and_unload, save_adapter

    model = UNet2DConditionModel.from_pretrained(teacher_dir).eval()
    attach(model, LoRaDConfig(rank=2), "student")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lorad_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_adapter(model, tmp_path / "adapter", "student")
    merged = merge_and_unload(model, "student")
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    return tmp_path / "adapter", tmp_path / "merged"


def test_adapter_source_matches_the_merged_model(tmp_path, teacher_dir):
    adapter, merged = _lorad_student(tmp_path, teacher_dir)
    with open_source(teacher_dir, adapter) as src, open_source(merged) as ref:
        assert src.keys() == ref.keys()
        assert len(src.adapted_keys) > 5
        for key in src.keys():
            torch.testing.assert_close(src.get(key), ref.get(key), rtol=1e-6, atol=1e-6)
    with open_source(teacher_dir) as t, open_source(teacher_dir, adapter) as s:
        report = analyze(t, s, svd=False)
    adapted = {k[: -len(".weight")] for k in s.adapted_keys}
    for layer in report.layers:
        assert layer.norm_change_mean < 1e-4  # float32 rounding only: rotation keeps norms
        if layer.name in adapted:
            assert layer.direction_change_mean > 1e-3
        else:
            assert layer.direction_change_mean == 0.0


def test_adapter_that_does_not_fit_is_refused(tmp_path, teacher_dir):
    adapter, _ = _lorad_student(tmp_path, teacher_dir)
    factors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in factors if k.endswith("lorad_B"))
    factors[key] = torch.zeros(2, 3)
    factors["not_in_model.lorad_A"] = torch.zeros(2, 2)
    factors["not_in_model.lorad_B"] = torch.zeros(2, 2)
    save_file(factors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"does not fit .*\(2 problems\).*not_in_model"):
        open_source(teacher_dir, adapter)


def test_layer_selection():
    assert is_layer_weight("a.to_q.weight", (4, 4))
    assert is_layer_weight("a.conv1.weight", (4, 4, 3, 3))
    assert not is_layer_weight("a.to_q.bias", (4,))
    assert not is_layer_weight("a.norm1.weight", (4,))
    assert not is_layer_weight("text.token_embedding.weight", (100, 4))
    assert not is_layer_weight("a.conv3d.weight", (4, 4, 3, 3, 3))
    assert is_layer_weight("time_embedding.linear_1.weight", (4, 4))
    shapes = {"a.weight": (2, 2), "b.weight": (2, 2), "c.weight": (2, 2)}
    assert select_layers(shapes, shapes.get, include="a|b", exclude="b") == ["a.weight"]
    mixed = {"lin.weight": (2, 2), "conv.weight": (2, 2, 1, 1)}
    assert select_layers(mixed, mixed.get) == ["lin.weight", "conv.weight"]
    assert select_layers(mixed, mixed.get, linear_only=True) == ["lin.weight"]
    with pytest.raises(ValueError, match="--include"):
        select_layers(shapes, shapes.get, include="(")


def test_mismatch_lists_the_first_mismatches(tmp_path, teacher_dir):
    state = load_file(teacher_dir / "diffusion_pytorch_model.safetensors")
    keys = [k for k in state if is_layer_weight(k, tuple(state[k].shape))]
    state[keys[0]] = torch.zeros(3, 3)
    del state[keys[1]]
    state["extra.linear.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "other.safetensors")
    with open_source(teacher_dir) as t, open_source(tmp_path / "other.safetensors") as s:
        lt = select_layers(t.keys(), t.shape)
        ls = select_layers(s.keys(), s.shape)
        with pytest.raises(ValueError) as err:
            check_compatible(t, s, lt, ls)
    msg = str(err.value)
    assert "(3 mismatches)" in msg
    assert (
        f"{keys[0]} is {list(load_file(teacher_dir / 'diffusion_pytorch_model.safetensors')[keys[0]].shape)}"
        in msg
    )
    assert f"{keys[1]} only in the teacher" in msg
    assert "extra.linear.weight only in the student" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "tensors",
    [
        {
            "b": torch.randn(3, 4),
            "a": torch.randn(2, 2, 3, 3).to(torch.bfloat16),
            "h": torch.randn(5).half(),
            "i": torch.arange(7),
            "m": torch.tensor([True, False, True]),
            "s": torch.tensor(3.5, dtype=torch.float64),
            "e": torch.zeros(0, 4),
        }
    ],
)
def test_streaming_writer_round_trips(tmp_path, tensors):
    from wadi.analysis.swap import DTYPE_NAMES

    specs = [(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    for k, v in tensors.items():
        writer.write(k, v)
    assert not (tmp_path / "x.safetensors").exists()  # only after close
    writer.close()
    got = load_file(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_streaming_writer_refuses_wrong_tensors_and_leaves_nothing(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (2,))])
    with pytest.raises(ValueError, match="expected tensor a F32 \\[2\\]"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="only 0 of 1"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_analysis_streams_matching_numpy(teacher_dir, student_dir):
    """The streamed layer numbers equal a direct numpy computation on the loaded weights."""
    from .reference import cumulative_energy_ref, direction_change_ref, norm_change_ref

    with open_source(teacher_dir) as t, open_source(student_dir) as s:
        report = analyze(t, s, energy_fraction=0.3)
    wt = load_file(teacher_dir / "diffusion_pytorch_model.safetensors")
    ws = load_file(student_dir / "diffusion_pytorch_model.safetensors")
    names = [k[: -len(".weight")] for k in wt if is_layer_weight(k, tuple(wt[k].shape))]
    assert sorted(x.name for x in report.layers) == sorted(names)
    assert [x.name for x in report.layers] == sorted(names, key=natural_key)
    for layer in report.layers:
        a, b = wt[layer.name + ".weight"].numpy(), ws[layer.name + ".weight"].numpy()
        assert layer.norm_change_mean == pytest.approx(norm_change_ref(a, b).mean() * 100, rel=1e-9)
        dc = direction_change_ref(a, b)
        assert layer.direction_change_mean == pytest.approx(dc.mean() * 100, rel=1e-6)
        energy = cumulative_energy_ref(a, b)
        k = max(1, int(np.ceil(0.3 * min(a.shape[0], a[0].size) - 1e-9)))
        assert layer.energy_at_fraction == pytest.approx(energy[k - 1] * 100, rel=1e-9)


def test_without_swaps_only_layer_weights_are_read(teacher_dir, student_dir):
    read = []
    with open_source(teacher_dir) as t, open_source(student_dir) as s:
        real_get = s.get
        s.get = lambda key: read.append(key) or real_get(key)
        report = analyze(t, s, svd=False)
    assert sorted(read) == sorted(x.name + ".weight" for x in report.layers)
    assert any(k.endswith("norm1.weight") for k in report.skipped)
    assert not any(k.endswith(".bias") for k in report.skipped)
