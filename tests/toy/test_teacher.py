import json

import pytest
import torch

from wadi.cli import main
from wadi.toy import TEACHER_DIR
from wadi.toy.evaluate import balanced_digits, evaluate_images, sample_teacher
from wadi.toy.teacher import (
    TeacherTrainConfig,
    load_teacher_parts,
    scheduler_config,
    train_teacher,
)


def _folder_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_shipped_teacher_loads_with_diffusers_loaders():
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert not (TEACHER_DIR / "vae").exists()  # pixel space
    assert _folder_bytes(TEACHER_DIR) <= 10 * 2**20
    assert not list(TEACHER_DIR.rglob("*.bin")) and not list(TEACHER_DIR.rglob("*.pt"))
    unet = UNet2DConditionModel.from_pretrained(TEACHER_DIR, subfolder="unet")
    assert unet.config.in_channels == unet.config.out_channels == 1
    assert unet.config.sample_size == 16
    text_encoder = CLIPTextModel.from_pretrained(TEACHER_DIR, subfolder="text_encoder")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    tokenizer = CLIPTokenizer.from_pretrained(TEACHER_DIR, subfolder="tokenizer")
    assert len(tokenizer("a handwritten digit seven").input_ids) == 6
    sched = DDPMScheduler.from_pretrained(TEACHER_DIR, subfolder="scheduler")
    for key, value in scheduler_config().items():
        assert sched.config[key] == value, key
    abar = sched.alphas_cumprod.double()
    assert abs(float(abar[999]) - 0.0047) < 1e-4  # SD's schedule
    DDIMScheduler.from_pretrained(TEACHER_DIR, subfolder="scheduler")


def test_shipped_teacher_loads_through_backbone_loader():
    from wadi.backbones import load_backbone

    backbone = load_backbone(TEACHER_DIR)
    assert backbone.vae is None and backbone.kind == "sd-unet"
    assert backbone.latent_channels == 1 and backbone.latent_size(16) == 16
    cond = backbone.encode_prompts(["7", "a handwritten digit seven"])
    assert cond.embeds.shape[0] == 2
    eps = backbone.predict_eps(torch.randn(2, 1, 16, 16), 500, cond)
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()


def test_shipped_teacher_draws_the_digit_asked_for():
    """25-step DDIM with CFG 3 through wadi.backbones, measured with the shipped evaluator."""
    from wadi.backbones import load_backbone

    backbone = load_backbone(TEACHER_DIR)
    digits = balanced_digits(30)
    images = sample_teacher(backbone, digits, steps=25, guidance=3.0, seed=123)
    assert images.shape == (30, 1, 16, 16)
    assert evaluate_images(images, digits)["accuracy"] >= 0.8


def test_short_training_writes_a_loadable_teacher(tmp_path):
    out = tmp_path / "teacher"
    summary = train_teacher(out, TeacherTrainConfig(steps=2, batch_size=4), progress=False)
    assert summary["config"]["steps"] == 2
    unet, text_encoder, tokenizer, scheduler = load_teacher_parts(out)
    assert json.loads((out / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    assert not (out / "vae").exists()
    # training moved the weights away from a fresh init with the same seed
    from wadi.toy.teacher import build_teacher

    torch.manual_seed(0)
    fresh, *_ = build_teacher(tmp_path / "tok")
    changed = [
        not torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), unet.state_dict().values())
    ]
    assert any(changed)
    assert not list(tmp_path.glob(".teacher.tmp-*"))  # temporary folder renamed away


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["toy", "train-teacher", "--out", str(out), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    assert main(["toy", "train-teacher", "--out", str(out), "--steps", "0"]) == 2


def test_cli_eval_teacher_prints_metrics(tmp_path, capsys):
    grid = tmp_path / "g.png"
    args = ["toy", "eval-teacher", "--samples", "10", "--steps", "2", "--grid", str(grid)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"fd", "accuracy", "ms_per_image"} and result["samples"] == 10
    assert grid.stat().st_size > 0


@pytest.mark.slow
def test_shipped_teacher_accuracy_on_500_samples():
    from wadi.backbones import load_backbone

    digits = balanced_digits(500)
    images = sample_teacher(load_backbone(TEACHER_DIR), digits, seed=0)
    assert evaluate_images(images, digits)["accuracy"] >= 0.9


@pytest.mark.parametrize("command", ["train-teacher", "train-evaluator"])
def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys, command):
    target = tmp_path / "weights"
    target.write_text("precious")
    assert main(["toy", command, "--out", str(target), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--out {target} is a file" in err
    assert target.read_text() == "precious"


def test_full_res_attention_puts_transformer_blocks_at_every_level(tmp_path):
    """SD's layout: cross-attention at the full-resolution level too, so adapters on nn.Linear
    layers reach it; the default keeps the shipped teacher's layout."""
    from wadi.toy.teacher import unet_config

    assert unet_config()["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D")
    cfg = unet_config(full_res_attention=True)
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 2
    assert cfg["up_block_types"] == ("CrossAttnUpBlock2D",) * 2
    out = tmp_path / "teacher"
    config = TeacherTrainConfig(steps=1, batch_size=2, full_res_attention=True)
    assert train_teacher(out, config, progress=False)["config"]["full_res_attention"] is True
    unet = load_teacher_parts(out)[0]
    first = unet.down_blocks[0]
    assert hasattr(first, "attentions") and len(first.attentions) == 1
    assert _folder_bytes(out) <= 10 * 2**20


def test_shipped_attention_teacher_has_attention_at_every_level():
    from wadi.backbones import load_backbone
    from wadi.toy import ATTN_TEACHER_DIR

    assert _folder_bytes(ATTN_TEACHER_DIR) <= 10 * 2**20
    config = json.loads((ATTN_TEACHER_DIR / "training_config.json").read_text())["config"]
    assert config["full_res_attention"] is True
    backbone = load_backbone(ATTN_TEACHER_DIR)
    blocks = list(backbone.denoiser.down_blocks) + list(backbone.denoiser.up_blocks)
    assert all(hasattr(b, "attentions") for b in blocks)
    eps = backbone.predict_eps(torch.randn(2, 1, 16, 16), 999, backbone.encode_prompts(["3", ""]))
    assert eps.shape == (2, 1, 16, 16) and torch.isfinite(eps).all()
