"""Every figure of a sweep, drawn from the cells table, training logs and fits."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from saesweep.analysis import density_plots, law_plots, plots
from saesweep.analysis.aggregate import with_curves


def draw_all(cells_path: Path, logs_path: Path, fits_path: Path, folder: Path, title: str, metrics: list[str]) -> list[Path]:
    """Write ``{metric}_vs_n``, ``{metric}_vs_k``, ``{metric}_joint`` for each fitted
    metric, and ``dead_fraction``, ``frontier``, ``sparsity_frontier`` and
    ``sparsity_frontier_delta_lm_loss`` (architectures against measured L0), ``k_transfer``
    and ``k_transfer_delta_lm_loss``, ``interpretability``, ``compute_frontier``,
    ``training_curves``, ``dead_latents``, ``dense_fraction`` and ``latent_density`` (PNG
    and SVG)."""
    cells = with_curves(pd.read_parquet(cells_path))
    logs = with_curves(pd.read_parquet(logs_path))
    fits = json.loads(Path(fits_path).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for metric in metrics:
        written += law_plots.plot_metric_vs_n(cells, fits, metric, folder / f"{metric}_vs_n", title)
        written += law_plots.plot_metric_vs_k(cells, fits, metric, folder / f"{metric}_vs_k", title)
        written += law_plots.plot_joint_contours(cells, fits, metric, folder / f"{metric}_joint", title)
    written += plots.plot_dead_fraction(cells, folder / "dead_fraction", title)
    written += plots.plot_frontier(cells, folder / "frontier", title)
    written += plots.plot_sparsity_frontier(cells, folder / "sparsity_frontier", title)
    written += plots.plot_sparsity_frontier(cells, folder / "sparsity_frontier_delta_lm_loss", title, "delta_lm_loss")
    written += plots.plot_k_transfer(cells, folder / "k_transfer", title)
    written += plots.plot_k_transfer(cells, folder / "k_transfer_delta_lm_loss", title, "delta_lm_loss")
    written += plots.plot_interpretability(cells, folder / "interpretability", title)
    written += law_plots.plot_compute_frontier(logs, fits, folder / "compute_frontier", title)
    written += plots.plot_training_curves(logs, folder / "training_curves", title)
    written += plots.plot_dead_latents(logs, folder / "dead_latents", title)
    written += plots.plot_dense_fraction(cells, folder / "dense_fraction", title)
    written += density_plots.plot_latent_density(cells, folder / "latent_density", title)
    return written
