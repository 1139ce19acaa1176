import json

import numpy as np
from PIL import Image

from wadi.toy.demo import GENERATORS, DemoConfig, format_table, run_demo


def test_short_demo_writes_report_and_grid(tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(
        out_dir=str(out), steps=2, samples=20, batch_size=2, teacher_steps=3, progress=False
    )
    report = run_demo(cfg)
    saved = json.loads((out / "report.json").read_text())
    assert saved["generators"].keys() == set(GENERATORS)
    for name in GENERATORS:
        m = saved["generators"][name]
        assert {"fd", "accuracy", "nfe", "ms_per_image"} <= set(m)
        assert np.isfinite(m["fd"]) and m["fd"] >= 0 and 0 <= m["accuracy"] <= 1
        assert m["ms_per_image"] > 0
    assert saved["generators"]["teacher_multistep"]["nfe"] == 6  # 3 steps x (cond + null)
    assert saved["generators"]["student_onestep"]["nfe"] == 1
    assert saved["config"]["demo"]["steps"] == 2 and saved["wall_seconds"] > 0
    # the 25-step baseline uses the VSD guidance unless told otherwise; real digits give the floor
    assert saved["reference"]["teacher_guidance"] == cfg.vsd_guidance
    real = saved["reference"]["real_train"]
    assert real["samples"] == 20 and real["accuracy"] >= 0.9
    assert np.isfinite(real["fd"]) and real["fd"] >= 0
    grid = Image.open(out / "grid.png")
    assert grid.format == "PNG" and grid.size[1] == 4 * 66 + 2  # real + three generators
    assert "student_onestep" in format_table(report)
