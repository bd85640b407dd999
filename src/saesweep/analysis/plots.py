"""Figures of a sweep: metrics against n and k with their fitted laws, the joint law, dead latents
(against n, and during training against tokens per latent),
the ΔLM-loss / NMSE frontier, Multi-TopK curves, interpretability against n and training curves.

Every function draws one panel per (site, arch) group, titles the figure with ``title``,
writes ``<stem>.png`` and ``<stem>.svg`` (SVG text kept as text) and returns both paths.
Figures are built on ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot, so no
global backend state is touched.  Log axes cannot show non-positive values: such points are
left out and counted in a note on the panel; a skipped fit is shown as "fit skipped: reason".
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
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, ScalarFormatter

from saesweep.analysis.compute import FLOPS, MIN_SIZES, compute_points
from saesweep.analysis.intervals import paired_trend, point_intervals, trend_across_n
from saesweep.analysis.scaling import find_group, k_family, predict

LABELS = {
    "nmse": "normalised MSE",
    "delta_lm_loss": "ΔLM loss (nats/token)",
    "dead_fraction": "dead latents (fraction of n)",
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
    "explain_precision": "n-gram explanation precision",
    "explain_recall": "n-gram explanation recall",
    "ablation_sparsity": "ablation sparsity (lower: sparser effect)",
}
INTERPRETABILITY = ("probe_loss", "explain_precision", "explain_recall", "ablation_sparsity")
MARKERS = "osD^v<>Pp*hX"
MARGIN = 1.25
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def _label(name: str, log: bool = False) -> str:
    return LABELS.get(name, name) + (" (log scale)" if log else "")


def _figure(groups: list[tuple[str, str]], title: str) -> tuple[Figure, list[Axes]]:
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
        _note(axes[0], "no data")
    fig.suptitle(title)
    return fig, axes[:count]


def _groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    return [
        (str(s), str(a)) for s, a in df[["site", "arch"]].drop_duplicates().sort_values(["site", "arch"]).to_numpy()
    ]


def _rows(df: pd.DataFrame, site: str, arch: str) -> pd.DataFrame:
    return df[(df["site"].astype(str) == site) & (df["arch"].astype(str) == arch)]


def _curves(rows: pd.DataFrame) -> list[str]:
    """The rows' curves (a setting without n and seed: ``k32``, ``l0.3``), ordered by the
    value of the sparsity knob."""
    return list(dict.fromkeys(rows.sort_values(["sparsity", "curve"])["curve"]))


def _note(ax: Axes, lines: list[str] | str) -> None:
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


def _integer_ticks(ax: Axes, values: list, axis: str = "x") -> None:
    """Label a log axis at the sweep's own values (e.g. k = 8, 16, 32) rather than at powers of ten."""
    if 1 < len(values) <= 10:
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_ticks(values, [str(int(v)) for v in values])
        target.set_ticks([], minor=True)


def _save(fig: Figure, stem: str | Path) -> list[Path]:
    paths = [Path(f"{stem}.png"), Path(f"{stem}.svg")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "saesweep"}):
        fig.savefig(paths[0], dpi=150)
        fig.savefig(paths[1], metadata={"Date": None})
    return paths


