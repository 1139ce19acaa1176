"""The student-adapter strategies (wadi.distill.students) on a tiny U-Net."""

import pytest
import torch

from wadi.distill.roles import Roles
from wadi.distill.students import STUDENT_ADAPTERS


def _backbone(teachers):
    from wadi.backbones import load_backbone

    return load_backbone(teachers["sd-eps"], dtype=torch.float32)


def test_config_lists_every_strategy():
    from wadi.distill.config import ADAPTERS

    assert tuple(ADAPTERS) == tuple(STUDENT_ADAPTERS)


def test_unknown_adapter_is_one_line(teachers):
    with pytest.raises(ValueError, match="unknown student adapter 'lokr'.*choose one of"):
        Roles(_backbone(teachers), adapter="lokr", student_rank=2, fake_rank=2)


def test_dora_fixed_trains_direction_only_and_keeps_row_norms(teachers):
    """DoRA with a frozen magnitude: the merged weight keeps the base's per-output-neuron
    norms (PEFT's magnitude is the row norm of W), plain DoRA moves them."""
    results = {}
    for name in ("dora", "dora-fixed"):
        torch.manual_seed(0)
        backbone = _backbone(teachers)
        base_w = {
            n: m.weight.detach().clone()
            for n, m in backbone.denoiser.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        roles = Roles(backbone, adapter=name, student_rank=2, fake_rank=2)
        state = roles.student_named_state()
        magnitudes = [k for k in state if "magnitude" in k]
        assert bool(magnitudes) == (name == "dora")
        with torch.no_grad():  # a large step on every trained tensor
            for p in roles.student_parameters():
                p.add_(0.5 * torch.randn_like(p))
        merged = roles.merged_student()
        drift = []
        for n, m in merged.named_modules():
            if (
                isinstance(m, torch.nn.Linear)
                and n in base_w
                and not torch.equal(m.weight, base_w[n])
            ):
                w0, w1 = base_w[n].double(), m.weight.double()
                rows = (w1.norm(dim=1) - w0.norm(dim=1)).abs() / w0.norm(dim=1)
                drift.append(float(rows.max()))
        assert drift, f"{name}: no layer changed"
        results[name] = max(drift)
    assert results["dora-fixed"] < 1e-5, results
    assert results["dora"] > 1e-2, results
