"""A tiny SD teacher and its exported one-step student (random LoRaD angles), built once."""

from __future__ import annotations

import pytest
import torch

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export import export_student
from wadi.testing import attach_random_adapter, make_tiny_sd

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory):
    """{"teacher": tiny SD folder, "pipeline": its exported student folder}."""
    root = tmp_path_factory.mktemp("serve")
    teacher = make_tiny_sd(root / "teacher")
    backbone = load_backbone(teacher, load_text_encoder=False)
    attach_random_adapter(backbone.denoiser, backbone.student_preset, rank=2, seed=3)
    lorad.save_adapter(backbone.denoiser, root / "adapter", "student")
    pipeline = export_student(teacher, root / "adapter", root / "student")
    return {"teacher": teacher, "pipeline": pipeline}


@pytest.fixture(scope="session")
def engine(serve_models):
    """The exported student with its teacher (3 DDIM steps keep the comparison quick)."""
    from wadi.serve.engine import Engine

    return Engine(serve_models["pipeline"], serve_models["teacher"], teacher_steps=3)
