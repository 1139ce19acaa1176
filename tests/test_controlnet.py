"""ControlNet with the student (wadi.controlnet, ``wadi generate --controlnet``)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export import export_student
from wadi.backbones.generate import generate_images, seeded_noise, to_pil
from wadi.cli import main
from wadi.controlnet import Control, controlled
from wadi.testing import attach_random_adapter, make_tiny_sd, tiny_unet

torch.set_num_threads(1)


def _tiny_controlnet(unet, seed):
    """``ControlNetModel.from_unet`` (condition at the VAE's factor 2) with its zero
    convolutions made non-zero, so it changes the output from the first call."""
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding]
        for module in zero:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return cn.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    sd = make_tiny_sd(root / "sd")
    b = load_backbone(sd, load_text_encoder=False)
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=5)
    adapter = lorad.save_adapter(b.denoiser, root / "adapter", "student")
    student = export_student(sd, adapter, root / "student")
    unet = load_backbone(sd, load_text_encoder=False).denoiser
    cns = []
    for i in range(2):
        _tiny_controlnet(unet, seed=10 + i).save_pretrained(root / f"cn{i}")
        cns.append(root / f"cn{i}")
    images = []
    for i in range(2):
        rng = np.random.default_rng(i)
        path = root / f"control{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return {"sd": sd, "adapter": adapter, "student": student, "cn": cns, "img": images}


def _pixels(folder):
    return [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]


def _controls(setup, scales):
    from diffusers import ControlNetModel

    return [
        Control(ControlNetModel.from_pretrained(setup["cn"][i]), setup["img"][i], s)
        for i, s in enumerate(scales)
    ]


def test_controlnet_changes_the_prediction_scale_zero_is_plain_exactly(setup):
    backbone = load_backbone(setup["student"])
    x = seeded_noise([0, 1], 3, (4, 8, 8))
    cond = backbone.encode_prompts(["red car", "blue house"])
    with torch.no_grad():
        plain = backbone.predict(x, 999, cond)
        with controlled(backbone.denoiser, _controls(setup, [1.0])):
            guided = backbone.predict(x, 999, cond)
        with controlled(backbone.denoiser, _controls(setup, [0.0, 0.0])):
            zero = backbone.predict(x, 999, cond)
        assert not backbone.denoiser._forward_pre_hooks
        with pytest.raises(RuntimeError, match="boom"):
            with controlled(backbone.denoiser, _controls(setup, [1.0])):
                raise RuntimeError("boom")
        assert not backbone.denoiser._forward_pre_hooks  # removed on an exception too
        after = backbone.predict(x, 999, cond)
    assert (guided - plain).abs().max() > 1e-3
    assert torch.equal(zero, plain)
    assert torch.equal(after, plain)


@pytest.mark.parametrize("n", [1, 2])
def test_one_step_equals_stock_controlnet_pipeline(setup, tmp_path, n):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    student = setup["student"]
    info = json.loads((student / "wadi_export.json").read_text())
    assert info["scheduler"] == "DDIMScheduler"
    call = info["pipeline_call"]
    assert call == {"num_inference_steps": 1, "guidance_scale": 1.0}
    scales = [0.7, 1.3][:n]
    prompts = ["red car", "a photo of a cat", "blue house"]
    generate_images(
        prompts,
        tmp_path / "ours",
        pipeline=student,
        controlnets=setup["cn"][:n],
        control_images=setup["img"][:n],
        controlnet_scales=scales,
        seed=4,
        batch_size=2,
        progress=False,
    )
    ours = _pixels(tmp_path / "ours")

    nets = [ControlNetModel.from_pretrained(p) for p in setup["cn"][:n]]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        student, controlnet=nets[0] if n == 1 else nets, safety_checker=None
    )
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.set_progress_bar_config(disable=True)
    pictures = [Image.open(p).convert("RGB") for p in setup["img"][:n]]
    with torch.no_grad():
        stock = pipe(
            prompts,
            **call,
            latents=seeded_noise(range(3), 4, (4, 8, 8)),
            image=pictures[0] if n == 1 else pictures,
            controlnet_conditioning_scale=scales[0] if n == 1 else scales,
            output_type="pt",
        ).images
    stock = [np.asarray(to_pil(img)).astype(int) for img in stock]
    assert len(ours) == 3
    assert max(np.abs(a - b).max() for a, b in zip(ours, stock)) <= 1
    # the ControlNet mattered: the plain exported student differs
    generate_images(prompts, tmp_path / "plain", pipeline=student, seed=4, progress=False)
    plain = _pixels(tmp_path / "plain")
    assert max(np.abs(a - b).max() for a, b in zip(ours, plain)) > 8


def test_cli_student_teacher_multistep_and_scale_zero(setup, tmp_path):
    common = ["--prompt", "red car", "--prompt", "blue house", "--seed", "2"]
    cn = ["--controlnet", str(setup["cn"][0]), "--control-image", str(setup["img"][0])]
    student = ["generate", "--teacher", str(setup["sd"]), "--adapter", str(setup["adapter"])]
    assert main([*student, *common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*student, *common, *cn, "--out", str(tmp_path / "cn")]) == 0
    assert main([*student, *common, *cn, "--controlnet-scale", "0",
                 "--out", str(tmp_path / "zero")]) == 0  # fmt: skip
    plain, guided, zero = (_pixels(tmp_path / n) for n in ("plain", "cn", "zero"))
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero))
    assert max(np.abs(a - b).max() for a, b in zip(plain, guided)) > 8
    # the teacher's DDIM with CFG: the condition reaches both halves of the batched call
    teacher = ["generate", "--teacher", str(setup["sd"]), "--steps", "3", "--guidance", "3"]
    assert main([*teacher, *common, "--out", str(tmp_path / "t")]) == 0
    assert main([*teacher, *common, *cn, "--out", str(tmp_path / "tcn")]) == 0
    a, b = _pixels(tmp_path / "t"), _pixels(tmp_path / "tcn")
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) > 8


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--controlnet", "CN0", "--controlnet", "CN1", "--control-image", "IMG0"],
         "2 --controlnet but 1 --control-image"),
        (["--control-image", "IMG0"], "go with --controlnet"),
        (["--controlnet", "CN0", "--control-image", "IMG0", "--controlnet-scale", "1",
          "--controlnet-scale", "2", "--controlnet", "CN1", "--control-image", "IMG1",
          "--controlnet-scale", "3"], "3 --controlnet-scale for 2 --controlnet"),
        (["--controlnet", "MISSING", "--control-image", "IMG0"], "has no config.json"),
        (["--controlnet", "CN0", "--control-image", "MISSING"], "control image"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_pairs_in_one_line(setup, tmp_path, capsys, extra, message):
    names = {"CN0": setup["cn"][0], "CN1": setup["cn"][1], "IMG0": setup["img"][0],
             "IMG1": setup["img"][1], "MISSING": tmp_path / "missing"}  # fmt: skip
    extra = [str(names.get(e, e)) for e in extra]
    out = tmp_path / "out"
    code = main(["generate", "--pipeline", str(setup["student"]), "--prompt", "red car",
                 "--out", str(out), *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_controlnet_for_another_unet_is_refused(setup):
    other = _tiny_controlnet(tiny_unet(in_channels=4, cross_attention_dim=24), seed=0)
    backbone = load_backbone(setup["student"], load_text_encoder=False)
    with pytest.raises(ValueError, match="cross_attention_dim=24, this one has 16"):
        with controlled(backbone.denoiser, [Control(other, setup["img"][0])]):
            pass


def test_blurred_mask_and_follow_scores_on_hand_examples():
    from wadi.toy.controlnet import blurred_mask, follow_scores

    image = -torch.ones(1, 1, 16, 16)
    image[..., 6:10, 6:10] = 1.0
    mask = blurred_mask(image, sigma=1.0)
    assert mask.shape == image.shape and float(mask.max()) == 1.0 and float(mask.min()) >= 0
    assert mask[0, 0, 8, 8] > 0.9 and mask[0, 0, 0, 0] == 0 and 0 < mask[0, 0, 5, 8] < 0.9
    same = follow_scores(image, image, (image + 1) / 2)
    assert same["iou"] == 1.0 and abs(same["corr"] - 1.0) < 1e-12
    half = image.clone()
    half[..., 6:10, 8:10] = -1.0  # half the ink: IoU 8 / 16
    assert follow_scores(half, image, mask)["iou"] == 0.5
    assert follow_scores(-image, image, (image + 1) / 2)["corr"] < -0.99


@pytest.mark.slow  # loads and trains the digits teacher: ~10-25 s on 2 shared cores
def test_toy_train_controlnet_writes_a_stock_controlnet(tmp_path, capsys):
    from diffusers import ControlNetModel

    from wadi.toy import TEACHER_DIR
    from wadi.toy.controlnet import blurred_mask

    out = tmp_path / "cn"
    assert main(["toy", "train-controlnet", "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    cn = ControlNetModel.from_pretrained(out)
    assert cn.config.conditioning_channels == 1
    assert json.loads((out / "training_config.json").read_text())["config"]["steps"] == 2
    teacher = load_backbone(TEACHER_DIR)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a 3", "a 4"])
    condition = blurred_mask(x)
    with torch.no_grad():
        plain = teacher.predict(x, 500, cond)
        with controlled(teacher.denoiser, [Control(cn, condition)]):
            guided = teacher.predict(x, 500, cond)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)  # trained zero convs
    capsys.readouterr()
    assert main(["toy", "train-controlnet", "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
