"""PickScore and HPSv2 from stand-in models built from configs, against float64 references.

HPSv2's stand-in is an open_clip-layout state dict (``visual.conv1.weight``,
``transformer.resblocks.0.attn.in_proj_weight``...) of random values; the reference is an
independent float64 forward pass of open_clip's ViT CLIP written from that layout with
``torch.nn.functional`` (packed attention through ``F.multi_head_attention_forward``, exact
GELU, causal text mask, end-of-text pooling by ``argmax`` of the token ids).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wadi.cli import main
from wadi.eval.preference import (
    load_hpsv2,
    open_clip_to_transformers,
    preference_probability,
    scaled_cosine,
)
from wadi.eval.protocol import load_image

CAPTIONS = ["a cat", "a photo of a cat", "a dog", "two cats", "a red photo"]


def test_scaled_cosine_and_preference_probability_by_hand():
    img = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])
    # cosines 24/25, -1, 1/sqrt(2)
    expected = 100.0 * np.array([24 / 25, -1.0, 2**-0.5])
    np.testing.assert_allclose(scaled_cosine(img, txt, 100.0), expected, rtol=1e-14)
    # P(a over b) = e^a / (e^a + e^b): equal scores 1/2; a - b = ln 3 gives 3/4
    a, b = np.array([21.0, 20.0 + np.log(3.0), 0.0]), np.array([21.0, 20.0, 800.0])
    assert preference_probability(a, b) == pytest.approx((0.5 + 0.75 + 0.0) / 3, abs=1e-14)
    assert preference_probability(b, a) == pytest.approx(1 - (0.5 + 0.75) / 3, abs=1e-14)
    with pytest.raises(ValueError, match="same prompts"):
        preference_probability([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="must be equal"):
        scaled_cosine(img, txt[:2], 1.0)


def _open_clip_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in open_clip's ViT CLIP layout, shaped by a transformers CLIPConfig."""
    gen = torch.Generator().manual_seed(seed)
    t, v, e = config.text_config, config.vision_config, config.projection_dim

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def ln(prefix, width):
        return {f"{prefix}.weight": 1 + rnd(width, scale=0.1), f"{prefix}.bias": rnd(width)}

    def blocks(prefix, width, mlp, layers):
        out = {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            out |= ln(f"{p}.ln_1", width) | ln(f"{p}.ln_2", width)
            out[f"{p}.attn.in_proj_weight"] = rnd(3 * width, width)
            out[f"{p}.attn.in_proj_bias"] = rnd(3 * width)
            out[f"{p}.attn.out_proj.weight"] = rnd(width, width)
            out[f"{p}.attn.out_proj.bias"] = rnd(width)
            out[f"{p}.mlp.c_fc.weight"] = rnd(mlp, width)
            out[f"{p}.mlp.c_fc.bias"] = rnd(mlp)
            out[f"{p}.mlp.c_proj.weight"] = rnd(width, mlp)
            out[f"{p}.mlp.c_proj.bias"] = rnd(width)
        return out

    grid = v.image_size // v.patch_size
    state = {
        "logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float32),
        "token_embedding.weight": rnd(t.vocab_size, t.hidden_size),
        "positional_embedding": rnd(t.max_position_embeddings, t.hidden_size),
        "text_projection": rnd(t.hidden_size, e),
        "visual.class_embedding": rnd(v.hidden_size),
        "visual.positional_embedding": rnd(grid * grid + 1, v.hidden_size),
        "visual.conv1.weight": rnd(v.hidden_size, 3, v.patch_size, v.patch_size, scale=0.05),
        "visual.proj": rnd(v.hidden_size, e),
    }
    state |= ln("ln_final", t.hidden_size) | ln("visual.ln_pre", v.hidden_size)
    state |= ln("visual.ln_post", v.hidden_size)
    state |= blocks("transformer", t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    state |= blocks("visual.transformer", v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    return state


def _resblock(x, p, prefix, heads, mask=None):
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), p[f"{prefix}.ln_1.weight"], p[f"{prefix}.ln_1.bias"], 1e-5)
    h = h.transpose(0, 1)  # (L, N, E): nn.MultiheadAttention's layout
    a, _ = F.multi_head_attention_forward(
        h, h, h, width, heads, p[f"{prefix}.attn.in_proj_weight"],
        p[f"{prefix}.attn.in_proj_bias"], None, None, False, 0.0,
        p[f"{prefix}.attn.out_proj.weight"], p[f"{prefix}.attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=mask,
    )  # fmt: skip
    x = x + a.transpose(0, 1)
    h = F.layer_norm(x, (width,), p[f"{prefix}.ln_2.weight"], p[f"{prefix}.ln_2.bias"], 1e-5)
    h = F.linear(h, p[f"{prefix}.mlp.c_fc.weight"], p[f"{prefix}.mlp.c_fc.bias"])
    return x + F.linear(F.gelu(h), p[f"{prefix}.mlp.c_proj.weight"], p[f"{prefix}.mlp.c_proj.bias"])


def _open_clip_reference(state, config, pixels, tokens):
    """float64 open_clip ViT CLIP: image and text embeddings (not normalised)."""
    p = {k: v.double() for k, v in state.items()}
    v, t = config.vision_config, config.text_config
    x = F.conv2d(pixels.double(), p["visual.conv1.weight"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)  # (B, grid^2, W)
    cls = p["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + p["visual.positional_embedding"]
    x = F.layer_norm(x, (v.hidden_size,), p["visual.ln_pre.weight"], p["visual.ln_pre.bias"])
    for i in range(v.num_hidden_layers):
        x = _resblock(x, p, f"visual.transformer.resblocks.{i}", v.num_attention_heads)
    pooled = F.layer_norm(
        x[:, 0], (v.hidden_size,), p["visual.ln_post.weight"], p["visual.ln_post.bias"]
    )
    image = pooled @ p["visual.proj"]

    n = tokens.shape[1]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    x = p["token_embedding.weight"][tokens] + p["positional_embedding"][:n]
    for i in range(t.num_hidden_layers):
        x = _resblock(x, p, f"transformer.resblocks.{i}", t.num_attention_heads, mask)
    x = F.layer_norm(x, (t.hidden_size,), p["ln_final.weight"], p["ln_final.bias"])
    text = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ p["text_projection"]
    return image, text


def _open_clip_tokens(tokenizer, texts, context=77):
    """open_clip's tokens: start, BPE, end, zeros up to the context length."""
    ids = tokenizer(list(texts), padding="max_length", max_length=context)["input_ids"]
    out = torch.zeros(len(ids), context, dtype=torch.long)
    for row, seq in enumerate(ids):
        end = seq.index(tokenizer.eos_token_id)
        out[row, : end + 1] = torch.tensor(seq[: end + 1])
    return out


def _write_images(folder, n, size=40, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def hpsv2_file(clip_folder, tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(clip_folder)
    path = tmp_path_factory.mktemp("hpsv2") / "HPS_v2.1.safetensors"
    save_file(_open_clip_state(config), str(path))
    return path


def test_open_clip_key_map_places_every_tensor_once(clip_folder):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(clip_folder)
    state = _open_clip_state(config, seed=1)
    mapped = open_clip_to_transformers(state)
    with torch.device("meta"):
        target = CLIPModel(config).state_dict()
    assert set(mapped) == set(target)
    for key, tensor in mapped.items():
        assert tuple(tensor.shape) == tuple(target[key].shape), key
    # every value of the source appears exactly once: same total size, same multiset
    assert sum(t.numel() for t in mapped.values()) == sum(t.numel() for t in state.values())
    source = torch.sort(torch.cat([t.reshape(-1) for t in state.values()])).values
    dest = torch.sort(torch.cat([t.reshape(-1) for t in mapped.values()])).values
    assert torch.equal(source, dest)
    # q | k | v rows of the packed projection, and the transposed projections
    packed = state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    layer = "vision_model.encoder.layers.1.self_attn"
    rebuilt = torch.cat([mapped[f"{layer}.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(rebuilt, packed)
    assert torch.equal(mapped["text_projection.weight"], state["text_projection"].T)
    # a DDP prefix is dropped; a key of another layout is refused by name
    ddp = open_clip_to_transformers({f"module.{k}": v for k, v in state.items()})
    assert set(ddp) == set(mapped)
    with pytest.raises(ValueError, match="'logit_bias'"):
        open_clip_to_transformers({**state, "logit_bias": torch.zeros(())})


def test_hpsv2_matches_float64_open_clip_forward(clip_folder, hpsv2_file, tmp_path):
    from safetensors.torch import load_file

    scorer = load_hpsv2(hpsv2_file, clip_folder)
    paths = _write_images(tmp_path / "gen", len(CAPTIONS))
    images = np.stack([load_image(p, None) for p in paths])
    img, txt = scorer.features(images), scorer.text_features(CAPTIONS)
    got = scorer.scores(img, txt)

    pixels = scorer.processor.image_processor(
        images=[Image.fromarray(a) for a in images], return_tensors="pt"
    )["pixel_values"]
    assert pixels.shape[-2:] == (32, 32)
    tokens = _open_clip_tokens(scorer.processor.tokenizer, CAPTIONS)
    ref_img, ref_txt = _open_clip_reference(
        load_file(str(hpsv2_file)), scorer.model.config, pixels, tokens
    )
    cos = F.cosine_similarity(ref_img, ref_txt, dim=-1).numpy()
    np.testing.assert_allclose(got, 100.0 * cos, rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 1.0  # the pairs really differ: the check has teeth
    assert scorer.model.config.vision_config.hidden_act == "gelu"  # config said quick_gelu


def _pickscore_reference(folder, paths, captions):
    """float64 PickScore as its model card computes it."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).double().eval()
    processor = CLIPProcessor.from_pretrained(folder)
    pil = [Image.fromarray(load_image(p, None)) for p in paths]
    with torch.no_grad():
        pix = processor(images=pil, return_tensors="pt")["pixel_values"].double()
        tok = processor(text=captions, padding=True, truncation=True, max_length=77,
                        return_tensors="pt")  # fmt: skip
        img = model.get_image_features(pixel_values=pix)
        txt = model.get_text_features(**tok)
        img = img if hasattr(img, "shape") else img.pooler_output
        txt = txt if hasattr(txt, "shape") else txt.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (img * txt).sum(-1)).numpy()


def test_score_cli_records_pickscore_and_hpsv2(clip_folder, hpsv2_file, tmp_path, capsys):
    paths = _write_images(tmp_path / "gen", len(CAPTIONS), seed=3)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    args = [
        "eval", "score", "--protocol", "custom", "--captions", str(captions),
        "--images", str(tmp_path / "gen"), "--metrics", "pickscore",
        "--pickscore", str(clip_folder), "--hpsv2", str(hpsv2_file), "--clip-h", str(clip_folder),
        "--no-cache", "--batch-size", "2", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    record = json.loads((tmp_path / "gen" / "scores.json").read_text())
    assert set(record["results"]) == {"pickscore", "hpsv2"}

    ref = _pickscore_reference(clip_folder, paths, CAPTIONS)
    assert record["results"]["pickscore"] == pytest.approx(ref.mean(), rel=1e-5)
    assert record["pickscore"]["std"] == pytest.approx(ref.std(ddof=1), rel=1e-4)
    np.testing.assert_allclose(record["pickscore"]["per_image"], ref, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    saved = load_file(str(clip_folder / "model.safetensors"))["logit_scale"].double()
    assert record["pickscore"]["scale"] == pytest.approx(float(saved.exp()), rel=1e-12)
    assert "logit_scale.exp()" in record["pickscore"]["score"]

    scorer = load_hpsv2(hpsv2_file, clip_folder)
    images = np.stack([load_image(p, None) for p in paths])
    expected = scorer.scores(scorer.features(images), scorer.text_features(CAPTIONS)).mean()
    assert record["results"]["hpsv2"] == pytest.approx(expected, rel=1e-5)
    assert record["hpsv2"]["scale"] == 100.0 and len(record["hpsv2"]["weights_sha256"]) == 64
    assert "pickscore" in capsys.readouterr().out


def _err(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


def test_missing_or_pickled_weights_are_one_line(clip_folder, hpsv2_file, tmp_path, capsys):
    _write_images(tmp_path / "gen", 2)
    captions = tmp_path / "c.txt"
    captions.write_text("a cat\na dog\n")
    base = ["eval", "score", "--protocol", "custom", "--captions", str(captions),
            "--images", str(tmp_path / "gen"), "--metrics", "", "--no-cache"]  # fmt: skip

    rc, err = _err(base + ["--pickscore", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "yuvalkirstain/PickScore_v1" in err and "\n" not in err
    no_weights = tmp_path / "pick"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((clip_folder / "config.json").read_text())
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    rc, err = _err(base + ["--pickscore", str(no_weights)], capsys)
    assert rc == 2 and "model.safetensors" in err and "\n" not in err
    # weights but no processor beside them and no --clip-h
    (no_weights / "model.safetensors").write_bytes((clip_folder / "model.safetensors").read_bytes())
    rc, err = _err(base + ["--pickscore", str(no_weights)], capsys)
    assert rc == 2 and "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in err and "\n" not in err

    pickled = tmp_path / "HPS_v2.1_compressed.pt"
    pickled.write_bytes(b"pickle")
    rc, err = _err(base + ["--hpsv2", str(pickled), "--clip-h", str(clip_folder)], capsys)
    assert rc == 2 and "does not unpickle" in err and "docs/eval.md" in err
    rc, err = _err(base + ["--hpsv2", str(tmp_path / "no.safetensors")], capsys)
    assert rc == 2 and "xswu/HPSv2" in err and "\n" not in err
    rc, err = _err(base + ["--hpsv2", str(hpsv2_file)], capsys)
    assert rc == 2 and "--clip-h" in err and "\n" not in err
    rc, err = _err(base + ["--metrics", "hpsv2"], capsys)
    assert rc == 2 and "--hpsv2 FILE" in err

    # a state dict of another size than the config: named, one line
    from safetensors.torch import load_file, save_file

    state = load_file(str(hpsv2_file))
    state["visual.proj"] = torch.zeros(32, 8)
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    with pytest.raises(ValueError, match=r"visual_projection.weight is \(8, 32\)"):
        load_hpsv2(other, clip_folder)
