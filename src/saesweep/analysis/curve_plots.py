"""Convergence curves on shared axes, as Benchopt draws them: per (site, n), every
architecture's held-out curve in the same panel, against three x-axes.

Points: the training logs' held-out rows (``heldout_nmse``, ``heldout_l0``: the trainer's
held-out curve, log-spaced over whole steps; every batch is whole, so no point comes from a
partial batch). x-axes: training tokens; training FLOPs (``flops``: each architecture's step
as it runs, ``sae.flops``); wall-clock of training alone (``train_seconds``: without the
held-out evaluations and checkpoint writes). All axes are logarithmic.

Seeds: the cells of one (site, arch, setting, n) share their held-out token counts; at
each one the line is the median over seeds of the metric (and of the FLOPs and seconds,
which may differ between seeds) and the band spans the seeds' minimum to maximum. With one
seed, the line alone.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from saesweep.analysis import plot_common as pc
from saesweep.analysis.compute import FLOPS
from saesweep.analysis.plots import LINESTYLES
from saesweep.sae.catalog import declaration

X_AXES = {
    "tokens": "training tokens",
    "flops": f"training FLOPs ({FLOPS})",
    "train_seconds": "training wall-clock (s; no held-out evaluation, no checkpoint writes)",
}
"""Column of the training logs → its axis label, left to right."""
METRICS = {
    "heldout_nmse": "held-out normalised MSE",
    "heldout_l0": "held-out L0 (active latents per token)",
}


def is_penalty(arch: str) -> bool:
    """Whether the architecture's sparsity is set by a penalty (its knob is not k), so that
    its L0 is an outcome of training: ReLU, JumpReLU, Gated."""
    return declaration(arch).parameters[0].name != "k"


def seed_bands(held: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (site, n_latents, arch, curve, tokens): the median over seeds of ``metric`` and of
    each x-axis column, the seeds' minimum and maximum of ``metric`` (``low``, ``high``) and
    their number (``seeds``)."""
    keys = ["site", "n_latents", "arch", "curve", "tokens"]
    grouped = held.groupby(keys)
    bands = grouped[[metric, *[x for x in X_AXES if x != "tokens"]]].median()
    bands["low"], bands["high"] = grouped[metric].min(), grouped[metric].max()
    bands["seeds"] = grouped["seed"].nunique()
    return bands.reset_index()


def plot_training_curves(train_logs: pd.DataFrame, stem: str | Path, title: str, metric: str = "heldout_nmse",
                     penalty_only: bool = False) -> list[Path]:
    """One row of panels per (site, n), one column per x-axis (``X_AXES``); in each panel one
    line per (architecture, setting), colour: architecture, line style: its setting in the
    order of its sparsity knob; ``penalty_only``: the penalty architectures alone."""
    needed = {metric, *X_AXES}
    held = train_logs[train_logs[metric].notna()] if needed <= set(train_logs.columns) else train_logs.iloc[:0]
    if penalty_only:
        held = held[held["arch"].map(is_penalty)]
    groups = sorted({(str(s), int(n)) for s, n in held[["site", "n_latents"]].drop_duplicates().to_numpy()})
    rows = max(len(groups), 1)
    height = 3.6 * rows + 1.3
    fig = Figure(figsize=(17.0, height))
    axes = fig.subplots(rows, len(X_AXES), squeeze=False)
    # fixed margins (inches): a constrained layout took half the drawing time at 15 panels
    fig.subplots_adjust(left=0.05, right=0.85, top=1 - 1.2 / height, bottom=0.55 / height, wspace=0.28,
                        hspace=0.45 if rows > 1 else 0.2)
    fig.suptitle(f"{title}\n{METRICS.get(metric, metric)}: median over seeds, band min–max")
    if not groups:
        reason = "no penalty architecture in the sweep" if penalty_only else f"no {metric} with FLOPs in the training logs"
        pc.note(axes[0][0], reason)
        return pc.save(fig, stem)
    bands = seed_bands(held, metric)
    archs = sorted(bands["arch"].unique())
    colour = dict(zip(archs, mpl.colormaps["tab10"].colors))
    styles = {arch: pc.curves(held[held["arch"] == arch]) for arch in archs}
    for row, (site, n) in zip(axes, groups):
        panel = bands[(bands["site"] == site) & (bands["n_latents"] == n)]
        for ax, x in zip(row, X_AXES):
            _draw_panel(ax, panel, x, metric, colour, styles)
            ax.set_title(f"{site} · n = {n}", fontsize=10)
    _legend(fig, colour, styles)
    return pc.save(fig, stem)


def _draw_panel(ax: Axes, panel: pd.DataFrame, x: str, metric: str, colour: dict, styles: dict) -> None:
    """The median line (and min–max band where there are several seeds) of each curve."""
    for (arch, curve), line in panel.groupby(["arch", "curve"]):
        line = line.sort_values("tokens")
        shown = line[(line[x] > 0) & (line[metric] > 0)]
        style = LINESTYLES[styles[arch].index(curve) % len(LINESTYLES)]
        ax.plot(shown[x], shown[metric], style, marker="o", ms=2.5, lw=1.2, color=colour[arch])
        if (shown["seeds"] > 1).any():
            ax.fill_between(shown[x], shown["low"], shown["high"], color=colour[arch], alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labels at powers of ten only: no overlaps
    ax.set_xlabel(X_AXES[x] + " (log scale)", fontsize=8.5)
    ax.set_ylabel(METRICS.get(metric, metric) + " (log scale)", fontsize=8.5)
    ax.grid(True, which="both", alpha=0.25)


def _legend(fig: Figure, colour: dict, styles: dict) -> None:
    """One legend for the figure: an entry per (architecture, setting)."""
    handles = [
        Line2D([], [], color=colour[arch], ls=LINESTYLES[i % len(LINESTYLES)], label=f"{arch} {curve}")
        for arch in colour for i, curve in enumerate(styles[arch])
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
