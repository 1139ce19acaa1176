import pytest

from wadi.cli import main
from wadi.distill import DistillConfig, batch_indices


def test_paper_defaults():
    c = DistillConfig()
    assert (c.lr_student, c.lr_fake, c.guidance_scale, c.max_grad_norm) == (1e-4, 1e-2, 1.5, 1.0)
    assert (c.generator_t_min, c.generator_t_max, c.null_prompt_prob) == (20, 980, 0.1)
    assert c.adam_betas == (0.9, 0.999) and c.weight_decay == 0 and c.ema_decay is None
    assert c.alpha_bar_T is None  # read from the teacher's scheduler


def test_yaml_round_trip(tmp_path):
    c = DistillConfig(
        teacher="t", prompts="p.txt", adapter="dora", alpha_bar_T=0.0047, validation_prompts=["a"]
    )
    c.save(tmp_path / "c.yaml")
    assert DistillConfig.load(tmp_path / "c.yaml") == c


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(adapter="lokr"), "adapter must be one of"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(generator_t_min=990), "generator_t_min <= generator_t_max"),
        (dict(alpha_bar_T=1.5), r"alpha_bar_T must be in \(0, 1\)"),
        (dict(null_prompt_prob=2.0), "null_prompt_prob"),
        (dict(mixed_precision="fp8"), "mixed_precision must be one of"),
    ],
)
def test_out_of_range_values(change, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**change)


def test_unknown_key(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher: x\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\]"):
        DistillConfig.load(tmp_path / "c.yaml")


def test_cli_flags_override_yaml(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("teacher: a\nmax_steps: 10\nseed: 3\n")
    assert (
        main(
            ["distill", "--config", str(tmp_path / "c.yaml"), "--max-steps", "7", "--print-config"]
        )
        == 0
    )
    printed = DistillConfig.from_yaml(capsys.readouterr().out)
    assert (printed.teacher, printed.max_steps, printed.seed) == ("a", 7, 3)


def test_cli_bad_value_is_one_line(capsys):
    assert main(["distill", "--teacher", "t", "--batch-size", "0", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch_size must be >= 1" in err


def test_batch_indices_partition_each_epoch_across_processes():
    n, batch, world = 10, 2, 2
    seen = []
    for step in range(5):  # 5 steps x 4 prompts = 2 epochs
        for rank in range(world):
            seen += batch_indices(step, rank, world, batch, n, seed=1)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch
    assert batch_indices(3, 1, 2, 2, 10, 1) == batch_indices(3, 1, 2, 2, 10, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_steps: two", "max_steps must be an integer, got 'two'"),
        ("resolution: '16'", "resolution must be an integer (or null), got '16'"),
        ("adam_betas: 0.9", "adam_betas must be a list of 2 numbers, got 0.9"),
        ("export_pipeline: 'false'", "export_pipeline must be true or false, got 'false'"),
        ("validation_prompts: seven", "validation_prompts must be a list of strings"),
        ("student_rank: true", "student_rank must be an integer (or null), got True"),
        ("lr_fake: 'fast'", "lr_fake must be a number, got 'fast'"),
    ],
)
def test_wrong_types_in_yaml_are_one_line_naming_file_and_key(text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"teacher: t\n{text}\n")
    with pytest.raises(ValueError) as info:
        DistillConfig.load(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_all_wrong_types_reported_together():
    with pytest.raises(ValueError, match=r"max_steps must be .*; seed must be an integer"):
        DistillConfig.from_dict({"max_steps": "two", "seed": 1.5})


def test_yaml_numbers_are_normalised():
    c = DistillConfig.from_yaml("lr_student: 1e-4\nguidance_scale: 2\nadam_betas: [0.9, 1]\n")
    assert c.lr_student == 1e-4 and isinstance(c.guidance_scale, float)
    assert c.adam_betas == (0.9, 1.0)


def test_output_dir_and_unresolved_resolution_are_not_recipe_differences():
    a = DistillConfig(teacher="t", output_dir="./run", resolution=None)
    b = DistillConfig(teacher="t", output_dir="/somewhere/else/run/", resolution=16)
    assert a.differences(b) == [] and b.differences(a) == []
    assert a.differences(b.replace(resolution=16, seed=1)) == ["seed"]
    assert DistillConfig().resolution is None  # the teacher's native size, resolved at load


def test_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    c = DistillConfig(teacher="teacher", prompts="p.txt", output_dir="./run/").with_absolute_paths()
    assert (c.teacher, c.prompts, c.output_dir) == (
        str(tmp_path / "teacher"),
        str(tmp_path / "p.txt"),
        str(tmp_path / "run"),
    )
    hub = DistillConfig(teacher="org/model").with_absolute_paths()
    assert hub.teacher == "org/model"  # nothing local by that name: kept as given


def test_every_config_field_is_a_flag_with_its_default_in_help(capsys):
    import argparse
    import dataclasses

    from wadi.distill import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub)
    distill = sub.choices["distill"]
    dests = {a.dest for a in distill._actions}
    assert {f.name for f in dataclasses.fields(DistillConfig)} <= dests
    text = " ".join(distill.format_help().split())  # no line wrapping
    assert "--max-steps N" in text and "(default: 22000)" in text and "--no-progress" in text


def test_existing_flag_spellings_still_work(capsys):
    argv = ["distill", "--teacher", "t", "--prompts", "p.csv", "--prompt-column", "text"]
    argv += ["--output-dir", "o", "--mixed-precision", "bf16", "--validation-prompt", "a cat"]
    argv += ["--validation-prompt", "a dog", "--no-export", "--gradient-checkpointing"]
    argv += ["--include-conv", "--no-progress", "--alpha-bar-T", "0.0047", "--lr-fake", "1e-3"]
    argv += ["--adam-betas", "0.8", "0.99", "--adapter", "full", "--full-scope", "all"]
    assert main([*argv, "--print-config"]) == 0
    c = DistillConfig.from_yaml(capsys.readouterr().out)
    assert (c.prompt_column, c.output_dir, c.mixed_precision) == ("text", "o", "bf16")
    assert c.validation_prompts == ["a cat", "a dog"] and c.export_pipeline is False
    assert c.gradient_checkpointing and c.include_conv and c.progress is False
    assert (c.alpha_bar_T, c.lr_fake, c.adam_betas) == (0.0047, 1e-3, (0.8, 0.99))
    assert (c.adapter, c.full_scope) == ("full", "all")
