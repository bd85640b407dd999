"""ΔLM loss against normalised MSE (Gao et al. 2024, §4.1): across the cells of one
architecture, the increase of the LM's loss when the SAE's reconstruction is spliced in
follows a power law of the reconstruction error,

    ΔL(NMSE) = a · NMSE^(−b)        (``laws.LAWS["power_nmse"]``; b < 0: ΔL grows with NMSE),

fitted per (site, arch) group to every cell with a positive ΔL and NMSE (seeds averaged per
cell, as the scaling laws are) by ``fitting.fit_law`` (Huber loss on log residuals), with the
95 % intervals of ``analysis.scaling`` (the union of a parametric bootstrap's percentile
interval and the linearised one). The relation is "not resolved" when the exponent's
interval includes 0 (or is unbounded): the data do not exclude a ΔL that does not depend on
NMSE. Cells whose ΔL is not positive (a reconstruction that the LM does not mind, within
noise) are dropped and counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from saesweep.analysis.bootstrap import fit_rng, parameter_intervals, parametric_samples
from saesweep.analysis.fitting import fit_law, linearise
from saesweep.analysis.laws import LAWS, to_public, unresolved
from saesweep.analysis.premise import num

LAW = LAWS["power_nmse"]
X, Y = "nmse", "delta_lm_loss"


def fit_loss_law(x: np.ndarray, y: np.ndarray, bootstrap: int, rng: np.random.Generator, dropped: int) -> dict:
    """The law fitted to points (NMSE_i, ΔL_i), all positive: a fits.json entry with
    ``status`` ("ok", "not resolved" with a ``reason``, or "skipped" with a ``reason``),
    ``law``, ``formula``, ``param_names``, ``params``, ``ci95``, ``resolved``, ``n_cells``,
    ``n_dropped_nonpositive``, ``rss_log`` and ``converged``."""
    head = {"law": LAW.name, "formula": LAW.formula, "param_names": list(LAW.param_names), "x": LAW.x,
            "n_cells": int(len(x)), "n_dropped_nonpositive": dropped}
    fit = fit_law(LAW, np.column_stack([x, np.ones_like(x)]), y)
    if isinstance(fit, str):
        return {"status": "skipped", "reason": fit, **head}
    samples = parametric_samples(fit, bootstrap, rng)
    lo, hi = parameter_intervals(fit, samples, linearise(fit))
    ci95 = {p: [num(a), num(b)] for p, a, b in zip(LAW.param_names, lo, hi)}
    entry = {
        "status": "ok", **head,
        "params": {p: num(v) for p, v in zip(LAW.param_names, to_public(LAW, fit.theta))},
        "ci95": ci95,
        "bootstrap": {"kind": "parametric", "requested": bootstrap, "succeeded": len(samples)},
        "rss_log": float((fit.residuals**2).sum()),
        "converged": fit.converged,
    }
    reason = unresolved(ci95["b"], "b", "ΔL's dependence on NMSE")
    entry["resolved"] = reason is None
    if reason:
        entry.update(status="not resolved", reason=reason)
    return entry


def fit_loss_laws(cells: pd.DataFrame, bootstrap: int, seed: int) -> dict:
    """``{"x": "nmse", "y": "delta_lm_loss", "groups": [{"site", "arch", "law": entry}]}``,
    one ``fit_loss_law`` entry per (site, arch) group of the cells table (cells: rows with the
    same n_latents and curve, their seeds averaged)."""
    groups = []
    if not {X, Y} <= set(cells.columns):
        return {"x": X, "y": Y, "groups": groups}
    for (site, arch), group in cells.groupby(["site", "arch"], sort=True):
        means = group.groupby(["n_latents", "curve"])[[X, Y]].mean()
        usable = means[(means[X] > 0) & (means[Y] > 0)].sort_values(X)
        entry = fit_loss_law(usable[X].to_numpy(float), usable[Y].to_numpy(float), bootstrap,
                             fit_rng(seed, site, arch, "loss_law"), len(means) - len(usable))
        groups.append({"site": str(site), "arch": str(arch), "law": entry})
    return {"x": X, "y": Y, "groups": groups}
