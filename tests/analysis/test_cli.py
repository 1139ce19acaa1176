"""`wadi analyze` end to end on tiny U-Nets: outputs, swap models in the input's format, errors."""

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wadi.analysis.report import CSV_FIELDS, is_layer_weight
from wadi.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_analyze_writes_report_csv_plots_and_swaps(tmp_path, teacher_dir, student_dir, capsys):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            str(teacher_dir),
            str(student_dir),
            "--out",
            str(out),
            "--swap",
            "norm",
            "--swap",
            "direction",
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "all layers" in printed and "self-attention" in printed and "dir/norm" in printed

    report = _report(out)
    summary = report["summary"]
    for key in ("norm_change_mean", "direction_change_mean", "ratio", "energy_at_fraction_mean"):
        assert isinstance(summary[key], float)
    assert summary["ratio"] == pytest.approx(
        summary["direction_change_mean"] / summary["norm_change_mean"]
    )
    assert summary["energy_fraction"] == 0.3
    state = load_file(teacher_dir / "diffusion_pytorch_model.safetensors")
    n_layers = sum(is_layer_weight(k, tuple(v.shape)) for k, v in state.items())
    assert len(report["layers"]) == summary["layers_count"] == n_layers
    layer = report["layers"][0]
    for key in (
        "name",
        "norm_change_mean",
        "norm_change_std",
        "direction_change_mean",
        "direction_change_std",
        "energy_at_fraction",
        "rank_for_energy",
    ):
        assert key in layer
    assert {x["kind"] for x in report["layers"]} == {"linear", "conv"}

    with open(out / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_FIELDS
    assert [r["name"] for r in rows] == [x["name"] for x in report["layers"]]
    assert float(rows[3]["direction_change_mean"]) == pytest.approx(
        report["layers"][3]["direction_change_mean"], rel=1e-5
    )
    for name in ("norm_vs_direction.png", "by_block_type.png", "svd_energy.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000

    # the swapped students are diffusers model folders that load and run
    for kind in ("norm", "direction"):
        path = out / f"swap-{kind}"
        assert report["swaps"][kind] == str(path)
        model = UNet2DConditionModel.from_pretrained(path).eval()
        with torch.no_grad():
            y = model(
                torch.randn(1, 3, 8, 8), 10, encoder_hidden_states=torch.randn(1, 4, 8)
            ).sample
        assert y.shape == (1, 3, 8, 8) and torch.isfinite(y).all()
    # non-layer tensors (biases, norms) are the student's; layers have the swapped property
    swapped = load_file(out / "swap-norm" / "diffusion_pytorch_model.safetensors")
    student = load_file(student_dir / "diffusion_pytorch_model.safetensors")
    assert swapped.keys() == student.keys()
    bias = next(k for k in student if k.endswith(".bias"))
    assert torch.equal(swapped[bias], student[bias])

    # analysing teacher vs the norm-swapped student: no norm change, same direction change
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "analyze",
                str(teacher_dir),
                str(out / "swap-norm"),
                "--out",
                str(out2),
                "--quiet",
                "--no-plots",
            ]
        )
        == 0
    )
    s2 = _report(out2)["summary"]
    assert s2["norm_change_mean"] < 1e-4
    assert s2["direction_change_mean"] == pytest.approx(summary["direction_change_mean"], rel=1e-3)
    assert not (out2 / "norm_vs_direction.png").exists()
    # and vs the direction-swapped student: no direction change, same norm change
    out3 = tmp_path / "out3"
    assert (
        main(
            [
                "analyze",
                str(teacher_dir),
                str(out / "swap-direction"),
                "--out",
                str(out3),
                "--quiet",
                "--no-svd",
            ]
        )
        == 0
    )
    s3 = _report(out3)["summary"]
    assert s3["direction_change_mean"] < 1e-5
    assert s3["norm_change_mean"] == pytest.approx(summary["norm_change_mean"], rel=1e-3)
    assert s3["energy_at_fraction_mean"] is None


