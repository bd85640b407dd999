"""Scaling-law fits over a sweep's cells table (one row per site, arch, n_latents, k, seed).

Laws, with n = number of latents and k = active latents per token:

    power_n   L(n)    = a·n^(−b)                         (at fixed k)
    floor_n   L(n)    = a·n^(−b) + c,   c ≥ 0            (at fixed k; c is the irreducible term)
    power_k   L(k)    = a·k^(−b)                         (at fixed n)
    floor_k   L(k)    = a·k^(−b) + c,   c ≥ 0            (at fixed n)
    joint     L(n, k) = exp(α + β_k ln k + β_n ln n + γ ln k ln n) + exp(ζ + η ln k)
                                                         (Gao et al. 2024, eq. for GPT-4)
    power_C   L(C)    = a·C^(−b),   floor_C  L(C) = a·C^(−b) + c
                                                         (C: training compute, ``compute``)

Fitting (Hoffmann et al. 2022, approach 3): every law is written as
log L = logaddexp(X_u·θ_u, X_v·θ_v) (the floor term X_v·θ_v is absent for pure power
laws; a and c enter as log a and log c, so c ≥ 0 by construction).  We minimise
Σ_i Huber_δ(log L(x_i) − log y_i), δ = 1e-3, with L-BFGS from a small grid of initial
points (floor at 1 %, 50 % and 90 % of the smallest observation, the power term from a
log-linear least-squares fit of the rest) and keep the best.

Observations: the seeds of a cell are averaged (arithmetic mean) into one observation per
cell.  Log fits need positive values: non-positive or missing observations (e.g. a noisy
``delta_lm_loss``) are dropped before averaging and counted in ``n_dropped_nonpositive``
and ``n_dropped_missing``; this biases such a metric upwards near zero.

Uncertainty: ``bootstrap`` replicates resample the law's cells with replacement and, within
each drawn cell, its seeds with replacement; each replicate is refitted from the full-data
optimum.  A replicate fails when it has too few distinct x values or its fit is not finite.
With few cells the replicates that succeed barely differ (with p + 1 cells every one of them
is the full data), so each 95 % interval is the union of the bootstrap percentile interval
and the linearised one, θ̂ ± t_{m−p}(0.975) · s · √((JᵀJ)⁺_ii) (see ``_Linearised``; mapped
through exp for log parameters); the band of a 1-D law is likewise the union of the bootstrap
band and log L̂(x) ± t_{m−p}(0.975) · s · √(jᵀ (JᵀJ)⁺ j).

Premises: every law claims that the loss falls with its variable(s), measurably, over the
observed range.  The fit is free (b is not constrained, so a contradiction shows instead of
being pinned at b = 0); afterwards L̂ is evaluated on a log grid of BAND_POINTS values
spanning the fitted cells' range of each variable (BAND_POINTS × BAND_POINTS in (n, k) for
the joint law, which is checked along n at each grid k and along k at each grid n):

    1. L̂ never rises between two neighbouring grid points (for the 1-D laws: b ≥ 0), and
    2. L̂ falls measurably along every grid line: L̂(x_min) / L̂(x_max) − 1 > MIN_FALL
       (for a pure power law: (x_max/x_min)^b − 1 > MIN_FALL, so with 1, b > 0).

A law failing either check keeps its parameters but gets ``"status": "contradicted"`` and a
``reason`` in words.  For a law with floor, check 2 implies that the power term is not
negligible against the floor, a·x_min^(−b) > MIN_FALL·c (since L̂(x_min) − L̂(x_max) <
a·x_min^(−b) and L̂(x_max) > c), and it also catches the other way a floor law degenerates on
flat data (c → 0, b → 0, so a·x^(−b) is itself a constant).

Model comparison (1-D laws): where the pure law and the law with floor are both fitted to the
same cells, the data's preference is decided by AICc (small-sample corrected AIC) of the log
residuals r_i = log L̂(x_i) − log y_i at the fitted optimum, with m cells and p parameters:

    AICc = m·ln(RSS/m) + 2p + 2p(p + 1)/(m − p − 1),   RSS = Σ r_i²,

i.e. a Gaussian likelihood for the log residuals (the Huber objective with δ = 1e-3 is nearly
least absolute deviations, so this is an approximation shared by both laws).  The law with the
lower AICc is preferred (the pure law on a tie: fewer parameters); |ΔAICc| ≤ AICC_WEAK is
conventionally weak evidence either way (Burnham & Anderson 2002).  With m − p − 1 ≤ 0, or
RSS = 0, a law's AICc is undefined and no comparison is made.  The comparison ignores the
premises: a preferred law may still be ``contradicted``.

Validation (laws over n only): refit on all cells but those at the largest n, predict
that n, and compare with the observation.  The prediction interval is the linearised one
of nonlinear least squares, in log space: with the refit's m cells, p parameters, log
residuals r, Jacobian J of log L at its cells and j₀ at the held-out cell,

    log L(x₀) ± t_{m−p}(1 − 0.025/h) · s · √(1 + j₀ᵀ (JᵀJ)⁺ j₀),   s² = Σ r² / (m − p),

so it covers observation noise and parameter uncertainty, and stays honest with few cells
(where a bootstrap over cells has almost no spread); with h held-out cells (the joint law
holds out one per k) the level is corrected to 1 − 0.05/h (Bonferroni).  The fit is
flagged when any held-out observation lies outside its interval.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.stats import t as student_t

from saesweep.analysis.aggregate import with_curves

HUBER_DELTA = 1e-3
FLOOR_FRACTIONS = (0.01, 0.5, 0.9)
BAND_POINTS = 32
# The smallest relative fall L̂(x_min)/L̂(x_max) − 1 over the observed range for which a law is
# said to fall (premise check 2).  A law that changes by at most 5 % across the whole observed
# range is a constant at the precision of a sweep, whose cells are single training runs with
# hyperparameters shared across n and k: its power term adds at most 5 % to the floor, so its
# exponent is not measured but traded against a and c, and it says nothing about scaling.
# 5 % is several times the seed-to-seed scatter the intervals are tested against (1 %), so a
# real fall of that size still stands out of the noise; a range with a weaker trend needs more
# data, not a law.
MIN_FALL = 0.05
# |ΔAICc| at or below which a preference between two laws is conventionally weak.
AICC_WEAK = 2.0


@dataclass(frozen=True)
class Law:
    """One functional form: public parameter names, which of them are fitted as logs, its variable."""

    name: str
    formula: str
    param_names: tuple[str, ...]
    log_params: tuple[str, ...]
    x: str  # "n", "k", "n,k" or "C" (held in the n column of the cells)
    floor: bool


LAWS: dict[str, Law] = {
    law.name: law
    for law in (
        Law("power_n", "L(n) = a * n^(-b)", ("a", "b"), ("a",), "n", False),
        Law("floor_n", "L(n) = a * n^(-b) + c", ("a", "b", "c"), ("a", "c"), "n", True),
        Law("power_k", "L(k) = a * k^(-b)", ("a", "b"), ("a",), "k", False),
        Law("floor_k", "L(k) = a * k^(-b) + c", ("a", "b", "c"), ("a", "c"), "k", True),
        Law("power_C", "L(C) = a * C^(-b)", ("a", "b"), ("a",), "C", False),
        Law("floor_C", "L(C) = a * C^(-b) + c", ("a", "b", "c"), ("a", "c"), "C", True),
        Law(
            "joint",
            "L(n, k) = exp(alpha + beta_k*ln(k) + beta_n*ln(n) + gamma*ln(k)*ln(n)) + exp(zeta + eta*ln(k))",
            ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta"),
            (),
            "n,k",
            True,
        ),
    )
}


def _design(law: Law, n: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Feature matrices of the power term (X_u) and the floor term (X_v, None without floor)."""
    ln, lk = np.log(n.astype(float)), np.log(k.astype(float))
    one = np.ones_like(ln)
    if law.x == "n,k":
        return np.column_stack([one, lk, ln, lk * ln]), np.column_stack([one, lk])
    lx = lk if law.x == "k" else ln
    return np.column_stack([one, -lx]), (one[:, None] if law.floor else None)


