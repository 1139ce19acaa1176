"""Tiny offline teachers, built once per test session."""

from __future__ import annotations

import pytest
import torch

from wadi.testing import make_tiny_pixart, make_tiny_pixel_teacher, make_tiny_sd

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("teachers") / "sd-eps")


@pytest.fixture(scope="session")
def sd_v_dir(tmp_path_factory):
    return make_tiny_sd(
        tmp_path_factory.mktemp("teachers") / "sd-v", prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def pixart_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("teachers") / "pixart")


@pytest.fixture(scope="session")
def pixart_1024_dir(tmp_path_factory):
    """sample_size 128: the model has resolution / aspect-ratio conditioning (as PixArt 1024 px)."""
    return make_tiny_pixart(tmp_path_factory.mktemp("teachers") / "pixart-128", sample_size=128)


@pytest.fixture(scope="session")
def pixel_dir(tmp_path_factory):
    return make_tiny_pixel_teacher(tmp_path_factory.mktemp("teachers") / "pixel")


@pytest.fixture(scope="session")
def teacher_dirs(sd_dir, sd_v_dir, pixart_dir):
    return {"sd-eps": sd_dir, "sd-v": sd_v_dir, "pixart": pixart_dir}
