"""Figures that draw fitted laws: metrics against n and k with their 1-D laws, the joint law's
contours and the compute frontier's law in C (from fits.json, ``analysis.scaling``).

Every function draws one panel per (site, arch) group (or frontier), titles the figure with
``title``, writes ``<stem>.png`` and ``<stem>.svg`` and returns both paths
(``analysis.plot_common``).  A law is drawn by its status (``draw_law``): ok (solid, band),
not resolved (dashed, band, legend and note say so), contradicted (dotted, no band, reason
noted); a skipped fit is shown as "fit skipped: reason".
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm

from saesweep.analysis import plot_common as pc
from saesweep.analysis.compute import MIN_SIZES, compute_points
from saesweep.analysis.laws import predict
from saesweep.analysis.model_choice import CANNOT_TELL
from saesweep.analysis.scaling import find_group, k_family

MARGIN = 1.25
"""The joint law's contours span the observed n and k widened by this factor each side."""


def _law_to_draw(laws: dict) -> dict | None:
    """The fitted law of a {"power", "floor", "comparison"} pair to draw: the one the comparison
    prefers, else (the data cannot tell) the one with the lower leave-one-out error, else (no
    comparison possible) the law with floor, else the pure law; None if neither was fitted."""
    fitted = {form: laws[form] for form in ("floor", "power") if "params" in laws.get(form, {})}
    comparison = laws.get("comparison", {})
    chosen = comparison.get("preferred") or comparison.get("better")
    return fitted.get(chosen) or next(iter(fitted.values()), None)


def _choice_note(name: str, laws: dict) -> list[str]:
    """A note where the comparison cannot tell the pure law from the law with floor."""
    comparison = laws.get("comparison", {})
    if comparison.get("verdict") != CANNOT_TELL:
        return []
    return [
        f"{name}: {comparison['verdict']} pure law from law with floor (leave-one-out error ratio "
        f"{comparison['ratio']:.2g}, needs > {comparison['threshold']:g} or < 1/{comparison['threshold']:g}); "
        f"drawn: the lower ({comparison['better']})"
    ]


def draw_law(ax: Axes, entry: dict, x: str, colour: object, label: str, notes: list[str], name: str) -> None:
    """One fitted 1-D law on ``ax`` by its status: ``ok`` solid with its 95% band; ``not resolved``
    dashed with its band, "not resolved" in the legend and the reason in ``notes``;
    ``contradicted`` dotted without band, its reason in ``notes``."""
    grid = np.asarray(entry["band"]["x"])
    line = predict(entry, **{x if x != "C" else "n": grid})
    if entry["status"] == "contradicted":
        ax.plot(grid, line, ":", color=colour, lw=1.2, label=f"{label}: contradicted")
        notes.append(f"{name}: {entry['law']} contradicted (dotted, no band): {entry['reason']}")
        return
    unresolved = entry["status"] == "not resolved"
    ax.plot(grid, line, "--" if unresolved else "-", color=colour, label=f"{label}: not resolved" if unresolved else label)
    band = [np.asarray(entry["band"][side], dtype=float) for side in ("lo", "hi")]
    ax.fill_between(grid, *band, color=colour, alpha=0.15 if unresolved else 0.2, lw=0)
    if unresolved:
        notes.append(f"{name}: {entry['law']} not resolved (dashed): {entry['reason']}")