def _seed_stats(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Mean, standard deviation and count of ``metric`` over seeds, per ``by``."""
    return df.groupby(by)[metric].agg(["mean", "std", "count"]).reset_index()


def _colours(values: list, cmap: str = "viridis") -> dict:
    colormap = mpl.colormaps[cmap]
    return {v: colormap(i / max(len(values) - 1, 1) * 0.9) for i, v in enumerate(values)}


def _law_to_draw(laws: dict) -> dict | None:
    """The fitted law of a {"power", "floor", "comparison"} pair to draw: the one AICc prefers,
    else (no comparison possible) the law with floor, else the pure law; None if neither was fitted."""
    fitted = {form: laws[form] for form in ("floor", "power") if "params" in laws.get(form, {})}
    preferred = laws.get("comparison", {}).get("preferred")
    return fitted.get(preferred) or next(iter(fitted.values()), None)


def _plot_1d(cells: pd.DataFrame, fits: dict, metric: str, stem: str | Path, title: str, x: str) -> list[Path]:
    """Metric against x ∈ {"n", "k"}, one colour per value of the other variable, with the fitted law."""
    xcol, other, section = ("n_latents", "curve", "vs_n") if x == "n" else ("k", "n_latents", "vs_k")
    groups = _groups(cells)
    fig, axes = _figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = _rows(cells, site, arch) if x == "n" else k_family(_rows(cells, site, arch))
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
        values = _curves(rows) if x == "n" else sorted(rows[other].unique())
        colours = _colours(values)
        if rows.empty:
            notes.append(f"{arch} has no k: no law in k")
        for value in values:
            stats = _seed_stats(positive[positive[other] == value], [xcol], metric)
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
            grid = np.asarray(entry["band"]["x"])
            floor = f" + {p['c']:.2g}" if "c" in p else " (no floor)"
            label = f"{name}: {p['a']:.3g}·{x}^{'−' if p['b'] >= 0 else '+'}{abs(p['b']):.3g}{floor}"
            if entry["status"] == "contradicted":
                ax.plot(grid, predict(entry, **{x: grid}), ":", color=colour, lw=1.2, label=f"{label}: contradicted")
                notes.append(f"{name}: {entry['law']} contradicted (dotted, no band): {entry['reason']}")
                continue
            ax.plot(grid, predict(entry, **{x: grid}), "-", color=colour, label=label)
            band = [np.asarray(entry["band"][side], dtype=float) for side in ("lo", "hi")]
            ax.fill_between(grid, *band, color=colour, alpha=0.2, lw=0)
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
        _integer_ticks(ax, sorted(rows[xcol].unique()))
        ax.set_xlabel(_label(xcol, log=True))
        ax.set_ylabel(_label(metric, log=log_y))
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(
            fontsize=7,
            title="fitted law (band: 95% interval)",
            title_fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
        _note(ax, notes)
    return _save(fig, stem)


def plot_metric_vs_n(cells: pd.DataFrame, fits: dict, metric: str, stem: str | Path, title: str) -> list[Path]:
    """Log-log metric against n, one colour per k: seed means (± std), a fitted law and its band.

    The law drawn at each k is the one AICc prefers, a·n^−b + c or a·n^−b; where no comparison is
    possible, the law with floor, else (skipped, and noted) the pure law.  A law that contradicts
    its premise (the loss falls with n) is dotted, without band, and its reason noted.
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
    groups = _groups(cells)
    fig, axes = _figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = _rows(cells, site, arch)
        rows = k_family(rows)
        if rows.empty:
            _note(ax, f"{arch} has no k: no joint law in n and k")
            continue
        stats = _seed_stats(rows[rows[metric] > 0], ["n_latents", "k"], metric)
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
        label = _label(metric, log=True) + "\nfill: joint fit, circles: observed (seed mean)"
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
        _integer_ticks(ax, sorted(rows["n_latents"].unique()))
        _integer_ticks(ax, sorted(rows["k"].unique()), axis="y")
        ax.set_xlabel(_label("n_latents", log=True))
        ax.set_ylabel(_label("k", log=True))
        _note(ax, notes)
    return _save(fig, stem)


def _lines_per_curve(ax: Axes, rows: pd.DataFrame, metric: str) -> None:
    """``metric`` against n (log scale), one line per curve (``k32``, ``l0.3``): seed means
    ± std (std with ≥ 2 seeds)."""
    stats = _seed_stats(rows[rows[metric].notna()], ["curve", "n_latents"], metric)
    curves = [curve for curve in _curves(rows) if curve in set(stats["curve"])]
    colours = _colours(curves)
    for curve in curves:
        s = stats[stats["curve"] == curve]
        ax.errorbar(
            s["n_latents"],
            s["mean"],
            yerr=s["std"].where(s["count"] > 1),
            fmt="o-",
            ms=4,
            capsize=2,
            color=colours[curve],
            label=curve,
        )
    ax.set_xscale("log")
    _integer_ticks(ax, sorted(rows["n_latents"].unique()))
    ax.set_xlabel(_label("n_latents", log=True))
    ax.set_ylabel(_label(metric))
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)


