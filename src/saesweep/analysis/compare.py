"""Architectures compared at matched sparsity: each one's metric interpolated along its own
sparsity–reconstruction frontier at the L0 values where several can be compared.

An architecture's frontier at one (site, n) is its cells' (measured L0, metric) points,
seeds averaged per setting, sorted by L0. Its value at an L0 inside [min L0, max L0] is the
linear interpolation of log(metric) in log(L0) between the two neighbouring points (the
frontier is close to a power law, Gao et al. 2024, Fig. 2); outside that range it has none:
no extrapolation. The L0 values compared are the measured L0 of every cell at that
(site, n); a row is kept where at least two architectures have a value, and the lowest
value wins. An architecture with a single setting at some n has no frontier there.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from saesweep.core.files import atomic_path

COMPARED = ("nmse", "delta_lm_loss")


def frontier_points(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One point per setting: mean measured L0 and mean metric over seeds, sorted by L0;
    only points whose metric is positive (a log-log frontier)."""
    points = rows.groupby("setting")[["l0", metric]].mean().reset_index()
    points = points[(points[metric] > 0) & (points["l0"] > 0)]
    return points.sort_values("l0", ignore_index=True)


def interpolate(points: pd.DataFrame, metric: str, l0: float) -> float:
    """The metric at ``l0`` along the frontier (log-log linear), or nan outside its range."""
    if len(points) < 2 or not points["l0"].min() <= l0 <= points["l0"].max():
        return math.nan
    return float(np.exp(np.interp(np.log(l0), np.log(points["l0"]), np.log(points[metric]))))


def matched_l0_table(cells: pd.DataFrame, metric: str = "nmse") -> pd.DataFrame:
    """Rows (site, n_latents, l0, arch, value, l0_min, l0_max, wins): every architecture's
    interpolated ``metric`` at each compared L0 (see the module docstring)."""
    rows = []
    for (site, n), group in cells.dropna(subset=["l0", metric]).groupby(["site", "n_latents"], sort=True):
        frontiers = {arch: frontier_points(g, metric) for arch, g in group.groupby("arch", sort=True)}
        frontiers = {arch: points for arch, points in frontiers.items() if len(points) >= 2}
        for l0 in sorted(group["l0"].round(6).unique()):
            values = {arch: interpolate(points, metric, l0) for arch, points in frontiers.items()}
            values = {arch: value for arch, value in values.items() if not math.isnan(value)}
            if len(values) < 2:
                continue
            best = min(values, key=values.get)
            for arch, value in values.items():
                points = frontiers[arch]
                rows.append({
                    "site": site, "n_latents": int(n), "metric": metric, "l0": float(l0), "arch": arch,
                    "value": value, "l0_min": float(points["l0"].min()), "l0_max": float(points["l0"].max()),
                    "wins": arch == best,
                })
    return pd.DataFrame(rows, columns=["site", "n_latents", "metric", "l0", "arch", "value", "l0_min", "l0_max", "wins"])


def comparison_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (site, n, metric, L0): each architecture's value as a column and the winner."""
    if table.empty:
        return pd.DataFrame(columns=["site", "n_latents", "metric", "l0", "winner"])
    wide = table.pivot_table(index=["site", "n_latents", "metric", "l0"], columns="arch", values="value").reset_index()
    winners = table[table["wins"]].set_index(["site", "n_latents", "metric", "l0"])["arch"].rename("winner")
    wide.columns.name = None
    return wide.merge(winners.reset_index(), on=["site", "n_latents", "metric", "l0"])


def write_comparison(cells_path: Path, csv_path: Path, html_path: Path) -> pd.DataFrame:
    """The comparison of every compared metric: the long table as CSV, the summary as an HTML
    page (one table per metric with a winner column, and each architecture's L0 range)."""
    cells = pd.read_parquet(cells_path)
    table = pd.concat([matched_l0_table(cells, metric) for metric in COMPARED if metric in cells], ignore_index=True)
    with atomic_path(csv_path) as temporary:
        table.to_csv(temporary, index=False)
    sections = []
    for metric, part in table.groupby("metric", sort=False):
        summary = comparison_summary(part).drop(columns="metric")
        ranges = part.groupby(["site", "n_latents", "arch"])[["l0_min", "l0_max"]].first().reset_index()
        sections.append(
            f"<h2>{metric} at matched L0</h2>"
            + summary.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
            + "<h3>L0 range of each architecture's frontier</h3>"
            + ranges.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
        )
    if not sections:
        sections.append(
            "<p>No L0 at which two architectures can be compared: each needs at least two sparsity "
            "settings at a dictionary size, and their L0 ranges must overlap.</p>"
        )
    page = (
        "<html><head><meta charset='utf-8'><title>Architectures at matched L0</title></head><body>"
        "<h1>Architectures at matched L0</h1><p>Each architecture's metric is interpolated (log-log) "
        "along its own frontier of measured L0; no value outside its L0 range. Lower wins.</p>"
        + "".join(sections) + "</body></html>"
    )
    with atomic_path(html_path) as temporary:
        Path(temporary).write_text(page)
    return table
