"""The ``convergence`` figure: the two laws of the training budget of ``analysis.convergence_fits``
(fits.json key ``convergence``), one log-log panel per fitted group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from saesweep.analysis import plot_common as pc


def _draw_power(ax: Axes, group: dict, x: np.ndarray, variable: str) -> None:
    """The fitted a·x^β over the range of x, labelled with β and its interval."""
    if group["status"] not in ("ok", "not resolved") or group["params"]["a"] is None or group["params"]["beta"] is None:
        pc.note(ax, f"not fitted: {group.get('reason', '')}")
        return
    a, beta = group["params"]["a"], group["params"]["beta"]
    lo, hi = group["ci95"]["beta"]
    shown = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    grid = np.geomspace(x.min(), x.max(), 50)
    unresolved = group["status"] == "not resolved"  # dashed, as every law whose exponent's interval includes 0
    ax.plot(grid, a * grid**beta, "--" if unresolved else "-", color="black", lw=1.2,
            label=f"{a:.3g}·{variable}^{beta:.2f}{shown}" + (": not resolved" if unresolved else ""))


def _tokens_panel(ax: Axes, group: dict, cells: pd.DataFrame) -> None:
    """Tokens to convergence against n: converged cells (dots, seeds averaged), cells ended
    by their cap (open triangles at the cap: they needed more) and the law."""
    points = pd.DataFrame(group["points"], columns=["n", "tokens"])
    ax.plot(points["n"], points["tokens"], "o", color="tab:blue", label="converged (mean over seeds)")
    capped = cells[(cells["site"] == group["site"]) & (cells["arch"] == group["arch"])
                   & (cells["curve"] == group["curve"]) & (cells["converged"] == False)]  # noqa: E712 (a nullable column)
    if len(capped):
        ax.plot(capped["n_latents"], capped["tokens"], "^", mfc="none", color="tab:red", label="ended by the cap (needs more)")
    if len(points):
        _draw_power(ax, group, points["n"].to_numpy(float), "n")
    ax.set_xlabel(pc.label("n_latents", log=True))
    ax.set_ylabel("tokens to convergence (log scale)")


def _n_opt_panel(ax: Axes, group: dict) -> None:
    """The compute frontier's size against C (a staircase over the sweep's sizes), each size's
    entry (filled) and the law fitted to the entries."""
    points = pd.DataFrame(group["points"], columns=["compute", "n"])
    entries = pd.DataFrame(group["entries"], columns=["compute", "n"])
    ax.plot(points["compute"], points["n"], "s", mfc="none", color="grey", label="frontier point's n")
    ax.plot(entries["compute"], entries["n"], "s", color="black", label="n enters the frontier (fitted)")
    if len(entries):
        _draw_power(ax, group, entries["compute"].to_numpy(float), "C")
    else:
        pc.note(ax, f"not fitted: {group.get('reason', '')}")
    ax.set_xlabel(pc.label("compute", log=True))
    ax.set_ylabel("compute-optimal size n_opt (log scale)")


def plot_convergence(cells: pd.DataFrame, fits: dict, stem: str | Path, title: str) -> list[Path]:
    """One panel per group of tokens to convergence, then one per compute frontier's n_opt(C);
    a panel saying why when the sweep has no converge-mode cells."""
    convergence = fits.get("convergence", {})
    tokens = convergence.get("tokens_to_converge", {"groups": []})
    n_opt = convergence.get("n_opt", {"groups": []})
    panels = [("tokens", g) for g in tokens["groups"]] or [("none", tokens)]
    panels += [("n_opt", g) for g in n_opt["groups"]]
    titles = [
        (g["site"], f"{g['arch']} {g['curve']}: {'tokens to convergence' if kind == 'tokens' else 'n_opt(C)'}")
        if kind != "none" else ("tokens to convergence", "no converge-mode cells")
        for kind, g in panels
    ]
    fig, axes = pc.figure(titles, title)
    for ax, (kind, group) in zip(axes, panels):
        if kind == "none":
            ax.set_axis_off()
            ax.text(0.5, 0.5, group.get("reason", "no group with converged cells"), ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, wrap=True)
            continue
        if kind == "tokens":
            _tokens_panel(ax, group, cells)
        else:
            _n_opt_panel(ax, group)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, title="law: a·x^β [95% interval of β]", title_fontsize=7)
    return pc.save(fig, stem)