def plot_dead_fraction(cells: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """Dead-latent fraction against n (log scale), one line per k, seed means ± std."""
    groups = _groups(cells)
    fig, axes = _figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        _lines_per_curve(ax, _rows(cells, site, arch), "dead_fraction")
        ax.set_ylim(-0.02, 1.02)
    return _save(fig, stem)


def plot_dead_latents(train_logs: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """Dead latents during training against tokens per latent (training tokens / n, log
    scale), one panel per (site, arch, n), one colour per curve (e.g. the dead-latent study's
    variants ``k8-ax0-ti0``): solid with markers, the fraction that never fires on the
    held-out sample (``heldout_dead_fraction``); dashed, the fraction without a firing in the
    training dead window (``dead_fraction``, what AuxK acts on). Each legend entry gives the
    firings a latent at the uniform rate L0 / n would have in the held-out sample and in
    the window (at the last held-out point): a latent silent for far fewer is rare, not dead."""
    if "heldout_dead_fraction" not in train_logs.columns:
        train_logs = train_logs.assign(heldout_dead_fraction=np.nan)
    logs = train_logs[train_logs["heldout_dead_fraction"].notna()]
    keys = [tuple(key) for key in logs[["site", "arch", "n_latents"]].drop_duplicates().sort_values(["site", "arch", "n_latents"]).to_numpy()]
    fig, axes = _figure([(site, f"{arch} · n={n}") for site, arch, n in keys], title)
    for ax, (site, arch, n) in zip(axes, keys):
        cells = _rows(train_logs, site, arch)
        cells = cells[cells["n_latents"] == n]
        curves = _curves(cells)
        colours = _colours(curves, "tab10")
        for (curve, seed), rows in cells.sort_values("tokens").groupby(["curve", "seed"]):
            per_latent = rows["tokens"] / n
            held = rows[rows["heldout_dead_fraction"].notna()]
            last = held.iloc[-1]
            label = (f"{curve}: expect {last['heldout_expected_firings']:.3g} held-out, "
                     f"{last['window_expected_firings']:.3g} window firings")
            first_seed = seed == cells["seed"].min()
            ax.plot(held["tokens"] / n, held["heldout_dead_fraction"], "o-", ms=3, lw=1.2,
                    color=colours[curve], label=label if first_seed else None)
            ax.plot(per_latent, rows["dead_fraction"], "--", lw=1, color=colours[curve])
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training tokens per latent (tokens / n, log scale)")
        ax.set_ylabel("dead latents (fraction of n)")
        ax.grid(True, which="both", alpha=0.25)
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="black", marker="o", ms=3), Line2D([], [], color="black", ls="--")]
        labels += ["never fires on the held-out tokens", "no firing in the training dead window"]
        ax.legend(handles, labels, fontsize=7)
    if not keys:
        _note(axes[0], "no training log with held-out points (train.heldout.points is 0)")
    return _save(fig, stem)


