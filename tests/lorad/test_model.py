import copy
import json

import pytest
import torch
from torch import nn

from wadi.lorad import (
    AdapterMismatchError,
    LoRaDConfig,
    adapter_parameters,
    attach,
    count_adapter_parameters,
    disabled,
    load_adapter,
    lorad_layers,
    merge,
    merge_and_unload,
    preset,
    save_adapter,
    set_active,
    unmerge,
    using,
)
from wadi.lorad.layer import LoRaDLayer

from .tiny_models import pixart_inputs, randomize_adapter, tiny_pixart, tiny_unet, unet_inputs


def _names(model, adapter):
    return sorted(n for n, layer in lorad_layers(model) if adapter in layer.lorad_A)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 8)})
        self.head = nn.Linear(8, 3)
        self.conv = nn.Conv2d(2, 4, 3)


def test_target_list_matches_name_suffix_and_exclude_wins():
    model = attach(
        Net(), LoRaDConfig(rank=2, target_modules=["q", "head"], exclude_modules=["head"])
    )
    assert _names(model, "default") == ["encoder.q"]


def test_target_regex_is_full_match_and_conv_opt_in():
    model = attach(
        Net(), LoRaDConfig(rank=2, target_modules=r"encoder\..*|conv", include_conv=True)
    )
    assert _names(model, "default") == ["conv", "encoder.k", "encoder.q"]
    model = attach(Net(), LoRaDConfig(rank=2, target_modules=r"encoder\..*|conv"))
    assert _names(model, "default") == ["encoder.k", "encoder.q"]


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no layer"):
        attach(Net(), LoRaDConfig(rank=2, target_modules=["nothing"]))


