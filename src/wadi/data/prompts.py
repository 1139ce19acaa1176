"""Read prompt lists: ``.txt``, ``.jsonl`` (JourneyDB and friends), ``.csv``, ``.parquet``.

Training uses prompts only, so by default every reader returns stripped,
non-empty, de-duplicated prompts (first occurrence kept), optionally in a seeded
shuffle: a repeated prompt would only weigh more in the training mix.  Image
generation needs the opposite (image ``i`` is record ``i`` of the file), so
``unique=False`` keeps every record in file order and refuses empty ones.
Bad input fails with one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = ["load_prompts", "PROMPT_COLUMNS", "JSONL_KEYS", "clean_prompts"]

#: how the column option is named in messages when the caller does not say (generate and
#: embed call it --column, distill --prompt-column or ``prompt_column`` in its config)
DEFAULT_COLUMN_FLAG = "--column (wadi distill: --prompt-column)"
#: column names tried, in order, when none is given (csv / parquet)
PROMPT_COLUMNS = ("prompt", "caption", "text")
#: key paths tried, in order, on each JSON line when none is given (JourneyDB first)
JSONL_KEYS = ("Task2.Caption", "prompt", "caption", "text")
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def load_prompts(
    path: str | os.PathLike,
    column: str | None = None,
    seed: int | None = None,
    *,
    unique: bool = True,
    column_flag: str = DEFAULT_COLUMN_FLAG,
) -> list[str]:
    """The prompts in ``path``, cleaned (see :func:`clean_prompts`) and optionally shuffled.

    ``column`` names the csv/parquet column or the JSON key (a dotted path such
    as ``Task2.Caption`` for nested objects); by default the first of
    :data:`PROMPT_COLUMNS` / :data:`JSONL_KEYS` that exists is used.
    ``seed`` shuffles the cleaned list deterministically.  With ``unique=False``
    every record is kept in file order, duplicates included (prompt ``i`` is
    record ``i``), and an empty record is an error naming its line; trailing
    blank lines are ignored.  ``column_flag`` is the option named in error messages.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} not found")
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a folder; give a {'/'.join(SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        raw = _read_txt(path)
    elif suffix == ".jsonl":
        raw = _read_jsonl(path, column, column_flag)
    elif suffix == ".csv":
        raw = _read_table(path, column, "csv", column_flag)
    elif suffix == ".parquet":
        raw = _read_table(path, column, "parquet", column_flag)
    else:
        raise ValueError(
            f"prompt file {path} has an unsupported extension {suffix or '(none)'}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    prompts = clean_prompts(raw) if unique else _every_record(path, suffix, raw)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (after dropping empty lines)")
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts


def clean_prompts(prompts) -> list[str]:
    """Strip whitespace, drop empty prompts and duplicates (keeping the first occurrence)."""
    cleaned = (p.strip() for p in prompts if isinstance(p, str))
    return list(dict.fromkeys(p for p in cleaned if p))


def _every_record(path: Path, suffix: str, raw: list) -> list[str]:
    """Every record stripped, in order; an empty one (but trailing blank lines) is an error."""
    prompts = [p.strip() if isinstance(p, str) else "" for p in raw]
    while prompts and not prompts[-1]:
        prompts.pop()
    for i, prompt in enumerate(prompts):
        if not prompt:
            where = f"row {i + 1}" if suffix in (".csv", ".parquet") else f"line {i + 1}"
            raise ValueError(
                f"prompt file {path} {where} is empty; every record is one image, so remove "
                "it or give it a prompt"
            )
    return prompts


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"prompt file {path} is not valid UTF-8 (line {line}, byte {err.start}); "
            "re-save it as UTF-8"
        ) from None


def _read_txt(path: Path) -> list[str]:
    return _decode(path).splitlines()


def _lookup(record, key: str):
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def _read_jsonl(path: Path, column: str | None, column_flag: str) -> list[str]:
    keys = (column,) if column else JSONL_KEYS
    prompts = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            prompts.append("")  # keeps prompts[i] = line i + 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"prompt file {path} line {number} is not valid JSON ({err.msg}); "
                "each line must be one JSON object"
            ) from None
        if isinstance(record, str) and column is None:
            prompts.append(record)
            continue
        for key in keys:
            value = _lookup(record, key)
            if value is not _MISSING:
                break
        else:
            found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"prompt file {path} line {number} has no {' / '.join(keys)} field "
                f"(found: {found}); pass {column_flag} KEY (dotted for nested keys)"
            )
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"prompt file {path} line {number}: field {key} is a {type(value).__name__}, "
                "not a string"
            )
        prompts.append(value or "")
    return prompts


def _read_table(path: Path, column: str | None, kind: str, column_flag: str) -> list[str]:
    import pandas as pd

    try:
        if kind == "csv":
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, encoding="utf-8", on_bad_lines="error"
            )
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError:
        _decode(path)  # raises with the line number
        raise
    except pd.errors.EmptyDataError:
        raise ValueError(f"prompt file {path} is empty") from None
    except (pd.errors.ParserError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"prompt file {path} could not be read as {kind}: {first}") from None
    columns = [str(c) for c in frame.columns]
    if column is None:
        column = next((c for c in PROMPT_COLUMNS if c in columns), None)
        if column is None:
            raise ValueError(
                f"prompt file {path} has none of the columns {', '.join(PROMPT_COLUMNS)} "
                f"(available: {', '.join(columns) or 'none'}); pass {column_flag} NAME"
            )
    elif column not in columns:
        raise ValueError(
            f"prompt file {path} has no column {column!r} (available: {', '.join(columns) or 'none'})"
        )
    return [v if isinstance(v, str) else "" for v in frame[column].tolist()]