def _log_predict(theta: np.ndarray, xu: np.ndarray, xv: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """log L and its Jacobian with respect to the internal parameters θ = (θ_u, θ_v)."""
    pu = xu.shape[1]
    u = xu @ theta[:pu]
    if xv is None:
        return u, xu
    f = np.logaddexp(u, xv @ theta[pu:])
    w = np.exp(u - f)[:, None]
    return f, np.hstack([w * xu, (1.0 - w) * xv])


def _objective(theta: np.ndarray, xu: np.ndarray, xv: np.ndarray | None, logy: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(r) / δ over log residuals r, and its gradient (dividing by δ only rescales)."""
    f, jac = _log_predict(theta, xu, xv)
    r = f - logy
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r**2 / HUBER_DELTA, np.abs(r) - 0.5 * HUBER_DELTA).sum()
    return float(loss), jac.T @ np.clip(r / HUBER_DELTA, -1.0, 1.0)


def _initial_points(xu: np.ndarray, xv: np.ndarray | None, y: np.ndarray) -> list[np.ndarray]:
    """Log-linear least squares for a pure power law; with a floor, one start per FLOOR_FRACTIONS."""
    if xv is None:
        return [np.linalg.lstsq(xu, np.log(y), rcond=None)[0]]
    _, group = np.unique(xv, axis=0, return_inverse=True)
    group_min = pd.Series(y).groupby(group.ravel()).transform("min").to_numpy()
    starts = []
    for frac in FLOOR_FRACTIONS:
        theta_v = np.linalg.lstsq(xv, np.log(frac * group_min), rcond=None)[0]
        theta_u = np.linalg.lstsq(xu, np.log(y - frac * group_min), rcond=None)[0]
        starts.append(np.concatenate([theta_u, theta_v]))
    return starts


def _minimise(
    xu: np.ndarray, xv: np.ndarray | None, y: np.ndarray, starts: list[np.ndarray]
) -> tuple[np.ndarray, float, bool]:
    """Best L-BFGS optimum over the starting points: (θ, loss, converged)."""
    best: tuple[np.ndarray, float, bool] = (np.full_like(starts[0], np.nan), np.inf, False)
    for start in starts:
        res = minimize(
            _objective,
            start,
            args=(xu, xv, np.log(y)),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9},
        )
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) and res.fun < best[1]:
            best = (res.x, float(res.fun), bool(res.success))
    return best


def _to_public(law: Law, theta: np.ndarray) -> np.ndarray:
    """Internal θ (log a, b, log c / α…η) → public parameters in ``law.param_names`` order."""
    out = theta.astype(float).copy()
    for i, name in enumerate(law.param_names):
        if name in law.log_params:
            out[..., i] = np.exp(theta[..., i])
    return out


def _too_few(law: Law, nk: np.ndarray) -> str | None:
    """Why ``nk`` (distinct cells, columns n and k) cannot determine the law, or None."""
    p = len(law.param_names)
    if law.x == "n,k" and (len(np.unique(nk[:, 0])) < 2 or len(np.unique(nk[:, 1])) < 2):
        return "needs at least 2 distinct n and 2 distinct k"
    if len(np.unique(nk, axis=0)) < p + 1:
        return f"{len(np.unique(nk, axis=0))} distinct {law.x} value(s), need at least {p + 1} for {p} parameters"
    return None


@dataclass
class _Fit:
    theta: np.ndarray
    loss: float
    converged: bool
    samples: np.ndarray  # successful bootstrap θ, shape (S, p)
    residuals: np.ndarray  # log(prediction) − log(observation) per cell


def _fit(law: Law, nk: np.ndarray, vals: list[np.ndarray], rng: np.random.Generator, bootstrap: int) -> _Fit | str:
    """Fit ``law`` to cells ``nk`` (m × 2) with seed values ``vals``; a reason string if impossible."""
    reason = _too_few(law, nk)
    if reason:
        return reason
    y = np.array([v.mean() for v in vals])
    xu, xv = _design(law, nk[:, 0], nk[:, 1])
    theta, loss, converged = _minimise(xu, xv, y, _initial_points(xu, xv, y))
    if not np.isfinite(loss):
        return "optimiser found no finite optimum"
    samples = []
    m = len(vals)
    for _ in range(bootstrap):
        idx = rng.integers(m, size=m)
        yb = np.array([rng.choice(vals[i], size=len(vals[i])).mean() for i in idx])
        if _too_few(law, nk[idx]):
            continue
        xub, xvb = _design(law, nk[idx, 0], nk[idx, 1])
        tb, lb, _ = _minimise(xub, xvb, yb, [theta])
        if np.isfinite(lb) and np.all(np.isfinite(_to_public(law, tb))):
            samples.append(tb)
    residuals = _log_predict(theta, xu, xv)[0] - np.log(y)
    return _Fit(theta, loss, converged, np.array(samples).reshape(-1, len(theta)), residuals)


@dataclass
class _Linearised:
    """A fit linearised at its optimum (nonlinear least squares in log space): with m cells,
    p parameters, log residuals r and Jacobian J of log L at the cells,
    s² = Σ r² / (m − p) and the unscaled covariance (JᵀJ)⁺."""

    inverse: np.ndarray
    spread: float
    dof: int

    def half_width(self, jac: np.ndarray, level: float, new_observation: bool = False) -> np.ndarray:
        """t_{m−p}((1 + level)/2) · s · √(jᵀ (JᵀJ)⁺ j [+ 1 for a new observation]) per row j of ``jac``."""
        leverage = np.einsum("ij,jk,ik->i", jac, self.inverse, jac) + (1.0 if new_observation else 0.0)
        return student_t.ppf((1 + level) / 2, self.dof) * self.spread * np.sqrt(leverage)


def _linearise(fit: _Fit, xu: np.ndarray, xv: np.ndarray | None) -> _Linearised:
    jac = _log_predict(fit.theta, xu, xv)[1]
    m, p = jac.shape
    return _Linearised(np.linalg.pinv(jac.T @ jac), float(np.sqrt((fit.residuals**2).sum() / (m - p))), m - p)


def _num(x: float) -> float | None:
    """A JSON-safe float (None for NaN or infinity)."""
    return float(x) if np.isfinite(x) else None


def _premise(law: Law, theta: np.ndarray, nk: np.ndarray) -> tuple[dict, str | None]:
    """The premise checks of the module docstring for a fit ``theta`` to cells ``nk``: the
    ``premise`` record of its entry and, when a check fails, the reason in words (else None)."""
    ranges = {"n": (int(nk[:, 0].min()), int(nk[:, 0].max())), "k": (int(nk[:, 1].min()), int(nk[:, 1].max()))}
    ranges["C"] = ranges["n"]
    nn, kk = np.meshgrid(*(np.geomspace(*ranges[v], BAND_POINTS) for v in ("n", "k")))  # rows: k, columns: n
    log_l = _log_predict(theta, *_design(law, nn.ravel(), kk.ravel()))[0].reshape(nn.shape)
    variables = law.x.split(",")
    statement = f"L falls with {' and with '.join(variables)}, by more than {MIN_FALL:.0%} over the observed range"
    record: dict = {"statement": statement, "falls_with": {}}
    reasons = []
    for v in variables:
        lines = log_l.T if v == "k" else log_l  # each row: L̂ along v at one value of the other variable
        rises = bool(np.any(np.diff(lines, axis=1) > 0))
        fall = float(np.expm1(lines[:, 0] - lines[:, -1]).min())
        record["falls_with"][v] = {"rises": rises, "fall": _num(fall), "range": list(ranges[v])}
        where = f"over {v} = {ranges[v][0]}…{ranges[v][1]}"
        if rises:
            slope = f" (b = {theta[1]:.3g} ≤ 0)" if law.x != "n,k" else " somewhere"
            reasons.append(f"the fitted loss rises with {v}{slope} {where}")
        elif not fall > MIN_FALL:
            reasons.append(
                f"the fitted loss falls with {v} by only {fall:.1%} {where} (more than {MIN_FALL:.0%} required): "
                "its power term is negligible there"
            )
    if law.floor and law.x != "n,k":
        a, b, c = _to_public(law, theta)
        with np.errstate(divide="ignore", over="ignore"):
            share = a * ranges[law.x][0] ** -b / c
        record["power_share"] = _num(share)
        if reasons and not share > MIN_FALL:
            reasons[-1] += f" (a·{law.x}^(−b) at {law.x} = {ranges[law.x][0]} is {share:.1%} of the floor c)"
    record["holds"] = not reasons
    return record, "; ".join(reasons) or None


def _aicc(residuals: np.ndarray, p: int) -> float | None:
    """AICc = m·ln(RSS/m) + 2p + 2p(p + 1)/(m − p − 1) of m log residuals; None where undefined
    (m − p − 1 ≤ 0 or RSS = 0)."""
    m, rss = len(residuals), float((residuals**2).sum())
    if m - p - 1 <= 0 or rss <= 0:
        return None
    return float(m * np.log(rss / m) + 2 * p + 2 * p * (p + 1) / (m - p - 1))


def _compare(power: dict, floor: dict) -> dict:
    """AICc comparison of the pure law and the law with floor fitted to the same cells."""
    out: dict = {"criterion": "AICc", "aicc": {"power": power.get("aicc"), "floor": floor.get("aicc")}}
    missing = [
        f"{e['law']} skipped"
        if e["status"] == "skipped"
        else f"{e['law']}: AICc undefined for {e['n_cells']} cells and {len(e['param_names'])} parameters"
        for e in (power, floor)
        if e.get("aicc") is None
    ]
    if missing:
        return out | {"preferred": None, "delta": None, "weak": None, "reason": "; ".join(missing)}
    delta = floor["aicc"] - power["aicc"]
    return out | {"preferred": "floor" if delta < 0 else "power", "delta": delta, "weak": bool(abs(delta) <= AICC_WEAK)}


def _skipped(law: Law, reason: str) -> dict:
    return {
        "status": "skipped",
        "law": law.name,
        "formula": law.formula,
        "param_names": list(law.param_names),
        "x": law.x,
        "reason": reason,
    }


def _validate(law: Law, nk: np.ndarray, vals: list[np.ndarray], rng: np.random.Generator) -> dict:
    """Refit without the largest n and predict it (see the module docstring)."""
    held = nk[:, 0] == nk[:, 0].max()
    train = _fit(law, nk[~held], [v for v, h in zip(vals, held) if not h], rng, bootstrap=0)
    if isinstance(train, str):
        return {"status": "skipped", "reason": f"without the largest n: {train}"}
    linearised = _linearise(train, *_design(law, nk[~held, 0], nk[~held, 1]))
    log_predicted, jac = _log_predict(train.theta, *_design(law, nk[held, 0], nk[held, 1]))
    half_width = linearised.half_width(jac, 1 - 0.05 / held.sum(), new_observation=True)
    rows = []
    for j, (n, k) in enumerate(nk[held]):
        observed = float(vals[np.flatnonzero(held)[j]].mean())
        predicted = float(np.exp(log_predicted[j]))
        lo, hi = np.exp(log_predicted[j] - half_width[j]), np.exp(log_predicted[j] + half_width[j])
        rows.append({
            "n": int(n),
            "k": int(k),
            "observed": observed,
            "predicted": _num(predicted),
            "rel_error": _num(predicted / observed - 1.0),
            "interval": [_num(lo), _num(hi)],
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
    fit = _fit(law, nk, vals, rng, bootstrap)
    if isinstance(fit, str):
        if dropped_nonpos:
            fit += f" ({dropped_nonpos} non-positive observation(s) dropped)"
        return _skipped(law, fit)
    public = _to_public(law, fit.theta)
    boot = _to_public(law, fit.samples)
    entry = {
        "status": "ok",
        "law": law.name,
        "formula": law.formula,
        "param_names": list(law.param_names),
        "x": law.x,
        "fixed": fixed,
        "params": {p: _num(v) for p, v in zip(law.param_names, public)},
        "ci95": {p: None for p in law.param_names},
        "std": {p: None for p in law.param_names},
        "bootstrap": {"requested": bootstrap, "succeeded": len(boot)},
        "n_cells": len(vals),
        "n_obs": int(sum(len(v) for v in vals)),
        "n_dropped_nonpositive": dropped_nonpos,
        "n_dropped_missing": dropped_missing,
        "huber_loss": fit.loss,
        "converged": fit.converged,
        "max_abs_log_residual": float(np.abs(fit.residuals).max()),
        "rss_log": float((fit.residuals**2).sum()),
        "aicc": _aicc(fit.residuals, len(fit.theta)),
    }
    entry["premise"], contradiction = _premise(law, fit.theta, nk)
    if contradiction:
        entry.update(status="contradicted", reason=contradiction)
    linearised = _linearise(fit, *_design(law, nk[:, 0], nk[:, 1]))
    half = linearised.half_width(np.eye(len(fit.theta)), 0.95)
    with np.errstate(over="ignore"):  # an unidentified parameter's interval may be unbounded
        lo, hi = _to_public(law, fit.theta - half), _to_public(law, fit.theta + half)
    if len(boot) >= 2:
        boot_lo, boot_hi = np.percentile(boot, [2.5, 97.5], axis=0)
        lo, hi = np.minimum(lo, boot_lo), np.maximum(hi, boot_hi)
        entry["std"] = {p: _num(s) for p, s in zip(law.param_names, boot.std(axis=0, ddof=1))}
    entry["ci95"] = {p: [_num(a), _num(b)] for p, a, b in zip(law.param_names, lo, hi)}
    if law.x != "n,k":
        col = 1 if law.x == "k" else 0
        grid = np.geomspace(nk[:, col].min(), nk[:, col].max(), BAND_POINTS)
        xu, xv = _design(law, grid, grid)
        log_mean, jac = _log_predict(fit.theta, xu, xv)
        half_band = linearised.half_width(jac, 0.95)
        with np.errstate(over="ignore"):
            band_lo, band_hi = np.exp(log_mean - half_band), np.exp(log_mean + half_band)
        if len(boot) >= 2:
            preds = np.exp([_log_predict(t, xu, xv)[0] for t in fit.samples])
            boot_lo, boot_hi = np.percentile(preds, [2.5, 97.5], axis=0)
            band_lo, band_hi = np.minimum(band_lo, boot_lo), np.maximum(band_hi, boot_hi)
        entry["band"] = {"x": grid.tolist(), "lo": list(map(_num, band_lo)), "hi": list(map(_num, band_hi))}
    if "n" in law.x:
        entry["validation"] = _validate(law, nk, vals, rng)
    return entry


def _rng(seed: int, *key: object) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the fit's identity, not on fitting order."""
    return np.random.default_rng([seed, zlib.crc32("|".join(map(str, key)).encode())])


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
        return _fit_entry(LAWS[name], subset, metric, fixed, _rng(seed, site, arch, metric, name, fixed), bootstrap)

    def pair(variable: str, subset: pd.DataFrame, fixed: dict[str, int]) -> dict:
        power, floor = fit(f"power_{variable}", subset, fixed), fit(f"floor_{variable}", subset, fixed)
        return {"power": power, "floor": floor, "comparison": _compare(power, floor)}

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

        {"huber_delta": 1e-3, "min_fall": MIN_FALL, "aicc_weak": AICC_WEAK, "bootstrap": B, "seed": s,
         "metrics": [...], "groups": [{"site": str, "arch": str, "metrics": {metric: M}}]}

    M is {"status": "skipped", "reason": str} (metric column absent) or::

        {"status": "ok", "n_dropped_nonpositive": int, "n_dropped_missing": int,
         "vs_n":  {curve: {"power": E, "floor": E, "comparison": C}},    # laws L(n) per curve (k32, l0.3)
         "vs_k":  {str(n): {"power": E, "floor": E, "comparison": C}},   # laws L(k) at each n
         "joint": E}                                                     # L(n, k)

    A law entry E always has "status" ("ok", "contradicted" or "skipped"), "law" (a key of
    LAWS), "formula", "param_names", "x" ("n", "k" or "n,k").  Skipped entries add "reason";
    fitted ones ("ok", or "contradicted" with a "reason": see Premises) add
    "fixed" ({"k": 32} / {"n": 4096} / {}), "params" {name: value}, "ci95" {name: [lo, hi]}
    (see Uncertainty) and "std" {name: s} (bootstrap; None without ≥ 2 successful replicates), "bootstrap"
    {"requested", "succeeded"}, "n_cells", "n_obs", "n_dropped_nonpositive",
    "n_dropped_missing", "huber_loss" (Σ Huber_δ(r)/δ at the optimum), "converged" (L-BFGS's own
    success flag; it often stops on a line-search warning at a good optimum), "max_abs_log_residual",
    "rss_log" (Σ r² of the log residuals), "aicc" (None where undefined), "premise"
    {"statement", "holds", "falls_with": {variable: {"rises", "fall", "range": [lo, hi]}}}
    ("fall": the smallest L̂(x_min)/L̂(x_max) − 1 over the grid lines; laws with floor over one
    variable add "power_share" = a·x_min^(−b)/c);
    1-D laws add "band" {"x": grid over the observed range, "lo", "hi"}: the 95 % band of L
    (see Uncertainty; None where unbounded); laws over n add "validation": {"status": "skipped", "reason"} or
    {"status": "ok", "holdout_n", "n_train_cells", "cells": [{"n", "k", "observed",
    "predicted", "rel_error", "interval": [lo, hi], "within_interval"}],
    "max_abs_rel_error", "within_interval", "flagged"}.

    A comparison C (see Model comparison) is {"criterion": "AICc", "aicc": {"power", "floor"},
    "preferred": "power" | "floor", "delta": AICc(floor) − AICc(power), "weak": |delta| ≤ AICC_WEAK}
    or, where either AICc is undefined, {"criterion", "aicc", "preferred": None, "delta": None,
    "weak": None, "reason": str}.
    """
    out: dict = {
        "huber_delta": HUBER_DELTA,
        "min_fall": MIN_FALL,
        "aicc_weak": AICC_WEAK,
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
    rng = _rng(seed, variable, *key)
    table = pd.DataFrame({"n_latents": np.asarray(x, dtype=np.int64), "k": 1, "seed": 0, "y": y})
    table["_ok"] = table["y"].gt(0) & table["y"].notna()
    power, floor = (_fit_entry(LAWS[f"{form}_{variable}"], table, "y", {}, rng, bootstrap) for form in ("power", "floor"))
    return {"power": power, "floor": floor, "comparison": _compare(power, floor)}


def find_group(fits: dict, site: str, arch: str) -> dict | None:
    """The ``metrics`` dict of one (site, arch) group of a fit_scaling_laws result, or None."""
    return next((g["metrics"] for g in fits["groups"] if g["site"] == site and g["arch"] == arch), None)


def predict(law_entry: dict, n: np.ndarray | float | None = None, k: np.ndarray | float | None = None) -> np.ndarray:
    """Evaluate a fitted law entry (``ok`` or ``contradicted``) at n and/or k (broadcast); the other
    variable may be omitted."""
    if "params" not in law_entry:
        raise ValueError(f"law {law_entry.get('law')} was not fitted: {law_entry.get('reason')}")
    law = LAWS[law_entry["law"]]
    n_arr, k_arr = np.broadcast_arrays(
        np.atleast_1d(np.asarray(1.0 if n is None else n, float)),
        np.atleast_1d(np.asarray(1.0 if k is None else k, float)),
    )
    public = np.array([law_entry["params"][p] for p in law.param_names], float)
    with np.errstate(divide="ignore"):
        theta = np.array([np.log(v) if p in law.log_params else v for p, v in zip(law.param_names, public)])
    xu, xv = _design(law, n_arr.ravel(), k_arr.ravel())
    return np.exp(_log_predict(theta, xu, xv)[0]).reshape(n_arr.shape)
