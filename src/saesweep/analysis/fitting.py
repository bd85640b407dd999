"""Fitting one law (``analysis.laws``) to cells, and its linearisation at the optimum.

Fitting (Hoffmann et al. 2022, approach 3): we minimise Σ_i Huber_δ(log L(x_i) − log y_i),
δ = 1e-3, with L-BFGS from a small grid of initial points (floor at 1 %, 50 % and 90 % of the
smallest observation, the power term from a log-linear least-squares fit of the rest) and
keep the best.

Observations: the seeds of a cell are averaged (arithmetic mean) into one observation y_i per
cell, so the scatter of the cell means about the law (the log residuals r_i) holds the
seed-to-seed variance as well as any lack of fit.

Linearisation (nonlinear least squares in log space): with m cells, p parameters, log
residuals r and Jacobian J of log L at the cells, s² = Σ r² / (m − p) on m − p degrees of
freedom and the unscaled covariance (JᵀJ)⁺; a linear function jᵀθ has the interval
jᵀθ̂ ± t_{m−p}(0.975) · s · √(jᵀ (JᵀJ)⁺ j).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from saesweep.analysis.laws import Law, design, log_predict
from saesweep.core.stats import t_quantile

HUBER_DELTA = 1e-3
FLOOR_FRACTIONS = (0.01, 0.5, 0.9)


def objective(theta: np.ndarray, xu: np.ndarray, xv: np.ndarray | None, logy: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(r) / δ over log residuals r, and its gradient (dividing by δ only rescales)."""
    f, jac = log_predict(theta, xu, xv)
    r = f - logy
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r**2 / HUBER_DELTA, np.abs(r) - 0.5 * HUBER_DELTA).sum()
    return float(loss), jac.T @ np.clip(r / HUBER_DELTA, -1.0, 1.0)


def initial_points(xu: np.ndarray, xv: np.ndarray | None, y: np.ndarray) -> list[np.ndarray]:
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


def minimise(
    xu: np.ndarray, xv: np.ndarray | None, y: np.ndarray, starts: list[np.ndarray]
) -> tuple[np.ndarray, float, bool]:
    """Best L-BFGS optimum over the starting points: (θ, loss, converged)."""
    best: tuple[np.ndarray, float, bool] = (np.full_like(starts[0], np.nan), np.inf, False)
    for start in starts:
        res = minimize(
            objective,
            start,
            args=(xu, xv, np.log(y)),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9},
        )
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) and res.fun < best[1]:
            best = (res.x, float(res.fun), bool(res.success))
    return best


def too_few(law: Law, nk: np.ndarray, spare: int = 0) -> str | None:
    """Why ``nk`` (distinct cells, columns n and k) cannot determine the law with ``spare``
    cells beyond p + 1, or None."""
    p = len(law.param_names)
    if law.x == "n,k" and (len(np.unique(nk[:, 0])) < 2 or len(np.unique(nk[:, 1])) < 2):
        return "needs at least 2 distinct n and 2 distinct k"
    distinct = len(np.unique(nk, axis=0))
    if distinct < p + 1 + spare:
        return f"{distinct} distinct {law.x} value(s), need at least {p + 1 + spare} for {p} parameters"
    return None


@dataclass
class Fit:
    """A law fitted to m cells ``nk`` (m × 2) with cell means ``y``."""

    law: Law
    nk: np.ndarray
    y: np.ndarray
    theta: np.ndarray
    loss: float
    converged: bool
    residuals: np.ndarray  # log(prediction) − log(observation) per cell

    def design(self) -> tuple[np.ndarray, np.ndarray | None]:
        return design(self.law, self.nk[:, 0], self.nk[:, 1])


def fit_law(law: Law, nk: np.ndarray, y: np.ndarray, warm: np.ndarray | None = None) -> Fit | str:
    """Fit ``law`` to cells ``nk`` (m × 2) with means ``y`` from ``initial_points`` and, when given,
    ``warm`` (a nearby optimum, e.g. the full data's for a subset); a reason string if impossible."""
    reason = too_few(law, nk)
    if reason:
        return reason
    xu, xv = design(law, nk[:, 0], nk[:, 1])
    starts = initial_points(xu, xv, y) + ([] if warm is None else [warm])
    theta, loss, converged = minimise(xu, xv, y, starts)
    if not np.isfinite(loss):
        return "optimiser found no finite optimum"
    return Fit(law, nk, y, theta, loss, converged, log_predict(theta, xu, xv)[0] - np.log(y))


@dataclass
class Linearised:
    """A fit linearised at its optimum (module docstring): (JᵀJ)⁺, s and m − p."""

    inverse: np.ndarray
    spread: float
    dof: int

    def half_width(self, jac: np.ndarray, level: float | None = None, new_observation: bool = False) -> np.ndarray:
        """t_{m−p}((1 + level)/2) · s · √(jᵀ (JᵀJ)⁺ j [+ 1 for a new observation]) per row j of
        ``jac`` (level: ``core.stats.LEVEL`` unless given)."""
        # jᵀ (JᵀJ)⁺ j ≥ 0; the pseudo-inverse of a nearly singular JᵀJ can give −ε: clipped to 0
        leverage = np.maximum(np.einsum("ij,jk,ik->i", jac, self.inverse, jac), 0.0) + (1.0 if new_observation else 0.0)
        quantile = t_quantile(self.dof) if level is None else t_quantile(self.dof, level)
        return quantile * self.spread * np.sqrt(leverage)


def linearise(fit: Fit) -> Linearised:
    jac = log_predict(fit.theta, *fit.design())[1]
    m, p = jac.shape
    return Linearised(np.linalg.pinv(jac.T @ jac), float(np.sqrt((fit.residuals**2).sum() / (m - p))), m - p)
