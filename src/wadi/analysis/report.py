"""Run the analysis over two sources, one layer at a time, and write its report.

Layers analysed: every ``<module>.weight`` tensor with 2 dimensions (Linear)
or 4 dimensions (Conv2d, flattened per output channel), except 2-D tensors of
embedding tables (module names ending in ``embedding``/``embeddings``/
``embed_tokens``/``emb``/``wte``/``wpe``/``shared``).  Biases and norm
scales (1-D) are left out.  ``include``/``exclude`` regular expressions
narrow the set further.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wadi.files import atomic_files, write_text

from .weights import SWAP_KINDS, LayerStats, layer_stats, summarize, swap

__all__ = [
    "Report",
    "is_layer_weight",
    "select_layers",
    "check_compatible",
    "analyze",
    "write_report",
    "summary_table",
    "CSV_FIELDS",
]

_EMBEDDING = re.compile(r"(^|\.)[^.]*(embedding|embeddings|embed_tokens|emb|wte|wpe|shared)$")

CSV_FIELDS = (
    "name",
    "kind",
    "block_type",
    "shape",
    "rows",
    "zero_rows",
    "norm_change_mean",
    "norm_change_std",
    "direction_change_mean",
    "direction_change_std",
    "angle_mean",
    "angle_std",
    "residual_relative_norm",
    "full_rank",
    "energy_at_fraction",
    "rank_for_energy",
)


@dataclass
class Report:
    """Per-layer numbers, their summary and the settings that produced them."""

    teacher: str
    student: str
    energy_fraction: float
    energy_target: float
    layers: list[LayerStats] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # weights left out (not Linear/Conv2d)
    swaps: dict[str, str] = field(default_factory=dict)  # kind -> written path

    @property
    def summary(self) -> dict:
        return summarize(self.layers)

    def to_dict(self) -> dict:
        summary = {
            **self.summary,
            "energy_fraction": self.energy_fraction,
            "energy_target": self.energy_target,
            "units": "percent (changes, energy, residual norm); ratios are plain numbers",
        }
        return {
            "teacher": self.teacher,
            "student": self.student,
            "summary": summary,
            "swaps": self.swaps,
            "skipped_weights": self.skipped,
            "layers": [x.to_dict() for x in self.layers],
        }


def is_layer_weight(key: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is a Linear (2-D) or Conv2d (4-D) weight, not an embedding table."""
    if not key.endswith(".weight") or len(shape) not in (2, 4):
        return False
    module = key[: -len(".weight")]
    return not (len(shape) == 2 and _EMBEDDING.search(module))


def select_layers(
    keys: Iterable[str],
    shape_of,
    include: str | None = None,
    exclude: str | None = None,
    linear_only: bool = False,
) -> list[str]:
    """The analysed weight keys among ``keys``, in order, after the name and kind filters."""
    inc = _compile(include, "--include")
    exc = _compile(exclude, "--exclude")
    chosen = []
    for key in keys:
        shape = shape_of(key)
        if not is_layer_weight(key, shape) or (linear_only and len(shape) != 2):
            continue
        if inc is not None and not inc.search(key):
            continue
        if exc is not None and exc.search(key):
            continue
        chosen.append(key)
    return chosen


def _compile(pattern: str | None, flag: str):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {err}") from None


def check_compatible(teacher, student, layers_t: list[str], layers_s: list[str]) -> list[str]:
    """The common layer keys, in the teacher's order; raise listing the first mismatches."""
    only_s = set(layers_s) - set(layers_t)
    problems = []
    for key in layers_t:
        if key not in student.keys():
            problems.append(f"{key} only in the teacher")
        elif tuple(teacher.shape(key)) != tuple(student.shape(key)):
            problems.append(
                f"{key} is {list(teacher.shape(key))} in the teacher but "
                f"{list(student.shape(key))} in the student"
            )
    problems += [f"{key} only in the student" for key in layers_s if key in only_s]
    if problems:
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"teacher and student do not match ({len(problems)} mismatches): {shown}{more}. "
            "Compare two models of the same architecture, or narrow with --include/--exclude"
        )
    if not layers_t:
        raise ValueError(
            "no Linear or Conv2d weights to compare (2-D or 4-D '.weight' tensors); "
            "check the inputs or the --include/--exclude patterns"
        )
    return list(layers_t)


