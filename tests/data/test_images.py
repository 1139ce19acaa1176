"""Real-image folders for the GAN term: loading, cropping, errors, and encoding to latents."""

import pytest
import torch
from PIL import Image

from wadi.backbones import load_backbone
from wadi.data.images import encode_images, load_image_folder
from wadi.testing import make_tiny_pixel_teacher, make_tiny_sd

STEP = 1 / 127.5  # one uint8 level in [-1, 1]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    torch.set_num_threads(1)
    return load_backbone(make_tiny_sd(tmp_path_factory.mktemp("teachers") / "sd"))


def solid(path, size, color, mode="RGB"):
    Image.new(mode, size, color).save(path)


def test_rgb_non_square_is_centre_cropped_and_resized(tmp_path):
    # 30 x 20: the centre square is x in [5, 25); outside it the image is red
    image = Image.new("RGB", (30, 20), (255, 0, 0))
    image.paste((0, 255, 0), (5, 0, 25, 20))
    image.save(tmp_path / "wide.png")
    tall = Image.new("RGB", (12, 40), (0, 0, 255))
    tall.paste((255, 255, 255), (0, 14, 12, 26))
    tall.save(tmp_path / "tall.png")

    out = load_image_folder(tmp_path, resolution=8, channels=3)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    tall_img, wide_img = out  # sorted by name: tall.png, wide.png
    # the middle is the centre square's colour (LANCZOS rings by a level); the red (blue)
    # outside the crop only bleeds into the edge pixels: a squashed image would show it
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    assert torch.allclose(wide_img[:, :, 1:7], green, atol=1.5 * STEP)
    assert wide_img[0].max() < -1 + 20 * STEP
    assert torch.allclose(tall_img[:, 1:7, :], torch.ones(3, 6, 8), atol=1.5 * STEP)
    assert tall_img[0].min() > 1 - 20 * STEP
    assert out.min() >= -1 and out.max() <= 1


def test_solid_colours_map_exactly_and_files_are_sorted(tmp_path):
    solid(tmp_path / "b.png", (9, 9), (255, 0, 128))
    solid(tmp_path / "a.png", (16, 12), (0, 64, 255))
    solid(tmp_path / "c.webp", (10, 10), (10, 20, 30))
    (tmp_path / "notes.txt").write_text("not an image")
    solid(tmp_path / ".hidden.png", (9, 9), (1, 2, 3))  # macOS ._ files and the like
    (tmp_path / "sub").mkdir()
    solid(tmp_path / "sub" / "d.png", (9, 9), (1, 2, 3))

    out = load_image_folder(tmp_path, resolution=4, channels=3)
    assert out.shape == (3, 3, 4, 4)
    expected = torch.tensor([[0, 64, 255], [255, 0, 128]]) / 127.5 - 1
    assert torch.allclose(out[:2].mean(dim=(2, 3)), expected, atol=STEP / 2)
    # lossy WebP: near the colour, not exact
    webp = torch.tensor([10, 20, 30]) / 127.5 - 1
    assert torch.allclose(out[2].mean(dim=(1, 2)), webp, atol=6 * STEP)


def test_grayscale_and_channel_conversion(tmp_path):
    solid(tmp_path / "gray.png", (7, 11), 200, mode="L")
    solid(tmp_path / "rgb.jpg", (12, 12), (90, 90, 90))
    one = load_image_folder(tmp_path, resolution=6, channels=1)
    assert one.shape == (2, 1, 6, 6)
    assert torch.allclose(one[0], torch.full((1, 6, 6), 200 / 127.5 - 1), atol=STEP / 2)
    assert torch.allclose(one[1], torch.full((1, 6, 6), 90 / 127.5 - 1), atol=3 * STEP)
    three = load_image_folder(tmp_path, resolution=6, channels=3)
    assert three.shape == (2, 3, 6, 6)
    assert torch.equal(three[0, 0], three[0, 1]) and torch.equal(three[0, 1], three[0, 2])


def test_rgba_and_palette_images_load_as_rgb(tmp_path):
    solid(tmp_path / "a.png", (8, 8), (10, 200, 30, 128), mode="RGBA")
    Image.new("RGB", (8, 8), (50, 60, 70)).convert("P").save(tmp_path / "b.png")
    out = load_image_folder(tmp_path, resolution=4, channels=3)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1, atol=STEP / 2)


def test_corrupt_file_is_named(tmp_path):
    solid(tmp_path / "a.png", (8, 8), (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image") as err:
        load_image_folder(tmp_path, resolution=4)
    assert "\n" not in str(err.value)


def test_truncated_file_is_named(tmp_path):
    solid(tmp_path / "big.png", (64, 64), (0, 0, 0))
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "big.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"big\.png"):
        load_image_folder(tmp_path, resolution=4)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", resolution=4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no png/jpg/jpeg/webp files"):
        load_image_folder(tmp_path / "empty", resolution=4)
    solid(tmp_path / "x.png", (4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match="is not a folder"):
        load_image_folder(tmp_path / "x.png", resolution=4)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image_folder(tmp_path, resolution=4, channels=4)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        load_image_folder(tmp_path, resolution=0)


def test_encode_pixel_space_is_identity(tmp_path):
    backbone = load_backbone(make_tiny_pixel_teacher(tmp_path / "pixel", channels=1))
    assert backbone.vae is None
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(encode_images(backbone, images), images)
    with pytest.raises(ValueError, match="takes 1-channel images, got 3"):
        encode_images(backbone, torch.zeros(1, 3, 8, 8))


def test_encode_latent_shape_and_scaling(sd, tmp_path):
    for i in range(3):
        solid(tmp_path / f"{i}.png", (20, 16), (80 * i, 40, 200))
    images = load_image_folder(tmp_path, resolution=16, channels=3)
    latents = encode_images(sd, images, batch_size=2)
    factor = sd.vae_scale_factor
    assert factor == 2 and latents.shape == (3, 4, 16 // factor, 16 // factor)
    with torch.no_grad():
        mean = sd.vae.encode(images).latent_dist.mean
    scale = sd.vae.config.scaling_factor
    assert torch.allclose(latents, mean * scale, atol=1e-6)

    sd.vae.register_to_config(shift_factor=0.25)
    try:
        shifted = encode_images(sd, images)
    finally:
        sd.vae.register_to_config(shift_factor=None)
    assert torch.allclose(shifted, (mean - 0.25) * scale, atol=1e-6)

    with pytest.raises(ValueError, match="multiple of the VAE factor 2"):
        encode_images(sd, torch.zeros(1, 3, 15, 15))
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
        encode_images(sd, torch.zeros(3, 16, 16))
