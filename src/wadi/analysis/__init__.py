"""Norm-vs-direction analysis of a teacher/student pair (method.md section 5).

- :mod:`wadi.analysis.weights`: the math (per-row norm and direction change,
  SVD energy of the residual, norm/direction swaps), pure functions;
- :mod:`wadi.analysis.sources`: reading model folders, pipelines,
  ``.safetensors`` files and LoRaD adapters one tensor at a time;
- :mod:`wadi.analysis.report`: the streaming loop, ``report.json``/``layers.csv``;
- :mod:`wadi.analysis.plots`: the PNG plots;
- :mod:`wadi.analysis.swap`: writing the swapped student in the input's format.

Names are imported lazily (each from its submodule on first use) so ``wadi --help``,
which imports ``wadi.analysis.cli``, does not load torch.
"""

from __future__ import annotations

from wadi._lazy import lazy_exports

_EXPORTS = {
    "Report": "report",
    "analyze": "report",
    "summary_table": "report",
    "write_report": "report",
    "open_source": "sources",
    **{
        name: "weights"
        for name in (
            "LayerStats",
            "block_type",
            "cumulative_energy",
            "direction_change",
            "energy_at_fraction",
            "layer_stats",
            "norm_change",
            "rank_for_energy",
            "summarize",
            "swap_direction",
            "swap_norm",
        )
    },
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
