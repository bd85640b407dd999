"""Figures of a sweep that draw no law: dead latents (against n, and during training against
tokens per latent), interpretability against n with its intervals, the ΔLM-loss / NMSE
frontier, Multi-TopK curves and the sparsity frontier (figures with laws:
``analysis.law_plots``; convergence curves: ``analysis.curve_plots``).

Every function draws one panel per (site, arch) group, titles the figure with ``title``,
writes ``<stem>.png`` and ``<stem>.svg`` and returns both paths (``analysis.plot_common``).
Log axes cannot show non-positive values: such points are left out and counted in a note on
the panel.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, ScalarFormatter

from saesweep.analysis import plot_common as pc
from saesweep.analysis.intervals import paired_trend, point_intervals, trend_across_n
from saesweep.analysis.scaling import k_family

INTERPRETABILITY = ("probe_loss", "explain_precision", "explain_recall", "ablation_sparsity")
MARKERS = "osD^v<>Pp*hX"
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def _lines_per_curve(ax: Axes, rows: pd.DataFrame, metric: str) -> None:
    """``metric`` against n (log scale), one line per curve (``k32``, ``l0.3``): seed means
    ± std (std with ≥ 2 seeds)."""
    stats = pc.seed_stats(rows[rows[metric].notna()], ["curve", "n_latents"], metric)
    curves = [curve for curve in pc.curves(rows) if curve in set(stats["curve"])]
    colours = pc.colours(curves)
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
    pc.integer_ticks(ax, sorted(rows["n_latents"].unique()))
    ax.set_xlabel(pc.label("n_latents", log=True))
    ax.set_ylabel(pc.label(metric))
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)


def plot_fraction_vs_n(cells: pd.DataFrame, column: str, stem: str | Path, title: str) -> list[Path]:
    """A fraction of the latents (``column``: ``dead_fraction``, or ``dense_fraction``, the
    latents firing on more than 10 % of the held-out tokens, ``evaluation.density``) against n
    (log scale), one line per curve, seed means ± std."""
    groups = pc.groups(cells)
    fig, axes = pc.figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        _lines_per_curve(ax, pc.rows(cells, site, arch), column)
        ax.set_ylim(-0.02, 1.02)
    return pc.save(fig, stem)


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
    fig, axes = pc.figure([(site, f"{arch} · n={n}") for site, arch, n in keys], title)
    for ax, (site, arch, n) in zip(axes, keys):
        cells = pc.rows(train_logs, site, arch)
        cells = cells[cells["n_latents"] == n]
        curves = pc.curves(cells)
        colours = pc.colours(curves, "tab10")
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
        pc.note(axes[0], "no training log with held-out points (train.heldout.points is 0)")
    return pc.save(fig, stem)


def _interval_lines(ax: Axes, rows: pd.DataFrame, metric: str) -> None:
    """``metric`` against n (log scale), one line per curve, with 95% intervals over the
    sampled units and seeds (``intervals.point_intervals``); each curve's legend entry says
    whether its change across n is resolved (``intervals.paired_trend`` where the units are
    the same in every cell, else ``intervals.trend_across_n``)."""
    points = point_intervals(rows, metric)
    curves = [curve for curve in pc.curves(rows) if curve in set(points["curve"])]
    colours = pc.colours(curves)
    for curve in curves:
        p = points[points["curve"] == curve]
        trend = paired_trend(rows[rows["curve"] == curve], metric) or trend_across_n(p)
        ax.errorbar(p["n_latents"], p["mean"], yerr=p["half_width"], fmt="o-", ms=4, capsize=2,
                    color=colours[curve], label=f"{curve}: {trend}")
    ax.set_xscale("log")
    pc.integer_ticks(ax, sorted(rows["n_latents"].unique()))
    ax.set_xlabel(pc.label("n_latents", log=True))
    ax.set_ylabel(pc.label(metric))
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, title="trend in n (95%)", title_fontsize=8)


def plot_interpretability(cells: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """Probe loss, n-gram precision and recall, and ablation sparsity against n, one line per
    curve with 95% intervals; one row of four panels per (site, arch) group. Metrics missing
    from the table are noted."""
    groups = pc.groups(cells)
    rows_count = max(len(groups), 1)
    fig = Figure(figsize=(4.6 * len(INTERPRETABILITY), 4.0 * rows_count), layout="constrained")
    grid = fig.subplots(rows_count, len(INTERPRETABILITY), squeeze=False)
    fig.suptitle(title)
    for axes, (site, arch) in zip(grid, groups):
        rows = pc.rows(cells, site, arch)
        for ax, metric in zip(axes, INTERPRETABILITY):
            ax.set_title(f"{site} · {arch}", fontsize=10)
            if metric in rows and rows[metric].notna().any():
                _interval_lines(ax, rows, metric)
            else:
                ax.set_xlabel(pc.label("n_latents", log=True))
                ax.set_ylabel(pc.label(metric))
                pc.note(ax, f"no {metric} in the table")
    if not groups:
        pc.note(grid[0][0], "no data")
    return pc.save(fig, stem)


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
    groups = pc.groups(transferable) or pc.groups(cells)[:1]
    fig, axes = pc.figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = k_family(pc.rows(transferable, site, arch))
        norm = pc.n_norm(cells)
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
        ax.set_xlabel(pc.label("k_test", log=True))
        ax.set_ylabel(pc.label(metric, log=True))
        ax.grid(True, which="both", alpha=0.25)
        if not columns:
            pc.note(ax, f"no k_transfer_{metric}_* columns in the table: no TopK or Multi-TopK cell")
    return pc.save(fig, stem)


def _n_colour_k_style_key(
    fig: Figure, ax: Axes, norm: LogNorm, ks: list, k_label: str = "k={}", extra: list[Line2D] | None = None
) -> None:
    """The key of a panel whose lines are coloured by n (a colour bar) and styled by k (a legend)."""
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=pc.label("n_latents", log=True))
    styles = [
        Line2D([], [], color="grey", ls=LINESTYLES[i % len(LINESTYLES)], label=k_label.format(k))
        for i, k in enumerate(ks)
    ]
    ax.legend(handles=styles + (extra or []), fontsize=8)


def plot_frontier(cells: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """ΔLM loss against normalised MSE, one marker per cell (colour: n, marker: k)."""
    groups = pc.groups(cells)
    fig, axes = pc.figure(groups, title)
    for ax, (site, arch) in zip(axes, groups):
        rows = pc.rows(cells, site, arch)
        shown = rows[rows["nmse"] > 0]
        norm = pc.n_norm(cells)
        ks = pc.curves(rows)
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
            fig.colorbar(points, ax=ax, label=pc.label("n_latents", log=True))
        ax.legend(
            handles=[
                Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="grey", label=k)
                for i, k in enumerate(ks)
            ],
            fontsize=8,
        )
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(pc.label("nmse", log=True))
        ax.set_ylabel(pc.label("delta_lm_loss"))
        ax.grid(True, which="both", alpha=0.25)
        if len(shown) < len(rows):
            pc.note(ax, f"{len(rows) - len(shown)} cell(s) with non-positive or missing NMSE not shown")
    return pc.save(fig, stem)


def plot_sparsity_frontier(
    cells: pd.DataFrame, frontiers: pd.DataFrame, stem: str | Path, title: str, metric: str = "nmse"
) -> list[Path]:
    """Architectures side by side (Gao et al. 2024, Fig. 2): ``metric`` against L0, log-log, one
    panel per (site, n), each point a setting labelled with its curve (``k32``, ``l0.3-lr2``).

    ``nmse``: every setting's test point (``frontiers``, from ``analysis.compare``), hollow; the
    settings on the architecture's envelope (chosen on validation windows) filled and joined,
    with the band of their 95 % bootstrap intervals (test windows and seeds). Other metrics
    (measured on the downstream windows, without a validation/test split): the cells' seed
    means ± std against their L0, the settings of the nmse envelope joined, no band."""
    shown = cells[(cells[metric] > 0) & (cells["l0"] > 0)]
    panels = [(str(site), f"n={n}") for site, n in shown[["site", "n_latents"]].drop_duplicates().sort_values(["site", "n_latents"]).to_numpy()]
    fig, axes = pc.figure(panels, title)
    archs = sorted(cells["arch"].unique())
    colours = dict(zip(archs, mpl.colormaps["tab10"].colors))
    curves = cells.drop_duplicates("setting").set_index("setting")["curve"]
    for ax, (site, n_label) in zip(axes, panels):
        n = int(n_label[2:])
        here = frontiers[(frontiers["site"] == site) & (frontiers["n_latents"] == n)]
        rows = shown[(shown["site"] == site) & (shown["n_latents"] == n)]
        for index, arch in enumerate(archs):
            if metric == "nmse":
                points = here[(here["arch"] == arch) & (here["test_nmse"] > 0) & (here["test_l0"] > 0)]
                points = points.set_index("setting")[["test_l0", "test_nmse", "test_nmse_lo", "test_nmse_hi", "on_envelope"]]
                points.columns = ["l0", "value", "lo", "hi", "on_envelope"]
            else:
                stats = rows[rows["arch"] == arch].groupby("setting")[["l0", metric]].agg(["mean", "std", "count"])
                points = pd.DataFrame({
                    "l0": stats[("l0", "mean")], "value": stats[(metric, "mean")],
                    "std": stats[(metric, "std")].where(stats[(metric, "count")] > 1),
                    "on_envelope": here.set_index("setting")["on_envelope"].reindex(stats.index, fill_value=False),
                })
            if points.empty:
                continue
            marker, colour = MARKERS[index % len(MARKERS)], colours[arch]
            envelope = points[points["on_envelope"].astype(bool)].sort_values("l0")
            if "std" in points:
                ax.errorbar(points["l0"], points["value"], yerr=points["std"], fmt="none", capsize=2, color=colour)
            ax.plot(points["l0"], points["value"], marker, mfc="none", ms=5, color=colour, alpha=0.6)
            ax.plot(envelope["l0"], envelope["value"], marker + "-", ms=5, color=colour, label=arch)
            if "lo" in envelope:
                ax.fill_between(envelope["l0"], envelope["lo"], envelope["hi"], color=colour, alpha=0.2, lw=0)
            for setting, point in points.iterrows():
                ax.annotate(curves.get(setting, setting), (point["l0"], point["value"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=colour)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(pc.label("l0", log=True))
        ax.set_ylabel(pc.label(metric, log=True) + (" (test windows)" if metric == "nmse" else ""))
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, title="architecture (envelope)", title_fontsize=8)
    return pc.save(fig, stem)