def _interval_lines(ax: Axes, rows: pd.DataFrame, metric: str) -> None:
    """``metric`` against n (log scale), one line per curve, with 95% intervals over the
    sampled units and seeds (``intervals.point_intervals``); each curve's legend entry says
    whether its change across n is resolved (``intervals.paired_trend`` where the units are
    the same in every cell, else ``intervals.trend_across_n``)."""
    points = point_intervals(rows, metric)
    curves = [curve for curve in _curves(rows) if curve in set(points["curve"])]
    colours = _colours(curves)
    for curve in curves:
        p = points[points["curve"] == curve]
        trend = paired_trend(rows[rows["curve"] == curve], metric) or trend_across_n(p)
        ax.errorbar(p["n_latents"], p["mean"], yerr=p["half_width"], fmt="o-", ms=4, capsize=2,
                    color=colours[curve], label=f"{curve}: {trend}")
    ax.set_xscale("log")
    _integer_ticks(ax, sorted(rows["n_latents"].unique()))
    ax.set_xlabel(_label("n_latents", log=True))
    ax.set_ylabel(_label(metric))
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, title="trend in n (95%)", title_fontsize=8)


def plot_compute_frontier(logs: pd.DataFrame, fits: dict, stem: str | Path, title: str) -> list[Path]:
    """Held-out normalised MSE against training compute C (log-log; ``compute``), one panel per
    (site, arch, curve) with a frontier: every cell's held-out curve (colour: n), the frontier
    points (black) and the law in C that AICc prefers with its 95% band (dotted, no band, when
    it contradicts its premise)."""
    groups = fits.get("compute_frontier", {}).get("groups", [])
    fig, axes = _figure([(g["site"], f"{g['arch']} {g['curve']}") for g in groups], title)
    points = compute_points(logs)
    norm = _n_norm(points) if len(points) else None
    cmap = mpl.colormaps["viridis"]
    for ax, group in zip(axes, groups):
        rows = points[(points["site"] == group["site"]) & (points["arch"] == group["arch"]) & (points["curve"] == group["curve"])]
        for (n, _seed), curve in rows.groupby(["n_latents", "seed"]):
            ax.plot(curve["compute"], curve["loss"], "o-", ms=3, lw=1, color=cmap(norm(n)), label=f"n={n}" if _seed == rows["seed"].min() else None)
        edge = pd.DataFrame(group["frontier"])
        ax.plot(edge["compute"], edge["loss"], "s", ms=5, mfc="none", color="black", label="frontier")
        entry = _law_to_draw(group["laws"])
        if entry is not None:
            p, grid = entry["params"], np.asarray(entry["band"]["x"])
            floor = f" + {p['c']:.2g}" if "c" in p else ""
            label = f"{p['a']:.3g}·C^−{p['b']:.3g}{floor}"
            if entry["status"] == "contradicted":
                ax.plot(grid, predict(entry, n=grid), ":", color="black", label=f"{label}: contradicted")
                _note(ax, [f"{entry['law']} contradicted: {entry['reason']}"])
            else:
                ax.plot(grid, predict(entry, n=grid), "-", color="black", lw=1.5, label=label)
                band = [np.asarray(entry["band"][side], dtype=float) for side in ("lo", "hi")]
                ax.fill_between(grid, *band, color="black", alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{group['site']} · {group['arch']} · {group['curve']}", fontsize=10)
        ax.set_xlabel(_label("compute", log=True))
        ax.set_ylabel(_label("heldout_nmse", log=True))
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, title="law fitted to the frontier (band: 95%)", title_fontsize=7)
    if not groups:
        _note(axes[0], f"no curve with held-out points at {MIN_SIZES} or more dictionary sizes")
    return _save(fig, stem)


