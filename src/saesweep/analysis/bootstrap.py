"""Parametric bootstrap of a fitted law: intervals that suit a handful of cells.

Resampling cells fails with few of them (with 5 cells, a replicate holds the 4 distinct x a
law with floor needs only about 42 % of the time, and replicates with p + 1 cells reproduce
the data). Instead each replicate simulates new cell means from the fitted law,

    log y*_i = log L̂(x_i) + σ* z_i,   z_i ~ N(0, 1),   σ*² = s² (m − p) / χ²_{m−p},

with s² = Σ r² / (m − p) the fit's log-residual variance on m − p degrees of freedom. Drawing
σ* (rather than fixing σ* = s) carries the uncertainty of s, as the t quantile does for a
linear model: with m − p = 2 a fixed s makes intervals far too narrow. Each replicate is
refitted from the full-data optimum; a replicate whose fit is not finite is dropped (counted
as not succeeded). The interval of a parameter (or of L̂ at one x) is the percentile interval
of the replicates at ``core.stats.LEVEL``; the interval reported is its union with the
linearised one (``fitting.Linearised``), which guards against replicates that all land near
the optimum (a refit that stays where it starts). Coverage measured on planted laws:
``python -m saesweep.analysis.calibrate`` (benchmarks/README.md).
"""

from __future__ import annotations

import zlib

import numpy as np

from saesweep.analysis.fitting import Fit, Linearised, minimise
from saesweep.analysis.laws import log_predict, to_public
from saesweep.core.stats import TAILS_PERCENT


def parametric_samples(fit: Fit, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """The internal θ of the successful replicates (module docstring), shape (S, p), S ≤ ``replicates``."""
    xu, xv = fit.design()
    m, p = len(fit.y), len(fit.theta)
    log_mean = log_predict(fit.theta, xu, xv)[0]
    spread = np.sqrt((fit.residuals**2).sum() / (m - p))
    samples = []
    for _ in range(replicates):
        sigma = spread * np.sqrt((m - p) / rng.chisquare(m - p))
        y = np.exp(log_mean + sigma * rng.standard_normal(m))
        theta, loss, _ = minimise(xu, xv, y, [fit.theta])
        if np.isfinite(loss) and np.all(np.isfinite(to_public(fit.law, theta))):
            samples.append(theta)
    return np.array(samples).reshape(-1, p)


def parameter_intervals(fit: Fit, samples: np.ndarray, linearised: Linearised) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the public parameters: the union of the linearised interval (mapped through
    exp for log parameters; unbounded ones overflow to inf) and, with ≥ 2 replicates ``samples``,
    their percentile interval."""
    half = linearised.half_width(np.eye(len(fit.theta)))
    with np.errstate(over="ignore"):
        lo, hi = to_public(fit.law, fit.theta - half), to_public(fit.law, fit.theta + half)
    if len(samples) >= 2:
        boot_lo, boot_hi = np.percentile(to_public(fit.law, samples), TAILS_PERCENT, axis=0)
        lo, hi = np.minimum(lo, boot_lo), np.maximum(hi, boot_hi)
    return lo, hi


def fit_rng(seed: int, *key: object) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the fit's identity ``key``, not on the
    order in which fits run."""
    return np.random.default_rng([seed, zlib.crc32("|".join(map(str, key)).encode())])
