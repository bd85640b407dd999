"""The latent-density figure: per (site, arch), the histogram of how often latents fire
(``evaluation.density``: the fraction of held-out tokens above the firing threshold, on the
fixed log bins every cell shares) of each cell, as the fraction of its n latents per bin."""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from saesweep.analysis import plot_common as pc
from saesweep.evaluation.density import DENSE_DENSITY, density_edges

COUNTS = "firing_histogram_counts"
"""The cells table's column of per-cell histogram counts (``aggregate.cell_row``)."""
STYLES = ("-", "--", ":", "-.")


def plot_latent_density(cells: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """One panel per (site, arch): for each cell (seeds summed), the fraction of its latents
    in each density bin against the density (log scale), coloured by n, one line style per
    curve; dead latents are in no bin (the dead-fraction figure shows them). The dotted
    vertical line marks the dense threshold; the note gives each curve's largest dense
    fraction."""
    edges = 10.0 ** density_edges()
    centres = np.sqrt(edges[:-1] * edges[1:])
    usable = cells[cells[COUNTS].notna()] if COUNTS in cells.columns else cells.iloc[:0]
    groups = pc.groups(usable)
    fig, axes = pc.figure(groups, title)
    norm = pc.n_norm(usable) if len(usable) else None
    for ax, (site, arch) in zip(axes, groups):
        rows = pc.rows(usable, site, arch)
        curves = pc.curves(rows)
        notes = []
        for style, curve in zip(STYLES * len(curves), curves):
            of_curve = rows[rows["curve"] == curve]
            for n, cell in of_curve.groupby("n_latents"):
                counts = np.sum([np.asarray(c, float) for c in cell[COUNTS]], axis=0)
                ax.step(centres, counts / (n * len(cell)), where="mid", ls=style, lw=1.3,
                        color=mpl.colormaps["viridis"](norm(n) * 0.9))
            notes.append(f"{curve}: dense (> {DENSE_DENSITY:.0%} of tokens) at most {of_curve['dense_fraction'].max():.1%} of latents")
        ax.axvline(DENSE_DENSITY, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("latent density: fraction of held-out tokens it fires on (log scale)")
        ax.set_ylabel("fraction of the cell's latents")
        ax.grid(True, alpha=0.25)
        handles = [Line2D([], [], color="black", ls=style, label=curve) for style, curve in zip(STYLES * len(curves), curves)]
        ax.legend(handles=handles, fontsize=8, title="curve")
        pc.note(ax, notes)
    if norm is not None:
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="n (latents)", shrink=0.8)
    return pc.save(fig, stem)
