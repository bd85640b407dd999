"""Latent density: the fraction of held-out tokens on which each latent fires, its histogram
on fixed bins (the same for every cell, so that cells and runs can be compared and summed)
and the dense-latent fraction (Gao et al. 2024 count latents that fire on more than 10 % of
tokens as "dense").

With c_j = #{tokens with z_j > ``metrics.DEAD_THRESHOLD``} over N evaluated tokens, the
density of latent j is f_j = c_j / N, and

    dense_fraction = #{j : f_j > DENSE_DENSITY} / n.

The histogram counts the live latents (c_j > 0) by log10 f_j in ``DENSITY_BINS`` equal-width
bins spanning [``LOG10_DENSITY_MIN``, 0] (``metrics.firing_histogram``; a density below
10^LOG10_DENSITY_MIN falls in the first bin); dead latents are counted apart, so the bins
and ``dead`` sum to n. ``density_edges`` is the one source of the bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from saesweep.evaluation.metrics import firing_histogram

LOG10_DENSITY_MIN = -6.0
"""Lower edge of the density histogram, log10 of the fraction of tokens (one in a million)."""
DENSITY_BINS = 24
"""Bins of the density histogram: a quarter decade each over [10⁻⁶, 1]."""
DENSE_DENSITY = 0.1
"""A latent is dense when it fires on more than this fraction of the tokens."""


def density_edges() -> np.ndarray:
    """The histogram's bin edges, log10 density, (DENSITY_BINS + 1,) float64."""
    return np.linspace(LOG10_DENSITY_MIN, 0.0, DENSITY_BINS + 1)


def density_metrics(counts: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    """``dense_fraction`` and ``firing_histogram`` (edges, counts, dead) of the firing counts
    c (n,) over ``n_tokens`` tokens (module docstring)."""
    histogram = firing_histogram(counts, n_tokens, DENSITY_BINS, LOG10_DENSITY_MIN)
    dense = (counts.double() / n_tokens > DENSE_DENSITY).double().mean().item() if counts.numel() else float("nan")
    return {
        "dense_fraction": dense,
        "firing_histogram": {
            "log10_frequency_edges": histogram.edges.tolist(),
            "counts": histogram.counts.tolist(),
            "dead": int(histogram.n_dead),
        },
    }
