"""Every figure of a sweep, drawn from the cells table, training logs and fits."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from saesweep.analysis import convergence_plots, curve_plots, density_plots, law_plots, plots
from saesweep.analysis import plot_common as pc
from saesweep.analysis.aggregate import with_curves

LM_FIGURES = ("frontier", "sparsity_frontier_delta_lm_loss", "k_transfer_delta_lm_loss", "interpretability")
"""The figures whose metrics need the LM (ΔLM loss, probes, explanations, ablation)."""
LM_REASON = "not_applicable_downstream"
"""The cells table's column that says why a cell has no LM metric (``evaluation.recovery``)."""


def lm_not_applicable(cells: pd.DataFrame) -> str | None:
    """Why no cell of the table has an LM metric (its ΔLM loss all NaN with a reason), or None."""
    if LM_REASON not in cells or cells["delta_lm_loss"].notna().any() or cells[LM_REASON].isna().any():
        return None
    return str(cells[LM_REASON].iloc[0])


def draw_all(
    cells_path: Path, logs_path: Path, fits_path: Path, frontiers_path: Path, folder: Path, title: str, metrics: list[str]
) -> list[Path]:
    """Write ``{metric}_vs_n``, ``{metric}_vs_k``, ``{metric}_joint`` for each fitted
    metric, and ``dead_fraction``, ``frontier``, ``sparsity_frontier`` and
    ``sparsity_frontier_delta_lm_loss`` (architectures against measured L0, with the envelopes
    of the comparison's settings ``frontiers_path``), ``k_transfer``
    and ``k_transfer_delta_lm_loss``, ``interpretability``, ``compute_frontier``,
    ``training_curves`` and ``training_curves_l0`` (convergence curves on shared axes),
    ``dead_latents``, ``convergence`` (tokens to convergence and n_opt(C)), ``dense_fraction``
    and ``latent_density`` (PNG and SVG). The figures of LM metrics (``LM_FIGURES``) say why
    they are empty when no cell has an LM (synthetic activations)."""
    cells = with_curves(pd.read_parquet(cells_path))
    logs = with_curves(pd.read_parquet(logs_path))
    fits = json.loads(Path(fits_path).read_text())
    frontiers = pd.read_csv(frontiers_path)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for metric in metrics:
        written += law_plots.plot_metric_vs_n(cells, fits, metric, folder / f"{metric}_vs_n", title)
        written += law_plots.plot_metric_vs_k(cells, fits, metric, folder / f"{metric}_vs_k", title)
        written += law_plots.plot_joint_contours(cells, fits, metric, folder / f"{metric}_joint", title)
    written += plots.plot_fraction_vs_n(cells, "dead_fraction", folder / "dead_fraction", title)
    written += plots.plot_sparsity_frontier(cells, frontiers, folder / "sparsity_frontier", title)
    written += plots.plot_k_transfer(cells, folder / "k_transfer", title)
    reason = lm_not_applicable(cells)
    if reason is None:
        written += plots.plot_frontier(cells, folder / "frontier", title)
        written += plots.plot_sparsity_frontier(cells, frontiers, folder / "sparsity_frontier_delta_lm_loss", title, "delta_lm_loss")
        written += plots.plot_k_transfer(cells, folder / "k_transfer_delta_lm_loss", title, "delta_lm_loss")
        written += plots.plot_interpretability(cells, folder / "interpretability", title)
    else:
        written += [path for name in LM_FIGURES for path in pc.not_applicable(folder / name, title, reason)]
    written += law_plots.plot_compute_frontier(logs, fits, folder / "compute_frontier", title)
    written += curve_plots.plot_training_curves(logs, folder / "training_curves", title)
    written += curve_plots.plot_training_curves(logs, folder / "training_curves_l0", title, "heldout_l0", penalty_only=True)
    written += plots.plot_dead_latents(logs, folder / "dead_latents", title)
    written += convergence_plots.plot_convergence(cells, fits, folder / "convergence", title)
    written += plots.plot_fraction_vs_n(cells, "dense_fraction", folder / "dense_fraction", title)
    written += density_plots.plot_latent_density(cells, folder / "latent_density", title)
    return written
