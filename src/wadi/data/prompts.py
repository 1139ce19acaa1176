"""Read prompt lists: ``.txt``, ``.jsonl`` (JourneyDB and friends), ``.csv``, ``.parquet``.

Training uses prompts only.  Every reader returns stripped, non-empty,
de-duplicated prompts (first occurrence kept), optionally in a seeded shuffle.
Bad input fails with one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = ["load_prompts", "PROMPT_COLUMNS", "JSONL_KEYS", "clean_prompts"]

#: column names tried, in order, when none is given (csv / parquet)
PROMPT_COLUMNS = ("prompt", "caption", "text")
#: key paths tried, in order, on each JSON line when none is given (JourneyDB first)
JSONL_KEYS = ("Task2.Caption", "prompt", "caption", "text")
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def load_prompts(
    path: str | os.PathLike, column: str | None = None, seed: int | None = None
) -> list[str]:
    """The prompts in ``path``, cleaned (see :func:`clean_prompts`) and optionally shuffled.

    ``column`` names the csv/parquet column or the JSON key (a dotted path such
    as ``Task2.Caption`` for nested objects); by default the first of
    :data:`PROMPT_COLUMNS` / :data:`JSONL_KEYS` that exists is used.
    ``seed`` shuffles the cleaned list deterministically.
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
        raw = _read_jsonl(path, column)
    elif suffix == ".csv":
        raw = _read_table(path, column, "csv")
    elif suffix == ".parquet":
        raw = _read_table(path, column, "parquet")
    else:
        raise ValueError(
            f"prompt file {path} has an unsupported extension {suffix or '(none)'}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    prompts = clean_prompts(raw)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (after dropping empty lines)")
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts


def clean_prompts(prompts) -> list[str]:
    """Strip whitespace, drop empty prompts and duplicates (keeping the first occurrence)."""
    cleaned = (p.strip() for p in prompts if isinstance(p, str))
    return list(dict.fromkeys(p for p in cleaned if p))


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


def _read_jsonl(path: Path, column: str | None) -> list[str]:
    keys = (column,) if column else JSONL_KEYS
    prompts = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
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
                f"(found: {found}); pass --column KEY (dotted for nested keys)"
            )
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"prompt file {path} line {number}: field {key} is a {type(value).__name__}, "
                "not a string"
            )
        prompts.append(value or "")
    return prompts


def _read_table(path: Path, column: str | None, kind: str) -> list[str]:
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
                f"(available: {', '.join(columns) or 'none'}); pass --column NAME"
            )
    elif column not in columns:
        raise ValueError(
            f"prompt file {path} has no column {column!r} (available: {', '.join(columns) or 'none'})"
        )
    values = frame[column].tolist()
    return [v for v in values if isinstance(v, str)]
