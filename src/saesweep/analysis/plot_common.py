"""What every figure shares: axis labels, one panel per (site, arch) group, notes, saving.

Figures are built on ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot, so no
global backend state is touched; each is written as ``<stem>.png`` and ``<stem>.svg`` (SVG
text kept as text).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from saesweep.analysis.compute import FLOPS

LABELS = {
    "nmse": "normalised MSE",
    "delta_lm_loss": "ΔLM loss (nats/token)",
    "dead_fraction": "dead latents (fraction of n)",
    "dense_fraction": "dense latents, firing on > 10 % of tokens (fraction of n)",
    "ce_loss_recovered": "CE loss recovered (fraction)",
    "loss": "training loss",
    "n_latents": "number of latents n",
    "k": "active latents per token k",
    "l0": "measured L0 (active latents per token)",
    "tokens": "training tokens",
    "k_test": "latents kept at test time k′",
    "compute": f"training compute C = {FLOPS} (FLOPs)",
    "heldout_nmse": "held-out normalised MSE during training",
    "probe_loss": "probe loss (nats, mean over tasks)",
    "explain_precision": "N2G explanation precision",
    "explain_recall": "N2G explanation recall",
    "ablation_sparsity": "ablation sparsity (lower: sparser effect)",
}

def label(name: str, log: bool = False) -> str:
    return LABELS.get(name, name) + (" (log scale)" if log else "")


def figure(groups: list[tuple[str, str]], title: str) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per group (at least one), titled ``title``."""
    count = max(len(groups), 1)
    cols = min(count, 2)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(6.8 * cols, 5.0 * rows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax, (site, arch) in zip(axes, groups):
        ax.set_title(f"{site} · {arch}", fontsize=10)
    if not groups:
        note(axes[0], "no data")
    fig.suptitle(title)
    return fig, axes[:count]


def groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    return [
        (str(s), str(a)) for s, a in df[["site", "arch"]].drop_duplicates().sort_values(["site", "arch"]).to_numpy()
    ]


def rows(df: pd.DataFrame, site: str, arch: str) -> pd.DataFrame:
    return df[(df["site"].astype(str) == site) & (df["arch"].astype(str) == arch)]


def curves(rows: pd.DataFrame) -> list[str]:
    """The rows' curves (a setting without n and seed: ``k32``, ``l0.3``), ordered by the
    value of the sparsity knob."""
    return list(dict.fromkeys(rows.sort_values(["sparsity", "curve"])["curve"]))


def note(ax: Axes, lines: list[str] | str) -> None:
    """Notes (skipped fits, hidden points) in a box under the panel's x-axis label."""
    parts = "\n".join([lines] if isinstance(lines, str) else lines).splitlines()
    text = "\n".join(textwrap.fill(part, 100, subsequent_indent="    ", drop_whitespace=False) for part in parts)
    if text:
        ax.annotate(
            text,
            xy=(0.5, 0.0),
            xycoords=ax.xaxis.label,
            xytext=(0, -6),
            textcoords="offset points",
            fontsize=7.5,
            va="top",
            ha="center",
            bbox={"boxstyle": "round", "facecolor": "lightyellow", "alpha": 0.85},
        )


def integer_ticks(ax: Axes, values: list, axis: str = "x") -> None:
    """Label a log axis at the sweep's own values (e.g. k = 8, 16, 32) rather than at powers of ten."""
    if 1 < len(values) <= 10:
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_ticks(values, [str(int(v)) for v in values])
        target.set_ticks([], minor=True)


def save(fig: Figure, stem: str | Path) -> list[Path]:
    paths = [Path(f"{stem}.png"), Path(f"{stem}.svg")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "saesweep"}):
        fig.savefig(paths[0], dpi=150)
        fig.savefig(paths[1], metadata={"Date": None})
    return paths


def not_applicable(stem: str | Path, title: str, reason: str) -> list[Path]:
    """A figure that says why its metric does not exist in this run (e.g. no LM)."""
    fig = Figure(figsize=(6.4, 2.4), layout="constrained")
    fig.suptitle(title)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, textwrap.fill(f"not applicable: {reason}", 70), ha="center", va="center", fontsize=10)
    return save(fig, stem)


def seed_stats(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Mean, standard deviation and count of ``metric`` over seeds, per ``by``."""
    return df.groupby(by)[metric].agg(["mean", "std", "count"]).reset_index()


def colours(values: list, cmap: str = "viridis") -> dict:
    colormap = mpl.colormaps[cmap]
    return {v: colormap(i / max(len(values) - 1, 1) * 0.9) for i, v in enumerate(values)}


def n_norm(df: pd.DataFrame) -> LogNorm:
    """Log colour scale over the table's dictionary sizes (never zero-width)."""
    low = df["n_latents"].min()
    return LogNorm(low, max(df["n_latents"].max(), low + 1))
