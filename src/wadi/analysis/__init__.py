"""Norm-vs-direction analysis of a teacher/student pair (method.md section 5).

- :mod:`wadi.analysis.weights`: the math (per-row norm and direction change,
  SVD energy of the residual, norm/direction swaps), pure functions;
- :mod:`wadi.analysis.sources`: reading model folders, pipelines,
  ``.safetensors`` files and LoRaD adapters one tensor at a time;
- :mod:`wadi.analysis.report`: the streaming loop, ``report.json``/``layers.csv``;
- :mod:`wadi.analysis.plots`: the PNG plots;
- :mod:`wadi.analysis.swap`: writing the swapped student in the input's format.
"""

from .report import Report, analyze, summary_table, write_report
from .sources import open_source
from .weights import (
    LayerStats,
    block_type,
    cumulative_energy,
    direction_change,
    energy_at_fraction,
    layer_stats,
    norm_change,
    rank_for_energy,
    summarize,
    swap_direction,
    swap_norm,
)

__all__ = [
    "LayerStats",
    "Report",
    "analyze",
    "block_type",
    "cumulative_energy",
    "direction_change",
    "energy_at_fraction",
    "layer_stats",
    "norm_change",
    "open_source",
    "rank_for_energy",
    "summarize",
    "summary_table",
    "swap_direction",
    "swap_norm",
    "write_report",
]
