"""`wadi analyze` on SDXL, SD3 and FLUX students: adapter on the teacher and exported folder."""

import json

import pytest

from wadi import lorad
from wadi.backbones import load_backbone
from wadi.backbones.export import save_pipeline
from wadi.cli import main
from wadi.testing import attach_random_adapter, make_tiny_flux, make_tiny_sd3, make_tiny_sdxl

MAKERS = {"sdxl": make_tiny_sdxl, "sd3": make_tiny_sd3, "flux": make_tiny_flux}


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_analyze_adapter_and_export_of_a_student(tmp_path, kind):
    """A LoRaD student rotates every preset layer and keeps its row norms: the analysis
    sees exactly the adapted layers change, in direction only, by either route."""
    teacher = MAKERS[kind](tmp_path / "teacher")
    b = load_backbone(teacher, load_text_encoder=False)  # the export reads them from disk
    attach_random_adapter(b.denoiser, b.student_preset, rank=2, seed=3)
    adapted = {name for name, _ in lorad.lorad_layers(b.denoiser)}
    adapter = lorad.save_adapter(b.denoiser, tmp_path / "adapter", "student")
    export = save_pipeline(b, lorad.merge_and_unload(b.denoiser, "student"), tmp_path / "export")
    by_adapter, by_export = tmp_path / "a", tmp_path / "e"
    args = ["--no-svd", "--linear-only", "--no-plots", "--quiet"]
    assert main(["analyze", str(teacher), "--student-adapter", str(adapter), "--out",
                 str(by_adapter), *args]) == 0  # fmt: skip
    assert main(["analyze", str(teacher), str(export), "--out", str(by_export), *args]) == 0
    ra, re_ = _report(by_adapter), _report(by_export)
    changed = {
        layer["name"].removesuffix(".weight")
        for layer in ra["layers"]
        if layer["direction_change_mean"] > 1e-6
    }
    assert changed == adapted and len(adapted) > 5
    assert ra["summary"]["changed_layers_count"] == len(adapted)
    assert max(layer["norm_change_mean"] for layer in ra["layers"]) < 1e-5  # a rotation
    rows = {layer["name"]: layer for layer in re_["layers"]}
    assert rows.keys() == {layer["name"] for layer in ra["layers"]}
    for layer in ra["layers"]:  # merged and saved in fp32: the same numbers
        other = rows[layer["name"]]
        assert other["direction_change_mean"] == pytest.approx(
            layer["direction_change_mean"], rel=1e-3, abs=1e-7
        )