def plot_interpretability(cells: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """Probe loss, n-gram precision and recall, and ablation sparsity against n, one line per
    curve with 95% intervals; one row of four panels per (site, arch) group. Metrics missing
    from the table are noted."""
    groups = _groups(cells)
    rows_count = max(len(groups), 1)
    fig = Figure(figsize=(4.6 * len(INTERPRETABILITY), 4.0 * rows_count), layout="constrained")
    grid = fig.subplots(rows_count, len(INTERPRETABILITY), squeeze=False)
    fig.suptitle(title)
    for axes, (site, arch) in zip(grid, groups):
        rows = _rows(cells, site, arch)
        for ax, metric in zip(axes, INTERPRETABILITY):
            ax.set_title(f"{site} · {arch}", fontsize=10)
            if metric in rows and rows[metric].notna().any():
                _interval_lines(ax, rows, metric)
            else:
                ax.set_xlabel(_label("n_latents", log=True))
                ax.set_ylabel(_label(metric))
                _note(ax, f"no {metric} in the table")
    if not groups:
        _note(grid[0][0], "no data")
    return _save(fig, stem)


def k_transfer_columns(cells: pd.DataFrame, metric: str) -> dict[int, str]:
    """Test-time k′ → column ``k_transfer_{metric}_{k′}`` of the table, in increasing k′."""
    prefix = f"k_transfer_{metric}_"
    found = {int(c[len(prefix):]): c for c in cells.columns if c.startswith(prefix) and c[len(prefix):].isdigit()}
    return dict(sorted(found.items()))


def plot_k_transfer(cells: pd.DataFrame, stem: str | Path, title: str, metric: str = "nmse") -> list[Path]:
    """The k-transfer sweep: ``metric`` of each trained SAE evaluated keeping k′ latents per
    token, against k′ (log-log), one panel per architecture that allows it (TopK beside
    Multi-TopK: Gao et al. 2024, Fig. 10); colour: n, line style: the training k, whose own
    point is a larger marker."""
    columns = k_transfer_columns(cells, metric)
    transferable = cells[cells[list(columns.values())].notna().any(axis=1)] if columns else cells.iloc[:0]
    groups = _groups(transferable) or _groups(cells)[:1]
    fig, axes = _figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = k_family(_rows(transferable, site, arch))
        norm = _n_norm(cells)
        cmap = mpl.colormaps["viridis"]
        ks = sorted(int(k) for k in rows["k"].unique())  # whole numbers, though the column is float
        for (n, k), cell in rows.groupby(["n_latents", "k"]):
            means = cell[list(columns.values())].mean()
            shown = [(k_test, means[c]) for k_test, c in columns.items() if means[c] > 0]
            if not shown:
                continue
            x, y = zip(*shown)
            colour, style = cmap(norm(n)), LINESTYLES[ks.index(k) % len(LINESTYLES)]
            ax.plot(x, y, marker="o", ms=3, ls=style, color=colour, lw=1)
            own = dict(shown).get(int(k))
            if own is not None:
                ax.plot([k], [own], marker="*", ms=11, color=colour, markeredgecolor="black", ls="")
        star = Line2D([], [], color="grey", marker="*", ms=10, ls="", markeredgecolor="black", label="k′ = k")
        _n_colour_k_style_key(fig, ax, norm, ks, "trained at k={}", [star])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(_label("k_test", log=True))
        ax.set_ylabel(_label(metric, log=True))
        ax.grid(True, which="both", alpha=0.25)
        if not columns:
            _note(ax, f"no k_transfer_{metric}_* columns in the table: no TopK or Multi-TopK cell")
    return _save(fig, stem)


def _n_norm(df: pd.DataFrame) -> LogNorm:
    """Log colour scale over the table's dictionary sizes (never zero-width)."""
    low = df["n_latents"].min()
    return LogNorm(low, max(df["n_latents"].max(), low + 1))


def _n_colour_k_style_key(
    fig: Figure, ax: Axes, norm: LogNorm, ks: list, k_label: str = "k={}", extra: list[Line2D] | None = None
) -> None:
    """The key of a panel whose lines are coloured by n (a colour bar) and styled by k (a legend)."""
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=_label("n_latents", log=True))
    styles = [
        Line2D([], [], color="grey", ls=LINESTYLES[i % len(LINESTYLES)], label=k_label.format(k))
        for i, k in enumerate(ks)
    ]
    ax.legend(handles=styles + (extra or []), fontsize=8)


