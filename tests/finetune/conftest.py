import numpy as np
import pytest

from wadi.testing import make_tiny_sd


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "sd-eps": make_tiny_sd(root / "sd-eps"),
        "sd-v": make_tiny_sd(root / "sd-v", prediction_type="v_prediction"),
    }


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    """Three 16x16 RGB images of a 'subject' (a bright square on noise)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
        pixels[4:12, 4 + i : 10 + i] = 230
        Image.fromarray(pixels).save(folder / f"dog{i}.png")
    return folder


def tiny_config(base, images, out, **changes):
    from wadi.finetune import FinetuneConfig

    knobs = dict(
        base=str(base),
        images=str(images),
        instance_prompt="a photo of sks dog",
        output_dir=str(out),
        resolution=16,
        batch_size=2,
        max_steps=2,
        checkpoint_every=2,
        rank=2,
        prior_steps=2,
        prior_images=2,
        progress=False,
        export_pipeline=False,
    )
    knobs.update(changes)
    return FinetuneConfig(**knobs)
