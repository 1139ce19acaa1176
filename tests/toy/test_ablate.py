import json

import pytest

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
        lr_overrides={"full": 1e-4},
    )
    report = run_ablation(cfg)
    rows = {(r["adapter"], r["rank"]): r for r in report["rows"]}
    assert set(rows) == {("lorad", 16), ("full", 16), ("lorad", 4)}
    assert (
        rows[("lorad", 4)]["trainable"]
        < rows[("lorad", 16)]["trainable"]
        < rows[("full", 16)]["trainable"]
    )
    assert rows[("full", 16)]["lr_student"] == 1e-4
    assert rows[("lorad", 16)]["lr_student"] == cfg.demo.lr_student
    for run in report["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        # the demo exports the EMA, so the headline FD is the EMA's; the raw one is kept too
        assert run["curve"][-1]["fd_ema"] == run["fd"]
        assert run["curve"][-1]["fd"] == run["fd_raw"]
        assert run["peak_mib_over_loaded"] is not None and run["peak_mib_over_loaded"] >= 0
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert len(saved["runs"]) == 3
    assert (tmp_path / "abl" / "fd_vs_step.png").stat().st_size > 1000
    assert "| lorad | 4 |" in format_rows(report["rows"])


def test_parallel_jobs_give_the_serial_result(tmp_path):
    base = dict(
        adapters=("lorad",), lorad_ranks=(4,), seeds=(0,), steps=2, eval_every=2, samples=20
    )
    serial = run_ablation(AblationConfig(out_dir=str(tmp_path / "a"), threads=1, **base))
    parallel = run_ablation(AblationConfig(out_dir=str(tmp_path / "b"), jobs=2, threads=1, **base))
    assert [(r["rank"], r["fd"]) for r in parallel["runs"]] == [
        (r["rank"], r["fd"]) for r in serial["runs"]
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"adapters": ("lorad", "qlora")}, "unknown adapter 'qlora'"),
        ({"lr_overrides": {"dora": 1e-4}}, "not among the adapters"),
        ({"lr_overrides": {"lorad": 0.0}}, "must be positive"),
    ],
)
def test_bad_ablation_config_fails_before_running(tmp_path, change, message):
    cfg = AblationConfig(out_dir=str(tmp_path / "abl"), **{"adapters": ("lorad",), **change})
    with pytest.raises(ValueError, match=message):
        run_ablation(cfg)
    assert not (tmp_path / "abl").exists()


def test_equal_count_budget_matches_lorad_trainable_count():
    from wadi.toy.ablate import equal_count_rank, trainable_count
    from wadi.toy.demo import DemoConfig

    demo = DemoConfig()
    target = trainable_count("lorad", demo.student_rank, demo)
    for adapter in ("lora", "dora-fixed"):
        rank = equal_count_rank(adapter, demo)
        per_rank = trainable_count(adapter, 2, demo) - trainable_count(adapter, 1, demo)
        assert abs(trainable_count(adapter, rank, demo) - target) <= per_rank / 2
        assert rank < demo.student_rank  # LoRA spends more per rank than LoRaD


def test_lr_grid_picks_the_best_rate_on_the_first_seed_then_runs_the_rest(tmp_path):
    cfg = AblationConfig(
        out_dir=str(tmp_path / "abl"),
        adapters=("lorad",),
        seeds=(0, 1),
        steps=1,
        eval_every=1,
        samples=20,
        lr_grid=(1e-4, 3e-2),
    )
    report = run_ablation(cfg)
    grid = [r for r in report["runs"] if r["seed"] == 0]
    assert sorted(r["lr_student"] for r in grid) == [1e-4, 3e-2]
    best = min(grid, key=lambda r: r["fd"])
    assert [r["chosen"] for r in grid].count(True) == 1 and best["chosen"]
    rest = [r for r in report["runs"] if r["seed"] == 1]
    assert [r["lr_student"] for r in rest] == [best["lr_student"]]
    (row,) = report["rows"]
    assert row["seeds"] == 2 and row["lr_student"] == best["lr_student"]


def test_rerun_reuses_finished_runs_and_redoes_changed_ones(tmp_path, monkeypatch, capsys):
    """An interrupted or extended ablation resumes: a run already finished with the same
    settings is read back, not trained again; one whose settings changed runs again."""
    import wadi.toy.ablate as ablate

    base = dict(out_dir=str(tmp_path / "abl"), adapters=("lorad",), steps=1, eval_every=1)
    first = run_ablation(AblationConfig(seeds=(0,), samples=20, **base))
    trained = []
    real = ablate.run_one
    monkeypatch.setattr(
        ablate, "run_one", lambda case, cfg, p: trained.append(case["seed"]) or real(case, cfg, p)
    )
    extended = run_ablation(AblationConfig(seeds=(0, 1), samples=20, **base))
    assert trained == [1]  # seed 0 came from its result.json
    assert extended["runs"][0]["curve"] == first["runs"][0]["curve"]
    assert "finished before: reused" in capsys.readouterr().out
    assert extended["rows"][0]["seeds"] == 2
    trained.clear()
    run_ablation(AblationConfig(seeds=(0,), samples=30, **base))  # other settings: rerun
    assert trained == [0]


def test_report_only_summarises_what_finished_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import wadi.toy.ablate as ablate

    base = dict(out_dir=str(tmp_path / "abl"), adapters=("lorad",), steps=1, eval_every=1)
    base.update(samples=20, lr_grid=(1e-4, 3e-2))
    with pytest.raises(ValueError, match="no ablation folder"):
        run_ablation(AblationConfig(seeds=(0,), report_only=True, **base))
    assert not (tmp_path / "abl").exists()
    run_ablation(AblationConfig(seeds=(0,), **base))  # the grid on seed 0
    monkeypatch.setattr(ablate, "run_one", lambda *a: pytest.fail("report_only trained"))
    report = run_ablation(AblationConfig(seeds=(0, 1), report_only=True, **base))
    assert len(report["runs"]) == 2 and [r["seed"] for r in report["not_run"]] == [1]
    assert "seed 1: not run yet" in capsys.readouterr().out
    (row,) = report["rows"]
    assert row["seeds"] == 1
    other = dict(base, steps=2)  # other settings: nothing of them has finished
    with pytest.raises(ValueError, match="no run with these settings"):
        run_ablation(AblationConfig(seeds=(0,), report_only=True, **other))


def test_cli_report_only_without_a_folder_is_one_line(tmp_path, capsys):
    from wadi.cli import main

    assert main(["ablate", "--report-only", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run without --report-only first" in err
    assert "Traceback" not in err and not (tmp_path / "none").exists()
