import json

import pandas as pd
import pytest

from wadi.data import load_prompts


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_strips_drops_empty_and_duplicates_keeping_first(tmp_path):
    path = _write(tmp_path / "p.txt", "\ufeff  a cat \n\n dog\n   \na cat\nbird\r\ndog\n")
    assert load_prompts(path) == ["a cat", "dog", "bird"]


def test_jsonl_formats(tmp_path):
    lines = [
        {"Task2": {"Caption": "journey one", "Other": 1}},
        {"prompt": "plain prompt"},
        {"caption": "  a caption "},
        {"text": "some text"},
        "a bare string",
        {"prompt": ""},
        {"prompt": None},
        {"Task2": {"Caption": "journey one"}},
    ]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_prompts(path) == [
        "journey one", "plain prompt", "a caption", "some text", "a bare string",
    ]  # fmt: skip


def test_jsonl_explicit_dotted_column(tmp_path):
    lines = [{"meta": {"desc": "x"}, "prompt": "ignored"}, {"meta": {"desc": "y"}}]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines))
    assert load_prompts(path, column="meta.desc") == ["x", "y"]
    with pytest.raises(ValueError, match=r"line 2 has no prompt field \(found: meta\)"):
        load_prompts(path, column="prompt")


def test_csv_and_parquet_columns(tmp_path):
    frame = pd.DataFrame(
        {"id": [1, 2, 3, 4], "caption": ["a", " b ", "", "a"], "text": list("wxyz")}
    )
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        assert load_prompts(tmp_path / name) == ["a", "b"]  # caption wins over text
        assert load_prompts(tmp_path / name, column="text") == list("wxyz")
        with pytest.raises(
            ValueError, match=r"no column 'prompts' \(available: id, caption, text\)"
        ):
            load_prompts(tmp_path / name, column="prompts")
    pd.DataFrame({"id": [1], "title": ["t"]}).to_csv(tmp_path / "q.csv", index=False)
    with pytest.raises(ValueError, match="none of the columns prompt, caption, text.*--column"):
        load_prompts(tmp_path / "q.csv")


def test_seeded_shuffle_is_deterministic(tmp_path):
    path = _write(tmp_path / "p.txt", "\n".join(f"prompt {i}" for i in range(50)))
    base = load_prompts(path)
    a, b, c = load_prompts(path, seed=1), load_prompts(path, seed=1), load_prompts(path, seed=2)
    assert a == b and a != c and a != base
    assert sorted(a) == sorted(base) == sorted(c)


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .* not found"):
        load_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\n")
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(line 3"):
        load_prompts(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"prompt\nok\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_prompts(bad_csv)
    bad_json = _write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n{"prompt": "oops"\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompts(bad_json)
    wrong_type = _write(tmp_path / "w.jsonl", '{"prompt": 3}\n')
    with pytest.raises(ValueError, match="line 1: field prompt is a int"):
        load_prompts(wrong_type)
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(_write(tmp_path / "empty.txt", "\n  \n\n"))
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(ValueError, match="unsupported extension .json"):
        load_prompts(_write(tmp_path / "p.json", "[]"))
    with pytest.raises(ValueError, match="is a folder"):
        load_prompts(tmp_path)


def test_every_record_kept_in_order_for_generation(tmp_path):
    """generate's mode: image i is record i, duplicates included; trailing blank lines ignored."""
    txt = _write(tmp_path / "p.txt", " a cat \ndog\na cat\n\n\n")
    assert load_prompts(txt, unique=False) == ["a cat", "dog", "a cat"]
    assert load_prompts(txt) == ["a cat", "dog"]  # training's mode is unchanged
    lines = [{"prompt": "x"}, {"prompt": "y"}, {"prompt": "x"}]
    jsonl = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    assert load_prompts(jsonl, unique=False) == ["x", "y", "x"]
    frame = pd.DataFrame({"prompt": ["a", "b", "a"]})
    frame.to_parquet(tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet", unique=False) == ["a", "b", "a"]


def test_empty_records_are_refused_by_position_when_every_record_counts(tmp_path):
    with pytest.raises(ValueError, match="line 2 is empty; every record is one image"):
        load_prompts(_write(tmp_path / "p.txt", "a\n  \nb\n"), unique=False)
    with pytest.raises(ValueError, match="line 2 is empty"):
        load_prompts(_write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"}\n'),
                     unique=False)  # fmt: skip
    pd.DataFrame({"prompt": ["a", "", "b"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(ValueError, match="row 2 is empty"):
        load_prompts(tmp_path / "p.csv", unique=False)


def test_missing_column_names_the_callers_flag(tmp_path):
    jsonl = _write(tmp_path / "p.jsonl", '{"other": "a"}\n')
    pd.DataFrame({"title": ["t"]}).to_csv(tmp_path / "q.csv", index=False)
    for path, what in ((jsonl, "KEY"), (tmp_path / "q.csv", "NAME")):
        # distill calls without a flag: both spellings are named
        with pytest.raises(
            ValueError, match=f"pass --column \\(wadi distill: --prompt-column\\) {what}"
        ):
            load_prompts(path)
        with pytest.raises(ValueError, match=f"pass --prompt-column {what}"):
            load_prompts(path, column_flag="--prompt-column")