def analyze(
    teacher,
    student,
    *,
    energy_fraction: float = 0.3,
    energy_target: float = 0.9,
    svd: bool = True,
    include: str | None = None,
    exclude: str | None = None,
    linear_only: bool = False,
    swaps: dict[str, str | os.PathLike] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Report:
    """Compare ``teacher`` and ``student`` (sources) layer by layer, streaming one tensor pair at a time.

    ``swaps`` maps ``"norm"``/``"direction"`` to where the swapped student is
    written (in the student's layout, see :class:`wadi.analysis.swap.ModelWriter`).
    """
    from .swap import ModelWriter

    if not 0 < energy_fraction <= 1:
        raise ValueError(f"--energy-fraction must be in (0, 1], got {energy_fraction}")
    if not 0 < energy_target <= 1:
        raise ValueError(f"--energy-target must be in (0, 1], got {energy_target}")
    swaps = dict(swaps or {})
    for kind in swaps:
        if kind not in SWAP_KINDS:
            raise ValueError(f"unknown swap {kind!r}: choose one of {', '.join(SWAP_KINDS)}")
    layers_t = select_layers(teacher.keys(), teacher.shape, include, exclude, linear_only)
    layers_s = select_layers(student.keys(), student.shape, include, exclude, linear_only)
    layers = set(check_compatible(teacher, student, layers_t, layers_s))
    report = Report(
        teacher=teacher.description,
        student=student.description,
        energy_fraction=energy_fraction,
        energy_target=energy_target,
        skipped=[k for k in student.keys() if k.endswith(".weight") and k not in layers],
    )
    specs = [(k, student.dtype(k), tuple(student.shape(k))) for k in student.keys()]
    writers: dict[str, ModelWriter] = {}
    bar = None
    try:
        for kind, path in swaps.items():
            writers[kind] = ModelWriter(student.layout, path, specs)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers), desc="layers", unit="layer", dynamic_ncols=True)
        for key in student.keys():
            if key not in layers:
                if writers:  # other tensors are read only to copy them into the swapped models
                    s = student.get(key)
                    for writer in writers.values():
                        writer.write(key, s)
                continue
            s = student.get(key)
            t = teacher.get(key)
            name = key[: -len(".weight")]
            stats = layer_stats(
                name,
                t.to(device),
                s.to(device),
                energy_fraction=energy_fraction,
                energy_target=energy_target,
                svd=svd,
            )
            report.layers.append(stats)
            for kind, writer in writers.items():
                writer.write(key, swap(kind, t, s))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name[-40:], refresh=False)
        for kind, writer in list(writers.items()):
            report.swaps[kind] = str(writer.close())
            del writers[kind]
    finally:
        for writer in writers.values():
            writer.abort()
        if bar is not None:
            bar.close()
    report.layers.sort(key=lambda x: natural_key(x.name))
    return report


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10`` (the order of the report)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def layers_csv(report: Report) -> str:
    """``layers.csv`` text: one row per layer, the fields of :data:`CSV_FIELDS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for layer in report.layers:
        row = layer.to_dict()
        row["shape"] = "x".join(str(d) for d in row["shape"])
        writer.writerow({k: ("" if row[k] is None else _fmt(row[k])) for k in CSV_FIELDS})
    return buf.getvalue()


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def write_report(report: Report, out_dir: str | os.PathLike, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``layers.csv`` and (optionally) the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    data = _json_safe(report.to_dict())
    # all written in full before any is renamed into place: a full disk midway leaves the
    # older report, table and plots as they were, not a new report beside an old table
    with atomic_files(out) as stage:
        write_text(stage / "report.json", json.dumps(data, indent=2) + "\n")
        write_text(stage / "layers.csv", layers_csv(report))
        names = ["report.json", "layers.csv"]
        if plots:
            from .plots import write_plots

            names += [p.name for p in write_plots(report, stage)]
    return [out / name for name in names]


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_table(report: Report) -> str:
    """Plain-text table: per block type and all layers, means of the layer numbers (percent)."""
    groups: dict[str, list[LayerStats]] = {}
    for layer in report.layers:
        groups.setdefault(layer.block_type, []).append(layer)
    rows = [(kind, summarize(items)) for kind, items in sorted(groups.items())]
    rows.append(("all layers", report.summary))
    energy_head = f"E@{report.energy_fraction * 100:g}%rank"
    header = (
        "block type",
        "layers",
        "norm %",
        "dir %",
        "dir/norm",
        "angle %",
        "angle/norm",
        "norm std",
        "dir std",
        energy_head,
    )
    lines = [header]
    for kind, s in rows:
        lines.append(
            (
                kind,
                str(s["layers_count"]),
                _cell(s["norm_change_mean"], 4),
                _cell(s["direction_change_mean"], 4),
                _cell(s["ratio"], 1),
                _cell(s["angle_mean"], 4),
                _cell(s["angle_ratio"], 2),
                _cell(s["norm_change_std_mean"], 4),
                _cell(s["direction_change_std_mean"], 4),
                _cell(s["energy_at_fraction_mean"], 1),
            )
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = []
    for i, row in enumerate(lines):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        text.append("  ".join(cells))
        if i == 0 or i == len(lines) - 2:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)