def test_swap_keeps_the_input_format(tmp_path, teacher_dir, student_dir):
    # single .safetensors in, single .safetensors out
    t_file = tmp_path / "t.safetensors"
    s_file = tmp_path / "s.safetensors"
    shutil.copy(teacher_dir / "diffusion_pytorch_model.safetensors", t_file)
    shutil.copy(student_dir / "diffusion_pytorch_model.safetensors", s_file)
    out = tmp_path / "out"
    args = ["analyze", str(t_file), str(s_file), "--out", str(out), "--swap", "direction"]
    assert main(args + ["--quiet", "--no-plots", "--no-svd"]) == 0
    swapped = load_file(out / "swap-direction.safetensors")
    assert swapped.keys() == load_file(s_file).keys()

    # pipeline in, pipeline out: the other parts are carried over, the unet is swapped
    pipe = tmp_path / "pipe"
    shutil.copytree(student_dir, pipe / "unet")
    (pipe / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text("{}")
    out = tmp_path / "out_pipe"
    assert (
        main(
            [
                "analyze",
                str(teacher_dir),
                str(pipe),
                "--out",
                str(out),
                "--swap",
                "norm",
                "--quiet",
                "--no-plots",
                "--no-svd",
            ]
        )
        == 0
    )
    swapped_pipe = out / "swap-norm"
    assert (swapped_pipe / "model_index.json").read_text() == (
        pipe / "model_index.json"
    ).read_text()
    assert (swapped_pipe / "scheduler" / "scheduler_config.json").is_file()
    assert (swapped_pipe / "unet" / "config.json").is_file()
    got = load_file(swapped_pipe / "unet" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == load_file(s_file).keys()
    # --out inside the pipeline: earlier outputs are not copied into the new swap
    out = pipe / "analysis"
    args = ["--out", str(out), "--swap", "norm", "--quiet", "--no-plots", "--no-svd"]
    for _ in range(2):
        assert main(["analyze", str(teacher_dir), str(pipe), *args]) == 0
    assert not (out / "swap-norm" / "analysis").exists()
    assert sorted(p.name for p in (out / "swap-norm").iterdir()) == [
        "model_index.json",
        "scheduler",
        "unet",
    ]


def test_student_adapter_on_the_teacher(tmp_path, teacher_dir):
    from diffusers import UNet2DConditionModel

    from wadi.lorad import LoRaDConfig, attach, load_adapter, merge_and_unload, save_adapter

    model = UNet2DConditionModel.from_pretrained(teacher_dir)
    attach(model, LoRaDConfig(rank=2, target_modules=["to_q", "to_k", "to_v"]), "s")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lorad_A" in name:
                p.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter", "s")
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            str(teacher_dir),
            "--student-adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(out),
            "--quiet",
            "--swap",
            "norm",
        ]
    )
    assert rc == 0
    report = _report(out)
    changed = {x["name"] for x in report["layers"] if x["direction_change_mean"] > 0}
    assert changed and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") for n in changed)
    assert report["summary"]["changed_layers_count"] == len(changed)
    assert max(x["norm_change_mean"] for x in report["layers"]) < 1e-4
    # the swap of an adapter student is a full model in the base's format; a rotation keeps
    # norms, so the norm swap is the merged student itself and the direction swap the teacher
    swapped = load_file(out / "swap-norm" / "diffusion_pytorch_model.safetensors")
    teacher = load_file(teacher_dir / "diffusion_pytorch_model.safetensors")
    model = UNet2DConditionModel.from_pretrained(teacher_dir)
    load_adapter(model, tmp_path / "adapter", "s")
    merged = merge_and_unload(model, "s").state_dict()
    for key, value in swapped.items():
        torch.testing.assert_close(value, merged[key], rtol=1e-5, atol=1e-6)
    out2 = tmp_path / "out2"
    args = ["--out", str(out2), "--quiet", "--no-plots", "--no-svd", "--swap", "direction"]
    rc = main(["analyze", str(teacher_dir), "--student-adapter", str(tmp_path / "adapter"), *args])
    assert rc == 0
    swapped = load_file(out2 / "swap-direction" / "diffusion_pytorch_model.safetensors")
    for key, value in swapped.items():
        torch.testing.assert_close(value, teacher[key], rtol=1e-5, atol=1e-6)


def test_energy_fraction_is_configurable(tmp_path, teacher_dir, student_dir):
    for fraction in ("1.0", "0.05"):
        out = tmp_path / fraction
        args = ["--out", str(out), "--quiet", "--no-plots", "--energy-fraction", fraction]
        assert main(["analyze", str(teacher_dir), str(student_dir), *args]) == 0
    full = _report(tmp_path / "1.0")
    low = _report(tmp_path / "0.05")
    assert full["summary"]["energy_fraction"] == 1.0
    assert all(x["energy_at_fraction"] == pytest.approx(100.0) for x in full["layers"])
    assert low["summary"]["energy_at_fraction_mean"] < full["summary"]["energy_at_fraction_mean"]


def test_mismatch_is_one_clear_line_and_exit_2(tmp_path, teacher_dir, capsys):
    state = load_file(teacher_dir / "diffusion_pytorch_model.safetensors")
    key = next(k for k in state if k.endswith("to_q.weight"))
    state[key] = torch.zeros(5, 5)
    save_file(state, tmp_path / "bad.safetensors")
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            str(teacher_dir),
            str(tmp_path / "bad.safetensors"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "do not match (1 mismatches)" in err and key in err and "[5, 5] in the student" in err
    assert not (out / "report.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give STUDENT, or --student-adapter"),
        (["STUDENT", "--energy-fraction", "0"], "--energy-fraction must be in (0, 1]"),
        (["STUDENT", "--include", "("], "--include '(' is not a valid regular expression"),
        (["STUDENT", "--include", "nothing_matches"], "no Linear or Conv2d weights"),
    ],
)
def test_bad_arguments(tmp_path, teacher_dir, capsys, extra, message):
    extra = [str(teacher_dir) if x == "STUDENT" else x for x in extra]
    rc = main(["analyze", str(teacher_dir), *extra, "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_failed_swap_leaves_the_old_output_alone(tmp_path, teacher_dir, student_dir, monkeypatch):
    import wadi.analysis.report as report_mod

    out = tmp_path / "out"
    (out / "swap-norm").mkdir(parents=True)
    (out / "swap-norm" / "keep.txt").write_text("old")
    calls = {"n": 0}
    real = report_mod.swap

    def failing(kind, t, s):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(kind, t, s)

    monkeypatch.setattr(report_mod, "swap", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        main(
            [
                "analyze",
                str(teacher_dir),
                str(student_dir),
                "--out",
                str(out),
                "--swap",
                "norm",
                "--quiet",
            ]
        )
    assert (out / "swap-norm" / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["swap-norm"]  # no temp leftovers