def plot_frontier(cells: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """ΔLM loss against normalised MSE, one marker per cell (colour: n, marker: k)."""
    groups = _groups(cells)
    fig, axes = _figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = _rows(cells, site, arch)
        shown = rows[rows["nmse"] > 0]
        norm = _n_norm(cells)
        ks = _curves(rows)
        for i, k in enumerate(ks):
            s = shown[shown["curve"] == k]
            points = ax.scatter(
                s["nmse"],
                s["delta_lm_loss"],
                c=s["n_latents"],
                norm=norm,
                cmap="viridis",
                marker=MARKERS[i % len(MARKERS)],
                edgecolors="black",
                linewidths=0.4,
                s=36,
            )
        if ks:
            fig.colorbar(points, ax=ax, label=_label("n_latents", log=True))
        ax.legend(
            handles=[
                Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="grey", label=k)
                for i, k in enumerate(ks)
            ],
            fontsize=8,
        )
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(_label("nmse", log=True))
        ax.set_ylabel(_label("delta_lm_loss"))
        ax.grid(True, which="both", alpha=0.25)
        if len(shown) < len(rows):
            _note(ax, f"{len(rows) - len(shown)} cell(s) with non-positive or missing NMSE not shown")
    return _save(fig, stem)


def plot_training_curves(train_logs: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """Normalised MSE against training tokens for every cell (colour: n, line style: curve)."""
    groups = _groups(train_logs)
    fig, axes = _figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = _rows(train_logs, site, arch)
        rows = rows[rows["nmse"] > 0]
        norm = _n_norm(train_logs)
        cmap = mpl.colormaps["viridis"]
        ks = _curves(rows)
        for (n, k, _seed), s in rows.sort_values("tokens").groupby(["n_latents", "curve", "seed"]):
            ax.plot(s["tokens"], s["nmse"], color=cmap(norm(n)), ls=LINESTYLES[ks.index(k) % len(LINESTYLES)], lw=1)
        _n_colour_k_style_key(fig, ax, norm, ks, "{}")
        ax.set_yscale("log")
        ax.set_xlabel(_label("tokens"))
        ax.set_ylabel(_label("nmse", log=True))
        ax.grid(True, which="both", alpha=0.25)
    return _save(fig, stem)


def plot_sparsity_frontier(cells: pd.DataFrame, stem: str | Path, title: str, metric: str = "nmse") -> list[Path]:
    """Architectures side by side (Gao et al. 2024, Fig. 2): ``metric`` against measured L0,
    log-log, one panel per (site, n), one line per architecture through its settings (seed
    means ± std), each point labelled with its curve (``k32``, ``l0.3``)."""
    shown = cells[(cells[metric] > 0) & (cells["l0"] > 0)]
    panels = [(str(site), f"n={n}") for site, n in shown[["site", "n_latents"]].drop_duplicates().sort_values(["site", "n_latents"]).to_numpy()]
    fig, axes = _figure(panels, title)
    archs = sorted(cells["arch"].unique())
    colours = dict(zip(archs, mpl.colormaps["tab10"].colors))
    for ax, (site, n_label) in zip(axes, panels):
        rows = shown[(shown["site"] == site) & (shown["n_latents"] == int(n_label[2:]))]
        for index, arch in enumerate(archs):
            stats = rows[rows["arch"] == arch].groupby("curve")[["l0", metric]].agg(["mean", "std", "count"])
            if stats.empty:
                continue
            stats = stats.sort_values(("l0", "mean"))
            ax.errorbar(
                stats[("l0", "mean")], stats[(metric, "mean")],
                yerr=stats[(metric, "std")].where(stats[(metric, "count")] > 1),
                fmt=MARKERS[index % len(MARKERS)] + "-", ms=5, capsize=2, color=colours[arch], label=arch,
            )
            for curve, point in stats.iterrows():
                ax.annotate(curve, (point[("l0", "mean")], point[(metric, "mean")]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=colours[arch])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(_label("l0", log=True))
        ax.set_ylabel(_label(metric, log=True))
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, title="architecture", title_fontsize=8)
    return _save(fig, stem)