def _plot_1d(cells: pd.DataFrame, fits: dict, metric: str, stem: str | Path, title: str, x: str) -> list[Path]:
    """Metric against x ∈ {"n", "k"}, one colour per value of the other variable, with the fitted law."""
    xcol, other, section = ("n_latents", "curve", "vs_n") if x == "n" else ("k", "n_latents", "vs_k")
    groups = pc.groups(cells)
    fig, axes = pc.figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = pc.rows(cells, site, arch) if x == "n" else k_family(pc.rows(cells, site, arch))
        group_fits = find_group(fits, site, arch) or {}
        mfit = group_fits.get(metric, {"status": "skipped", "reason": f"no fit for {metric}"})
        notes = [] if mfit["status"] == "ok" else [f"fit skipped: {mfit['reason']}"]
        positive = rows[rows[metric] > 0]
        log_y = len(positive) > 0
        if not log_y:
            notes.append("no positive value: linear scale")
            positive = rows[rows[metric].notna()]
        elif len(positive) < len(rows):
            notes.append(f"{len(rows) - len(positive)} non-positive/missing value(s) not shown")
        values = pc.curves(rows) if x == "n" else sorted(rows[other].unique())
        colours = pc.colours(values)
        if rows.empty:
            notes.append(f"{arch} has no k: no law in k")
        for value in values:
            stats = pc.seed_stats(positive[positive[other] == value], [xcol], metric)
            colour = colours[value]
            name = value if x == "n" else f"n={value}"
            ax.errorbar(
                stats[xcol],
                stats["mean"],
                yerr=stats["std"].where(stats["count"] > 1),
                fmt="o",
                ms=4,
                color=colour,
                capsize=2,
            )
            laws = mfit.get(section, {}).get(str(value), {}) if mfit["status"] == "ok" else {}
            if laws.get("floor", {}).get("status") == "skipped":
                notes.append(f"{name}: fit skipped (law with floor): {laws['floor']['reason']}")
            entry = _law_to_draw(laws)
            if entry is None:
                ax.plot([], [], "o", color=colour, label=f"{name} (no fit)")
                continue
            p = entry["params"]
            floor = f" + {p['c']:.2g}" if "c" in p else " (no floor)"
            label = f"{name}: {p['a']:.3g}·{x}^{'−' if p['b'] >= 0 else '+'}{abs(p['b']):.3g}{floor}"
            notes += _choice_note(name, laws)
            draw_law(ax, entry, x, colour, label, notes, name)
            if entry["status"] == "contradicted":
                continue
            validation = entry.get("validation", {})
            if validation.get("flagged"):
                notes.append(
                    f"{name}: held-out n={validation['holdout_n']} outside prediction interval "
                    f"(error {validation['max_abs_rel_error']:.1%})"
                )
        ax.set_xscale("log")
        ax.set_yscale("log" if log_y else "linear")
        if log_y:  # the axis follows the observations; a wide interval band is cut at the edges
            ax.set_ylim(positive[metric].min() / 2, positive[metric].max() * 2)
        pc.integer_ticks(ax, sorted(rows[xcol].unique()))
        ax.set_xlabel(pc.label(xcol, log=True))
        ax.set_ylabel(pc.label(metric, log=log_y))
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(
            fontsize=7,
            title="fitted law (band: 95% interval)",
            title_fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
        pc.note(ax, notes)
    return pc.save(fig, stem)


def plot_metric_vs_n(cells: pd.DataFrame, fits: dict, metric: str, stem: str | Path, title: str) -> list[Path]:
    """Log-log metric against n, one colour per k: seed means (± std), a fitted law and its band.

    The law drawn at each k is the one the leave-one-out comparison prefers, a·n^−b + c or
    a·n^−b; where the data cannot tell (noted), the one with the lower leave-one-out error;
    where no comparison is possible, the law with floor, else (skipped, and noted) the pure
    law.  A law whose exponent's 95% interval includes 0 is dashed, "not resolved" in the
    legend, and its reason noted; one that contradicts its premise (the loss falls with n) is
    dotted, without band, and its reason noted.
    """
    return _plot_1d(cells, fits, metric, stem, title, "n")


def plot_metric_vs_k(cells: pd.DataFrame, fits: dict, metric: str, stem: str | Path, title: str) -> list[Path]:
    """Log-log metric against k, one colour per n: seed means (± std), a fitted law and its band,
    chosen and marked as in ``plot_metric_vs_n``."""
    return _plot_1d(cells, fits, metric, stem, title, "k")


def plot_joint_contours(cells: pd.DataFrame, fits: dict, metric: str, stem: str | Path, title: str) -> list[Path]:
    """Filled contours of the joint law L(n, k), observed cells on top in the same colours.

    The contours span the observed n and k ranges widened by a factor MARGIN each side.  A joint
    law that contradicts its premise (the loss falls with n and with k) is not drawn: only the
    observed cells are, with the law and the reason in a note.
    """
    groups = pc.groups(cells)
    fig, axes = pc.figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = pc.rows(cells, site, arch)
        rows = k_family(rows)
        if rows.empty:
            pc.note(ax, f"{arch} has no k: no joint law in n and k")
            continue
        stats = pc.seed_stats(rows[rows[metric] > 0], ["n_latents", "k"], metric)
        entry = ((find_group(fits, site, arch) or {}).get(metric) or {}).get("joint")
        notes = (
            []
            if len(stats) == rows[["n_latents", "k"]].drop_duplicates().shape[0]
            else ["cells with only non-positive/missing values not shown"]
        )
        observed = stats["mean"].to_numpy()
        lo, hi = (observed.min(), observed.max()) if len(observed) else (1e-3, 1.0)
        n_grid = np.geomspace(rows["n_latents"].min() / MARGIN, rows["n_latents"].max() * MARGIN, 80)
        k_grid = np.geomspace(rows["k"].min() / MARGIN, rows["k"].max() * MARGIN, 80)
        label = pc.label(metric, log=True) + "\nfill: joint fit, circles: observed (seed mean)"
        drawn = entry is not None and entry["status"] == "ok"
        if drawn:
            nn, kk = np.meshgrid(n_grid, k_grid)
            z = predict(entry, nn, kk)
            lo, hi = min(lo, z.min()), max(hi, z.max())
            levels = np.geomspace(lo, hi * 1.0001, 13)
            filled = ax.contourf(nn, kk, z, levels=levels, norm=LogNorm(lo, hi), cmap="viridis")
            lines = ax.contour(nn, kk, z, levels=levels[1:-1:2], colors="white", linewidths=0.6)
            ax.clabel(lines, fmt="%.3g", fontsize=7)
            fig.colorbar(filled, ax=ax, label=label, ticks=levels[::2], format="%.3g")
        if entry is not None and entry["status"] == "contradicted":
            notes.append(f"joint fit contradicted (not drawn): {entry['reason']}")
        if entry is not None and "params" in entry:
            p = entry["params"]
            notes.append(
                f"fit: exp({p['alpha']:.3g} {p['beta_k']:+.3g}·ln k {p['beta_n']:+.3g}·ln n "
                f"{p['gamma']:+.3g}·ln k·ln n)\n       + exp({p['zeta']:.3g} {p['eta']:+.3g}·ln k)"
            )
            validation = entry.get("validation", {})
            if validation.get("flagged"):
                notes.append(
                    f"held-out n={validation['holdout_n']} outside prediction interval "
                    f"(max error {validation['max_abs_rel_error']:.1%})"
                )
        else:
            reason = entry["reason"] if entry is not None else f"no fit for {metric}"
            notes.append(f"fit skipped: {reason}")
        points = ax.scatter(
            stats["n_latents"],
            stats["k"],
            c=observed,
            norm=LogNorm(lo, max(hi, lo * 1.001)),
            cmap="viridis",
            edgecolors="black",
            s=40,
            zorder=3,
        )
        if not drawn:
            fig.colorbar(points, ax=ax, label=label.replace("fill: joint fit, ", ""), format="%.3g")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(n_grid[0], n_grid[-1])
        ax.set_ylim(k_grid[0], k_grid[-1])
        pc.integer_ticks(ax, sorted(rows["n_latents"].unique()))
        pc.integer_ticks(ax, sorted(rows["k"].unique()), axis="y")
        ax.set_xlabel(pc.label("n_latents", log=True))
        ax.set_ylabel(pc.label("k", log=True))
        pc.note(ax, notes)
    return pc.save(fig, stem)


def plot_compute_frontier(logs: pd.DataFrame, fits: dict, stem: str | Path, title: str) -> list[Path]:
    """Held-out normalised MSE against training compute C (log-log; ``compute``), one panel per
    (site, arch, curve) with a frontier: every cell's held-out curve (colour: n), the frontier
    points (black) and the law in C that the comparison prefers with its 95% band, drawn by
    status as in ``draw_law``."""
    groups = fits.get("compute_frontier", {}).get("groups", [])
    fig, axes = pc.figure([(g["site"], f"{g['arch']} {g['curve']}") for g in groups], title)
    points = compute_points(logs)
    norm = pc.n_norm(points) if len(points) else None
    cmap = mpl.colormaps["viridis"]
    for ax, group in zip(axes, groups):
        rows = points[(points["site"] == group["site"]) & (points["arch"] == group["arch"]) & (points["curve"] == group["curve"])]
        for (n, _seed), curve in rows.groupby(["n_latents", "seed"]):
            ax.plot(curve["compute"], curve["loss"], "o-", ms=3, lw=1, color=cmap(norm(n)), label=f"n={n}" if _seed == rows["seed"].min() else None)
        edge = pd.DataFrame(group["frontier"])
        ax.plot(edge["compute"], edge["loss"], "s", ms=5, mfc="none", color="black", label="frontier")
        entry = _law_to_draw(group["laws"])
        if entry is not None:
            p = entry["params"]
            floor = f" + {p['c']:.2g}" if "c" in p else ""
            notes = _choice_note("frontier", group["laws"])
            draw_law(ax, entry, "C", "black", f"{p['a']:.3g}·C^−{p['b']:.3g}{floor}", notes, "frontier")
            pc.note(ax, notes)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{group['site']} · {group['arch']} · {group['curve']}", fontsize=10)
        ax.set_xlabel(pc.label("compute", log=True))
        ax.set_ylabel(pc.label("heldout_nmse", log=True))
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, title="law fitted to the frontier (band: 95%)", title_fontsize=7)
    if not groups:
        pc.note(axes[0], f"no curve with held-out points at {MIN_SIZES} or more dictionary sizes")
    return pc.save(fig, stem)
