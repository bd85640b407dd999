"""Scaling-law fits over a sweep's cells table (one row per site, arch, n_latents, k, seed).

The laws are defined in ``analysis.laws``, fitted by ``analysis.fitting`` (seeds averaged
into one observation per cell, Huber loss on log residuals), checked against their premises
by ``analysis.premise``, compared by ``analysis.model_choice`` (leave-one-out prediction
error) and given intervals by ``analysis.bootstrap`` (parametric).  This module runs them over
the cells table and assembles fits.json.

Observations: log fits need positive values: non-positive or missing observations (e.g. a
noisy ``delta_lm_loss``) are dropped before averaging and counted in ``n_dropped_nonpositive``
and ``n_dropped_missing``; this biases such a metric upwards near zero.

Uncertainty: each 95 % interval (``core.stats.LEVEL``) is the union of the parametric
bootstrap's percentile interval (``analysis.bootstrap``: ``bootstrap`` replicates simulated
from the fitted law with the residuals' spread, the spread itself drawn from its χ²
distribution) and the linearised one, θ̂ ± t_{m−p}(0.975) · s · √((JᵀJ)⁺_ii)
(``fitting.Linearised``; mapped through exp for log parameters); the band of a 1-D law is
likewise the union of the bootstrap band and log L̂(x) ± t_{m−p}(0.975) · s · √(jᵀ (JᵀJ)⁺ j).
The seed-to-seed variance enters through s: the cell means scatter by it.  Coverage on
planted laws: ``python -m saesweep.analysis.calibrate`` (benchmarks/README.md).

Resolution (1-D laws): a law that passes its premises but whose exponent's 95 % interval
includes 0 (or is unbounded) gets ``"status": "not resolved"`` and a ``reason``: the fitted
curve falls, but the data do not exclude a flat one.  (The joint law's exponents are not
judged one by one; its premises are checked along both variables.)

Validation (laws over n only): refit on all cells but those at the largest n, predict
that n, and compare with the observation.  The prediction interval is the linearised one
of nonlinear least squares, in log space: with the refit's m cells, p parameters, log
residuals r, Jacobian J of log L at its cells and j₀ at the held-out cell,

    log L(x₀) ± t_{m−p}(1 − 0.025/h) · s · √(1 + j₀ᵀ (JᵀJ)⁺ j₀),   s² = Σ r² / (m − p),

so it covers observation noise and parameter uncertainty, and stays honest with few cells;
with h held-out cells (the joint law holds out one per k) the level is corrected to
1 − 0.05/h (Bonferroni).  The fit is flagged when any held-out observation lies outside its
interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from saesweep.analysis.aggregate import with_curves
from saesweep.analysis.bootstrap import fit_rng, parameter_intervals, parametric_samples
from saesweep.analysis.fitting import HUBER_DELTA, fit_law, linearise
from saesweep.analysis.laws import LAWS, Law, design, log_predict, to_public, unresolved
from saesweep.analysis.model_choice import LOO_RATIO, compare, loo_mse
from saesweep.analysis.premise import BAND_POINTS, MIN_FALL, num, premise
from saesweep.core.stats import LEVEL, TAILS_PERCENT


def _skipped(law: Law, reason: str) -> dict:
    return {
        "status": "skipped",
        "law": law.name,
        "formula": law.formula,
        "param_names": list(law.param_names),
        "x": law.x,
        "reason": reason,
    }


def _validate(law: Law, nk: np.ndarray, vals: list[np.ndarray]) -> dict:
    """Refit without the largest n and predict it (see the module docstring)."""
    held = nk[:, 0] == nk[:, 0].max()
    y = np.array([v.mean() for v in vals])
    train = fit_law(law, nk[~held], y[~held])
    if isinstance(train, str):
        return {"status": "skipped", "reason": f"without the largest n: {train}"}
    log_predicted, jac = log_predict(train.theta, *design(law, nk[held, 0], nk[held, 1]))
    half_width = linearise(train).half_width(jac, 1 - (1 - LEVEL) / held.sum(), new_observation=True)
    rows = []
    for j, (n, k) in enumerate(nk[held]):
        observed = float(vals[np.flatnonzero(held)[j]].mean())
        predicted = float(np.exp(log_predicted[j]))
        lo, hi = np.exp(log_predicted[j] - half_width[j]), np.exp(log_predicted[j] + half_width[j])
        rows.append({
            "n": int(n),
            "k": int(k),
            "observed": observed,
            "predicted": num(predicted),
            "rel_error": num(predicted / observed - 1.0),
            "interval": [num(lo), num(hi)],
            "within_interval": bool(lo <= observed <= hi),
        })
    inside = all(r["within_interval"] for r in rows)
    return {
        "status": "ok",
        "holdout_n": int(nk[:, 0].max()),
        "n_train_cells": len(train.residuals),
        "cells": rows,
        "max_abs_rel_error": max(abs(r["rel_error"]) for r in rows if r["rel_error"] is not None),
        "within_interval": inside,
        "flagged": not inside,
    }


def _resolution(law: Law, ci95: dict) -> str | None:
    """Why a 1-D law's fall is not resolved (its exponent's interval includes 0), or None."""
    return None if law.x == "n,k" else unresolved(ci95["b"], "b", f"the fall with {law.x}")


def _fit_entry(
    law: Law, subset: pd.DataFrame, metric: str, fixed: dict[str, int], rng: np.random.Generator, bootstrap: int
) -> dict:
    """One law on the rows ``subset`` (with an ``_ok`` column marking usable values) → its fits.json entry."""
    dropped_nonpos = int((subset[metric] <= 0).sum())
    dropped_missing = int(subset[metric].isna().sum())
    usable = subset[subset["_ok"]].sort_values(["n_latents", "k", "seed"])
    cells = [(key, g.to_numpy(float)) for key, g in usable.groupby(["n_latents", "k"])[metric]]
    nk = np.array([key for key, _ in cells], dtype=np.int64).reshape(-1, 2)
    vals = [v for _, v in cells]
    fit = fit_law(law, nk, np.array([v.mean() for v in vals]))
    if isinstance(fit, str):
        if dropped_nonpos:
            fit += f" ({dropped_nonpos} non-positive observation(s) dropped)"
        return _skipped(law, fit)
    samples = parametric_samples(fit, bootstrap, rng)
    public, boot = to_public(law, fit.theta), to_public(law, samples)
    loo = loo_mse(fit)
    entry = {
        "status": "ok",
        "law": law.name,
        "formula": law.formula,
        "param_names": list(law.param_names),
        "x": law.x,
        "fixed": fixed,
        "params": {p: num(v) for p, v in zip(law.param_names, public)},
        "ci95": {p: None for p in law.param_names},
        "std": {p: None for p in law.param_names},
        "bootstrap": {"kind": "parametric", "requested": bootstrap, "succeeded": len(boot)},
        "n_cells": len(vals),
        "n_obs": int(sum(len(v) for v in vals)),
        "n_dropped_nonpositive": dropped_nonpos,
        "n_dropped_missing": dropped_missing,
        "huber_loss": fit.loss,
        "converged": fit.converged,
        "max_abs_log_residual": float(np.abs(fit.residuals).max()),
        "rss_log": float((fit.residuals**2).sum()),
        "loo_mse": None if isinstance(loo, str) else loo,
    }
    if isinstance(loo, str):
        entry["loo_reason"] = loo
    entry["premise"], contradiction = premise(law, fit.theta, nk)
    linearised = linearise(fit)
    lo, hi = parameter_intervals(fit, samples, linearised)
    if len(boot) >= 2:
        entry["std"] = {p: num(s) for p, s in zip(law.param_names, boot.std(axis=0, ddof=1))}
    entry["ci95"] = {p: [num(a), num(b)] for p, a, b in zip(law.param_names, lo, hi)}
    unresolved = _resolution(law, entry["ci95"])
    if contradiction:
        entry.update(status="contradicted", reason=contradiction)
    elif unresolved:
        entry.update(status="not resolved", reason=unresolved)
    if law.x != "n,k":
        entry["resolved"] = unresolved is None
        col = 1 if law.x == "k" else 0
        grid = np.geomspace(nk[:, col].min(), nk[:, col].max(), BAND_POINTS)
        xu, xv = design(law, grid, grid)
        log_mean, jac = log_predict(fit.theta, xu, xv)
        half_band = linearised.half_width(jac)
        with np.errstate(over="ignore"):
            band_lo, band_hi = np.exp(log_mean - half_band), np.exp(log_mean + half_band)
        if len(boot) >= 2:
            preds = np.exp([log_predict(t, xu, xv)[0] for t in samples])
            boot_lo, boot_hi = np.percentile(preds, TAILS_PERCENT, axis=0)
            band_lo, band_hi = np.minimum(band_lo, boot_lo), np.maximum(band_hi, boot_hi)
        entry["band"] = {"x": grid.tolist(), "lo": list(map(num, band_lo)), "hi": list(map(num, band_hi))}
    if "n" in law.x:
        entry["validation"] = _validate(law, nk, vals)
    return entry


def k_family(rows: pd.DataFrame) -> pd.DataFrame:
    """The cells the laws in k are fitted to: cells with k whose settings agree apart from k
    (curves ``k8``, ``k32``, … or ``k8-ax0``, ``k32-ax0``, …, the knob k being named first).
    Where several such families exist, the one with the most cells; on a tie, the one with
    the shortest rest (``k32`` before ``k32-m8``: the architecture's defaults)."""
    with_k = rows[rows["k"].notna()]
    knobs = "k" + with_k["k"].astype("int64").astype(str)
    rests = [
        curve[len(knob):] if curve == knob or curve.startswith(knob + "-") else None
        for curve, knob in zip(with_k["curve"], knobs)
    ]
    counts = pd.Series([rest for rest in rests if rest is not None], dtype=object).value_counts()
    if counts.empty:
        return with_k.iloc[:0]
    chosen = min(counts.index, key=lambda rest: (-counts[rest], len(rest), rest))
    return with_k[[rest == chosen for rest in rests]]


def _fit_metric(group: pd.DataFrame, metric: str, bootstrap: int, seed: int, site: str, arch: str) -> dict:
    if metric not in group.columns:
        return {"status": "skipped", "reason": f"column {metric!r} not in the cells table"}
    g = group.assign(_ok=group[metric].gt(0) & group[metric].notna())

    def fit(name: str, subset: pd.DataFrame, fixed: dict[str, int]) -> dict:
        return _fit_entry(LAWS[name], subset, metric, fixed, fit_rng(seed, site, arch, metric, name, fixed), bootstrap)

    def pair(variable: str, subset: pd.DataFrame, fixed: dict[str, int]) -> dict:
        power, floor = fit(f"power_{variable}", subset, fixed), fit(f"floor_{variable}", subset, fixed)
        return {"power": power, "floor": floor, "comparison": compare(power, floor)}

    k_only = k_family(g)

    def curve_pair(curve: str, rows: pd.DataFrame) -> dict:
        """The laws in n of one curve; a curve without k is fitted with k = 1 standing in (the
        laws in n do not use it) and its held-out cells are reported without it."""
        if curve in set(k_only["curve"]):
            return pair("n", rows, {"k": int(rows["k"].iloc[0])})
        laws = pair("n", rows.assign(k=1), {"setting": curve})
        for form in ("power", "floor"):
            for cell in laws[form].get("validation", {}).get("cells", []):
                cell.pop("k")
        return laws

    return {
        "status": "ok",
        "n_dropped_nonpositive": int((g[metric] <= 0).sum()),
        "n_dropped_missing": int(g[metric].isna().sum()),
        "vs_n": {
            curve: curve_pair(curve, s)
            for curve, s in g.sort_values(["sparsity", "curve"]).groupby("curve", sort=False)
        },
        "vs_k": {str(n): pair("k", s, {"n": int(n)}) for n, s in k_only.groupby("n_latents")},
        "joint": fit("joint", k_only, {}) if len(k_only) else _skipped(LAWS["joint"], f"{arch} cells have no k"),
    }


def fit_scaling_laws(cells: pd.DataFrame, metrics: Sequence[str], bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit every law of the module docstring per (site, arch) group and metric.

    Returns a JSON-serialisable dict (non-finite numbers become None)::

        {"huber_delta": 1e-3, "min_fall": MIN_FALL, "loo_ratio": LOO_RATIO, "level": 0.95,
         "bootstrap": B, "seed": s,
         "metrics": [...], "groups": [{"site": str, "arch": str, "metrics": {metric: M}}]}

    M is {"status": "skipped", "reason": str} (metric column absent) or::

        {"status": "ok", "n_dropped_nonpositive": int, "n_dropped_missing": int,
         "vs_n":  {curve: {"power": E, "floor": E, "comparison": C}},    # laws L(n) per curve (k32, l0.3)
         "vs_k":  {str(n): {"power": E, "floor": E, "comparison": C}},   # laws L(k) at each n
         "joint": E}                                                     # L(n, k)

    A law entry E always has "status" ("ok", "not resolved", "contradicted" or "skipped"),
    "law" (a key of LAWS), "formula", "param_names", "x" ("n", "k" or "n,k").  Skipped entries
    add "reason"; fitted ones ("ok"; "contradicted" or "not resolved" with a "reason": see
    Premises and Resolution) add "fixed" ({"k": 32} / {"n": 4096} / {}), "params" {name: value},
    "ci95" {name: [lo, hi]} (see Uncertainty) and "std" {name: s} (bootstrap; None without ≥ 2
    successful replicates), "bootstrap" {"kind": "parametric", "requested", "succeeded"},
    "n_cells", "n_obs", "n_dropped_nonpositive", "n_dropped_missing", "huber_loss" (Σ
    Huber_δ(r)/δ at the optimum), "converged" (L-BFGS's own success flag; it often stops on a
    line-search warning at a good optimum), "max_abs_log_residual", "rss_log" (Σ r² of the log
    residuals), "loo_mse" (``model_choice.loo_mse``; None where the cells are too few, with
    "loo_reason"), "premise" {"statement", "holds", "falls_with": {variable: {"rises", "fall",
    "range": [lo, hi]}}} ("fall": the smallest L̂(x_min)/L̂(x_max) − 1 over the grid lines; laws
    with floor over one variable add "power_share" = a·x_min^(−b)/c); 1-D laws add "resolved"
    (whether b's interval excludes 0) and "band" {"x": grid over the observed range, "lo", "hi"}:
    the 95 % band of L (see Uncertainty; None where unbounded); laws over n add "validation":
    {"status": "skipped", "reason"} or {"status": "ok", "holdout_n", "n_train_cells", "cells":
    [{"n", "k", "observed", "predicted", "rel_error", "interval": [lo, hi], "within_interval"}],
    "max_abs_rel_error", "within_interval", "flagged"}.

    A comparison C is ``model_choice.compare``'s record.
    """
    out: dict = {
        "huber_delta": HUBER_DELTA,
        "min_fall": MIN_FALL,
        "loo_ratio": LOO_RATIO,
        "level": LEVEL,
        "bootstrap": bootstrap,
        "seed": seed,
        "metrics": list(metrics),
        "groups": [],
    }
    for (site, arch), group in with_curves(cells).groupby(["site", "arch"], sort=True):
        fits = {m: _fit_metric(group, m, bootstrap, seed, str(site), str(arch)) for m in metrics}
        out["groups"].append({"site": str(site), "arch": str(arch), "metrics": fits})
    return out


def fit_pair(variable: str, x: np.ndarray, y: np.ndarray, bootstrap: int, seed: int, *key: object) -> dict:
    """The pure law and the law with floor in ``variable`` (e.g. ``C``) fitted to points
    (x_i, y_i), one observation each (x integer-valued, distinct), with their comparison;
    the bootstrap's generator depends on ``seed`` and ``key`` only."""
    rng = fit_rng(seed, variable, *key)
    table = pd.DataFrame({"n_latents": np.asarray(x, dtype=np.int64), "k": 1, "seed": 0, "y": y})
    table["_ok"] = table["y"].gt(0) & table["y"].notna()
    power, floor = (_fit_entry(LAWS[f"{form}_{variable}"], table, "y", {}, rng, bootstrap) for form in ("power", "floor"))
    return {"power": power, "floor": floor, "comparison": compare(power, floor)}


def find_group(fits: dict, site: str, arch: str) -> dict | None:
    """The ``metrics`` dict of one (site, arch) group of a fit_scaling_laws result, or None."""
    return next((g["metrics"] for g in fits["groups"] if g["site"] == site and g["arch"] == arch), None)
