"""PNG plots of a report (matplotlib's Agg canvas, no display, no global pyplot state).

- ``norm_vs_direction.png``: each layer's mean vs std of the per-neuron norm
  change and direction change (the paper's Figure 1a);
- ``by_block_type.png``: the same points coloured by block type, one panel
  each for norm and direction, plus the per-type means;
- ``svd_energy.png``: per layer, the residual's cumulative energy at the
  chosen fraction of full rank, and every layer's energy curve.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_plots", "PLOT_NAMES"]

PLOT_NAMES = ("norm_vs_direction.png", "by_block_type.png", "svd_energy.png")


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    from wadi.files import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    return path


def _finite(pairs):
    return [(x, y) for x, y in pairs if x is not None and y is not None and x == x and y == y]


def _norm_vs_direction(report, path: Path) -> Path:
    fig, axes = _figure(6.0, 4.8)
    ax = axes[0][0]
    s = report.summary
    for field, label, colour, marker in (
        ("norm_change", "norm change", "tab:blue", "o"),
        ("direction_change", "direction change", "tab:red", "^"),
    ):
        pts = _finite(
            (getattr(x, f"{field}_mean"), getattr(x, f"{field}_std")) for x in report.layers
        )
        if pts:
            xs, ys = zip(*pts)
            mean = s[f"{field}_mean"]
            ax.scatter(
                xs,
                ys,
                s=14,
                alpha=0.7,
                c=colour,
                marker=marker,
                label=f"{label} (all-layer mean {mean:.3g} %)",
            )
    ax.set_xlabel("layer mean (%)")
    ax.set_ylabel("layer std (%)")
    ratio = s["ratio"]
    ratio_text = "inf" if ratio is None else f"{ratio:.1f}"
    ax.set_title(
        f"per-neuron change, {len(report.layers)} layers (direction / norm = {ratio_text})"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _by_block_type(report, path: Path) -> Path:
    from matplotlib import colormaps

    kinds = sorted({x.block_type for x in report.layers})
    cmap = colormaps["tab10"]
    colours = {k: cmap(i % 10) for i, k in enumerate(kinds)}
    fig, axes = _figure(13.0, 4.4, ncols=3)
    for ax, field, label in (
        (axes[0][0], "norm_change", "norm change"),
        (axes[0][1], "direction_change", "direction change"),
    ):
        for kind in kinds:
            pts = _finite(
                (getattr(x, f"{field}_mean"), getattr(x, f"{field}_std"))
                for x in report.layers
                if x.block_type == kind
            )
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=14, alpha=0.75, color=colours[kind], label=kind)
        ax.set_title(label)
        ax.set_xlabel("layer mean (%)")
        ax.set_ylabel("layer std (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    ax = axes[0][2]
    width = 0.38
    for offset, field, colour, label in (
        (-width / 2, "norm_change_mean", "tab:blue", "norm"),
        (width / 2, "direction_change_mean", "tab:red", "direction"),
    ):
        vals = []
        for kind in kinds:
            items = [getattr(x, field) for x in report.layers if x.block_type == kind]
            items = [v for v in items if v == v]
            vals.append(sum(items) / len(items) if items else 0.0)
        ax.bar([i + offset for i in range(len(kinds))], vals, width, color=colour, label=label)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("mean change (%)")
    ax.set_title("mean per block type")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _svd_energy(report, path: Path) -> Path:
    fig, axes = _figure(12.0, 4.4, ncols=2)
    frac = report.energy_fraction * 100
    ax = axes[0][0]
    vals = [x.energy_at_fraction for x in report.layers]
    idx = [i for i, v in enumerate(vals) if v is not None]
    ax.bar(idx, [vals[i] for i in idx], width=1.0, color="tab:purple")
    mean = report.summary["energy_at_fraction_mean"]
    if mean is not None:
        ax.axhline(mean, color="black", lw=1, ls="--", label=f"mean {mean:.1f} %")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("layer (report order: names sorted, numbers as numbers)")
    ax.set_ylabel(f"energy at {frac:g} % of full rank (%)")
    ax.set_ylim(0, 102)
    ax.set_title("residual W_s - W_t: SVD energy per layer")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[0][1]
    curves = [x.energy_curve for x in report.layers if x.energy_curve]
    xs = [i for i in range(101)]
    for curve in curves:
        ax.plot(xs, curve, color="tab:purple", alpha=0.15, lw=0.8)
    if curves:
        avg = [sum(c[i] for c in curves) / len(curves) for i in range(101)]
        ax.plot(xs, avg, color="black", lw=2, label="mean over layers")
        ax.legend(fontsize=8, loc="lower right")
    ax.axvline(frac, color="grey", ls=":", lw=1)
    ax.axhline(report.energy_target * 100, color="grey", ls=":", lw=1)
    ax.set_xlabel("kept rank (% of full rank)")
    ax.set_ylabel("cumulative energy (%)")
    ax.set_title("cumulative energy curves")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_plots(report, out_dir: str | os.PathLike) -> list[Path]:
    """Write the three PNGs of :data:`PLOT_NAMES` into ``out_dir``."""
    out = Path(out_dir)
    return [
        _norm_vs_direction(report, out / PLOT_NAMES[0]),
        _by_block_type(report, out / PLOT_NAMES[1]),
        _svd_energy(report, out / PLOT_NAMES[2]),
    ]
