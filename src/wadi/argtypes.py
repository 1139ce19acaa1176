"""Argument types shared by the sub-commands: a bad value is argparse's one-line usage error."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def comma_list(kind):
    """An argparse type for a comma list of ``kind`` values (``"16,32"`` -> ``[16, 32]``;
    empty items skipped, so ``""`` is ``[]``); a bad item is the usual usage error."""

    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]

    parse.__name__ = f"comma list of {getattr(kind, '__name__', 'value')}"
    return parse
