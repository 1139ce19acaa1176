"""ReVersion relation inversion (``wadi invert-relation``) and ``wadi generate --embedding``."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export import export_student
from wadi.cli import main
from wadi.relation import add_token_embeddings, read_embedding, save_embedding
from wadi.relation.invert import RelationConfig, invert_relation
from wadi.relation.losses import (
    PREPOSITIONS,
    focal_weights,
    sample_focal_timesteps,
    steer_loss,
)
from wadi.testing import attach_random_adapter, make_tiny_sd

torch.set_num_threads(1)

CAPTIONS = "cat <R> tree\ndog <R> house\na red car <R> the tree\n"


def _config(setup, out, **changes):
    knobs = dict(
        base=str(setup["sd"]), images=str(setup["images"]), prompts=str(setup["captions"]),
        output_dir=str(out), init_word="cat", max_steps=4, checkpoint_every=2,
        batch_size=1, gradient_accumulation_steps=2,
        contrastive_weight=0.5, progress=False, device="cpu",
    )  # fmt: skip
    knobs.update(changes)
    return RelationConfig(**knobs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("relation")
    sd = make_tiny_sd(root / "sd")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    captions = root / "captions.txt"
    captions.write_text(CAPTIONS)
    b = load_backbone(sd, load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=5)
    adapter = lorad.save_adapter(b.denoiser, root / "adapter", "student")
    student = export_student(sd, adapter, root / "student")
    s = {"root": root, "sd": sd, "images": images, "captions": captions,
         "adapter": adapter, "student": student}  # fmt: skip
    s["run"] = invert_relation(_config(s, root / "run"))
    return s


def test_only_the_new_row_changes_bitwise(setup):
    run = setup["run"]
    fresh = load_backbone(setup["sd"])
    trained = run.backbone
    table = trained.text_encoder.get_input_embeddings().weight
    before = fresh.text_encoder.get_input_embeddings().weight
    vocab = before.shape[0]
    assert run.token_id == vocab and table.shape[0] == vocab + 1
    assert torch.equal(table[:vocab], before)  # every old row bitwise
    assert torch.equal(table[run.token_id], run.vector)  # the learned row, in the table
    init = before[fresh.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert (run.vector - init).abs().max() > 1e-3  # it was trained away from the init word
    for name in ("text_encoder", "denoiser", "vae"):
        a, b = getattr(trained, name).state_dict(), getattr(fresh, name).state_dict()
        assert set(a) == set(b)
        for key in a:
            if key.endswith("token_embedding.weight"):
                continue
            assert torch.equal(a[key], b[key]), (name, key)
    # what was written: diffusers' textual-inversion layout, the learned row
    saved = load_file(str(run.embedding_path))
    assert list(saved) == ["<R>"] and saved["<R>"].shape == (1, 16)
    assert torch.equal(saved["<R>"][0], run.vector)
    summary = json.loads((run.final_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["token"] == "<R>"
    assert all(h["steer"] > 0 for h in run.history)  # the contrastive term was on


def test_steer_loss_against_a_float64_hand_computation():
    r = [1.0, 2.0, 0.0]
    pos = [[1.0, 0.0, 0.0], [0.0, 3.0, 1.0]]
    neg = [[-1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [2.0, 1.0, 1.0]]
    tau = 0.07

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def lse(values):
        m = max(values)
        return m + math.log(sum(math.exp(v - m) for v in values))

    logits = [cos(r, e) / tau for e in pos + neg]
    expected = lse(logits) - lse(logits[:2])
    relation = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor(pos, dtype=torch.float64, requires_grad=True)
    value = steer_loss(relation, positives, torch.tensor(neg, dtype=torch.float64), tau)
    assert value.dtype == torch.float64
    assert abs(value.item() - expected) < 1e-12
    value.backward()
    assert relation.grad is not None and relation.grad.abs().sum() > 0
    assert positives.grad is None  # only <R> is pulled
    # a small step against the gradient: lower loss, closer to the nearest positive (the one
    # the multi-instance softmax weights most), further from the nearest negative
    moved = (relation - 1e-3 * relation.grad).detach()
    p_t, n_t = positives.detach(), torch.tensor(neg, dtype=torch.float64)

    def cosines(v, rows):
        return torch.nn.functional.cosine_similarity(rows, v[None], dim=1)

    r0 = relation.detach()
    near_p, near_n = cosines(r0, p_t).argmax(), cosines(r0, n_t).argmax()
    assert cosines(moved, p_t)[near_p] > cosines(r0, p_t)[near_p]
    assert cosines(moved, n_t)[near_n] < cosines(r0, n_t)[near_n]
    assert steer_loss(moved, p_t, n_t, tau) < value.detach()
    # pointing at a positive costs less than pointing at a negative; no negatives: 0
    at_pos = steer_loss(torch.tensor(pos[0]), positives.detach(), torch.tensor(neg), tau)
    at_neg = steer_loss(torch.tensor(neg[0]), positives.detach(), torch.tensor(neg), tau)
    assert at_pos < at_neg
    assert steer_loss(relation, positives, torch.zeros(0, 3, dtype=torch.float64), tau) == 0


def test_focal_sampling_weights_large_timesteps():
    T, alpha = 1000, 0.5
    w = focal_weights(T, alpha)
    t = torch.arange(T, dtype=torch.float64)
    hand = 1 - alpha * torch.cos(math.pi * t / T)
    assert torch.allclose(w, hand / hand.sum(), rtol=0, atol=1e-15)
    assert abs(w[-1] / w[0] - (1 + alpha * math.cos(math.pi / T)) / (1 - alpha)) < 1e-9
    assert torch.allclose(
        focal_weights(T, 0.0), torch.full((T,), 1 / T, dtype=torch.float64), rtol=0, atol=1e-18
    )
    n = 200_000
    draws = sample_focal_timesteps(n, w, torch.Generator().manual_seed(0)).double()
    exact_mean = float((w * t).sum())  # 500 - ... : above the uniform 499.5
    se = math.sqrt(float((w * (t - exact_mean) ** 2).sum()) / n)  # about 0.6
    assert exact_mean > 560
    assert abs(draws.mean().item() - exact_mean) < 6 * se
    upper = float(w[T // 2 :].sum())  # 0.5 + alpha / pi = 0.659
    assert abs((draws >= T // 2).double().mean().item() - upper) < 0.006
    hist = torch.bincount(draws.long(), minlength=T).double().reshape(10, 100).sum(1) / n
    assert torch.allclose(hist, w.reshape(10, 100).sum(1), atol=0.005)


def test_embedding_loads_into_a_stock_pipeline_and_encodes_as_wadi(setup):
    from diffusers import StableDiffusionPipeline

    path = setup["run"].embedding_path
    pipe = StableDiffusionPipeline.from_pretrained(setup["sd"])
    pipe.load_textual_inversion(str(path))
    prompt = "cat <R> tree"
    stock = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    backbone = load_backbone(setup["sd"])
    token, vector = read_embedding(path)
    (token_id,) = add_token_embeddings(backbone.tokenizer, backbone.text_encoder, {token: vector})
    assert token_id == pipe.tokenizer.convert_tokens_to_ids("<R>")
    assert token_id in backbone.tokenizer(prompt).input_ids
    ours = backbone.encode_prompts([prompt]).embeds
    assert torch.equal(stock, ours)
    # the token matters: a prompt without it encodes differently
    assert not torch.equal(ours, backbone.encode_prompts(["cat and tree"]).embeds)


def _pixels(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def test_generate_with_embedding_student_stock_and_wadi_routes(setup, tmp_path):
    emb = setup["run"].embedding_path
    other = save_embedding(tmp_path / "other.safetensors", "<R>", -3 * setup["run"].vector)
    common = ["--prompt", "cat <R> tree", "--prompt", "a dog <R> house", "--seed", "1"]
    stock = ["generate", "--pipeline", str(setup["student"]), *common]
    assert main([*stock, "--embedding", str(emb), "--out", str(tmp_path / "stock")]) == 0
    assert main([*stock, "--embedding", str(other), "--out", str(tmp_path / "other")]) == 0
    wadi = ["generate", "--teacher", str(setup["sd"]), "--adapter", str(setup["adapter"])]
    assert main([*wadi, *common, "--embedding", str(emb), "--out", str(tmp_path / "w")]) == 0
    a, b, c = (_pixels(tmp_path / n) for n in ("stock", "w", "other"))
    assert len(a) == 2 and max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1
    assert max(np.abs(x - y).max() for x, y in zip(a, c)) > 4  # the embedding steers it
    teacher = ["generate", "--teacher", str(setup["sd"]), "--steps", "2", *common]
    assert main([*teacher, "--embedding", str(emb), "--out", str(tmp_path / "t")]) == 0
    assert len(_pixels(tmp_path / "t")) == 2


def test_resume_continues_bit_for_bit(setup, tmp_path):
    out = tmp_path / "run"
    first = invert_relation(_config(setup, out, max_steps=2))
    assert first.steps == 2
    code = main(["invert-relation", "--output-dir", str(out), "--resume", "--max-steps", "4",
                 "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0
    saved = load_file(str(out / "final" / "embedding.safetensors"))["<R>"][0]
    assert torch.equal(saved, setup["run"].vector)


@pytest.mark.parametrize(
    "captions, extra, message",
    [
        ("cat <R> tree\ndog house\na car <R> tree\n", [], "does not contain the token <R>"),
        ("cat <R> tree\ndog <R> house\n", [], "2 captions for 3 images"),
        (CAPTIONS, ["--token", "cat"], "--token cat is already in the vocabulary"),
        (CAPTIONS, ["--token", "<|endoftext|>"], "is already in the vocabulary"),
        (CAPTIONS, ["--init-word", "and"], "is 3 tokens"),
        (CAPTIONS, ["--focal-alpha", "1.5"], "--focal-alpha must be in [0, 1)"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused_in_one_line(setup, tmp_path, capsys, captions, extra, message):
    path = tmp_path / "captions.txt"
    path.write_text(captions.replace("<R>", extra[1]) if "--token" in extra else captions)
    out = tmp_path / "out"
    args = ["invert-relation", "--base", str(setup["sd"]), "--images", str(setup["images"]),
            "--prompts", str(path), "--output-dir", str(out), "--init-word", "cat",
            "--max-steps", "1", "--no-progress", "--device", "cpu", *extra]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing left behind


def test_a_finished_run_is_not_overwritten_without_flag(setup, capsys):
    out = setup["run"].output_dir
    before = (out / "final" / "embedding.safetensors").read_bytes()
    code = main(["invert-relation", "--base", str(setup["sd"]), "--images",
                 str(setup["images"]), "--prompts", str(setup["captions"]), "--output-dir",
                 str(out), "--init-word", "cat", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already holds a run" in err and len(err.splitlines()) == 1
    assert (out / "final" / "embedding.safetensors").read_bytes() == before


def test_json_captions_and_bad_embedding_files(setup, tmp_path, capsys):
    from wadi.relation.invert import read_captions

    path = tmp_path / "text.json"
    path.write_text(json.dumps({"0.png": ["cat <R> tree", "a cat <R> a tree"], "1.png": "dog <R>"}))
    assert read_captions(path, ["0.png", "1.png"], "<R>")[0] == ["cat <R> tree", "a cat <R> a tree"]
    with pytest.raises(ValueError, match="no caption for 2.png"):
        read_captions(path, ["0.png", "1.png", "2.png"], "<R>")
    two = tmp_path / "two.safetensors"
    from safetensors.torch import save_file

    save_file({"<A>": torch.zeros(1, 16), "<B>": torch.zeros(1, 16)}, str(two))
    wide = save_embedding(tmp_path / "wide.safetensors", "<W>", torch.zeros(7))
    for bad, message in [(two, "holds 2 tensors"), (wide, "has width 7, the text encoder 16")]:
        code = main(["generate", "--pipeline", str(setup["student"]), "--prompt", "cat <R>",
                     "--embedding", str(bad), "--out", str(tmp_path / "o")])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert len(PREPOSITIONS) == 56
