import json

from wadi.toy.ablate import AblationConfig, format_rows, run_ablation


def test_short_ablation_writes_rows_curves_and_plot(tmp_path):
    cfg = AblationConfig(
        out_dir=str(tmp_path / "abl"),
        adapters=("lorad", "full"),
        lorad_ranks=(4,),
        seeds=(0,),
        steps=2,
        eval_every=1,
        samples=20,
    )
    report = run_ablation(cfg)
    rows = {(r["adapter"], r["rank"]): r for r in report["rows"]}
    assert set(rows) == {("lorad", 16), ("full", 16), ("lorad", 4)}
    assert (
        rows[("lorad", 4)]["trainable"]
        < rows[("lorad", 16)]["trainable"]
        < rows[("full", 16)]["trainable"]
    )
    for run in report["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert run["curve"][-1]["fd"] == run["fd"]
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert len(saved["runs"]) == 3
    assert (tmp_path / "abl" / "fd_vs_step.png").stat().st_size > 1000
    assert "| lorad | 4 |" in format_rows(report["rows"])
