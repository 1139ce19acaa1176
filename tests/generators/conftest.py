"""Tiny offline teachers for the generator tests."""

import pytest
import torch

from wadi.testing import make_tiny_pixart, make_tiny_sd

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gen_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-teachers")
    return {
        "sd-eps": make_tiny_sd(root / "sd-eps"),
        "sd-v": make_tiny_sd(root / "sd-v", prediction_type="v_prediction"),
        "pixart": make_tiny_pixart(root / "pixart"),
    }