def test_freeze_base_and_trainable_count():
    model = attach(Net(), LoRaDConfig(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lorad_" in n for n in trainable)
    # r * (out + in // 2) per Linear: q, k: 2*(8+4), head: 2*(3+4)
    assert count_adapter_parameters(model) == 2 * 12 * 2 + 2 * 7


def test_config_json_round_trip():
    config = LoRaDConfig(
        rank=7, target_modules=["a", "b"], exclude_modules=r"x\..*", include_conv=True
    )
    assert LoRaDConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown LoRaD config keys"):
        LoRaDConfig.from_dict({"rank": 2, "alpha": 3})
    with pytest.raises(ValueError, match="positive integer"):
        LoRaDConfig(rank=0)


def test_two_adapters_switch_disable_and_train_independently():
    model = tiny_unet()
    inputs = unet_inputs()
    # Reference with the base frozen, as attach leaves it: a weight that requires grad
    # can take another CPU kernel (differs by ~4e-7 on some CPUs), and the bitwise
    # claim below is only about the adapter being off, not about autograd's kernel choice.
    model.requires_grad_(False)
    base_out = model(**inputs).sample
    attach(model, preset("sd-unet-student", rank=4), "student")
    attach(model, preset("sd-unet-fake", rank=2), "fake")
    randomize_adapter(model, "student", seed=1)
    randomize_adapter(model, "fake", seed=2)
    # same wrappers hold both adapters; fake excludes proj_in/proj_out/time_emb_proj
    assert set(_names(model, "fake")) < set(_names(model, "student"))
    assert not any(
        n.endswith(("proj_in", "proj_out", "time_emb_proj")) for n in _names(model, "fake")
    )

    with using(model, "student"):
        out_student = model(**inputs).sample
    with using(model, "fake"):
        out_fake = model(**inputs).sample
    with disabled(model):
        out_base = model(**inputs).sample
    assert torch.equal(out_base, base_out)
    assert not torch.allclose(out_student, out_fake)
    assert not torch.allclose(out_student, base_out)

    student_before = [p.detach().clone() for p in adapter_parameters(model, "student")]
    fake_before = [p.detach().clone() for p in adapter_parameters(model, "fake")]
    opt = torch.optim.SGD(adapter_parameters(model, "fake"), lr=0.1)
    with using(model, "fake"):
        model(**inputs).sample.square().mean().backward()
    assert all(p.grad is None for p in adapter_parameters(model, "student"))
    opt.step()
    assert all(
        torch.equal(a, b) for a, b in zip(student_before, adapter_parameters(model, "student"))
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(fake_before, adapter_parameters(model, "fake"))
    )
    with disabled(model):
        assert torch.equal(model(**inputs).sample, base_out)


def test_merge_unmerge_round_trip():
    model = tiny_unet()
    inputs = unet_inputs()
    attach(model, preset("sd-unet-student", rank=4), "student")
    randomize_adapter(model, "student")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lorad" not in n}
    adapted = model(**inputs).sample
    merge(model, "student")
    torch.testing.assert_close(model(**inputs).sample, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        with disabled(model):
            model(**inputs)
    unmerge(model, "student")
    for n, p in model.named_parameters():
        if "lorad" not in n:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["unet", "pixart"])
def test_merge_and_unload_equals_adapted_model(kind):
    if kind == "unet":
        model, inputs, pre = tiny_unet(), unet_inputs(), "sd-unet-student"
        run = lambda m: m(**inputs).sample  # noqa: E731
    else:
        model, inputs, pre = tiny_pixart(), pixart_inputs(), "pixart-student"
        run = lambda m: m(**inputs).sample  # noqa: E731
    attach(model, preset(pre, rank=4), "student")
    attach(model, preset(pre.replace("student", "fake"), rank=2), "fake")
    randomize_adapter(model, "student")
    randomize_adapter(model, "fake", seed=3)
    set_active(model, "student")
    adapted = run(model).detach()
    plain = merge_and_unload(copy.deepcopy(model), "student")
    assert not any(isinstance(m, LoRaDLayer) for m in plain.modules())
    assert not any("lorad" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(run(plain), adapted, rtol=1e-5, atol=1e-5)
    # the merged model saves and loads as a stock diffusers model
    assert type(plain).__name__ in ("UNet2DConditionModel", "PixArtTransformer2DModel")


def test_merged_model_round_trips_through_save_pretrained(tmp_path):
    from diffusers import UNet2DConditionModel

    model = tiny_unet()
    inputs = unet_inputs()
    attach(model, preset("sd-unet-student", rank=4), "student")
    randomize_adapter(model, "student")
    adapted = model(**inputs).sample.detach()
    merge_and_unload(model, "student").save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(loaded(**inputs).sample, adapted, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = tiny_unet()
    inputs = unet_inputs()
    attach(model, preset("sd-unet-student", rank=4), "student")
    randomize_adapter(model, "student")
    expected = model(**inputs).sample.detach()
    save_adapter(model, tmp_path / "adapter", "student")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["adapter_type"] == "lorad"

    fresh = tiny_unet()
    load_adapter(fresh, tmp_path / "adapter", "student")
    assert torch.equal(fresh(**inputs).sample, expected)
    # only angle factors are stored
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lorad_A", ".lorad_B")) for k in keys)
    assert len(keys) == 2 * len(_names(fresh, "student"))


def test_load_into_other_architecture_names_module_and_shapes(tmp_path):
    model = tiny_unet()
    attach(model, preset("sd-unet-student", rank=4), "student")
    save_adapter(model, tmp_path / "adapter", "student")
    other = tiny_unet()
    # a wider model: same names, other shapes
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel.from_config({**dict(other.config), "block_out_channels": (16, 32)})
    before = {n: p.detach().clone() for n, p in wider.named_parameters()}
    with pytest.raises(
        AdapterMismatchError, match=r"module down_blocks\..* expected shape \[\d+, 4\], found"
    ):
        load_adapter(wider, tmp_path / "adapter", "student")
    # nothing was attached or changed
    assert not any(isinstance(m, LoRaDLayer) for m in wider.modules())
    assert all(torch.equal(p, before[n]) for n, p in wider.named_parameters())
    with pytest.raises(AdapterMismatchError, match="found none|no such layer"):
        load_adapter(tiny_pixart(), tmp_path / "adapter", "student")


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        load_adapter(tiny_unet(), tmp_path / "nope")


def test_save_does_not_leave_partial_files_on_failure(tmp_path, monkeypatch):
    model = tiny_unet()
    attach(model, preset("sd-unet-student", rank=4), "student")
    save_adapter(model, tmp_path / "a", "student")
    good = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import wadi.lorad.io as lio

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lio, "save_file", boom)
    randomize_adapter(model, "student")
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a", "student")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_select_layers_is_the_one_matching_rule_for_plain_and_wrapped_models():
    """attach, adapter loading and the baselines share it: same names before and after wrapping."""
    from wadi.lorad import select_layers

    model = tiny_unet()
    fake_cfg = preset("sd-unet-fake", rank=2)
    before = [name for name, _ in select_layers(model, fake_cfg)]
    assert before and not any(n.endswith(("proj_in", "proj_out", "time_emb_proj")) for n in before)
    attach(model, preset("sd-unet-student", rank=2), "student")
    after = select_layers(model, fake_cfg)
    assert [name for name, _ in after] == before
    assert all(isinstance(layer, torch.nn.Linear) for _, layer in after)  # the base layers
    assert set(before) < {name for name, _ in select_layers(model, preset("sd-unet-student"))}
