import pytest

from wadi.testing import make_tiny_pixart, make_tiny_sd

PROMPTS = "a cat\na dog\na red car\n\na blue house\na cat\na green tree\n"


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "sd-eps": make_tiny_sd(root / "sd-eps"),
        "sd-v": make_tiny_sd(root / "sd-v", prediction_type="v_prediction"),
        "pixart": make_tiny_pixart(root / "pixart"),
    }


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def tiny_config(teacher, prompts, out, **changes):
    from wadi.distill import DistillConfig

    knobs = dict(
        teacher=str(teacher),
        prompts=str(prompts),
        output_dir=str(out),
        resolution=16,
        batch_size=2,
        max_steps=3,
        checkpoint_every=2,
        student_rank=4,
        fake_rank=2,
        progress=False,
    )
    knobs.update(changes)
    return DistillConfig(**knobs)
