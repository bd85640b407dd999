"""The scaling laws' functional forms and their evaluation (fitting: ``analysis.fitting``).

With n = number of latents and k = active latents per token:

    power_n   L(n)    = a·n^(−b)                         (at fixed k)
    floor_n   L(n)    = a·n^(−b) + c,   c ≥ 0            (at fixed k; c is the irreducible term)
    power_k   L(k)    = a·k^(−b)                         (at fixed n)
    floor_k   L(k)    = a·k^(−b) + c,   c ≥ 0            (at fixed n)
    joint     L(n, k) = exp(α + β_k ln k + β_n ln n + γ ln k ln n) + exp(ζ + η ln k)
                                                         (Gao et al. 2024, eq. for GPT-4)
    power_C   L(C)    = a·C^(−b),   floor_C  L(C) = a·C^(−b) + c
                                                         (C: training compute, ``compute``)
    power_nmse ΔL(NMSE) = a·NMSE^(−b)                    (ΔLM loss against normalised MSE,
                                                         held in the n column: ``loss_law``)

Every law is written as log L = logaddexp(X_u·θ_u, X_v·θ_v) over internal parameters θ
(the floor term X_v·θ_v is absent for pure power laws; a and c enter as log a and log c, so
c ≥ 0 by construction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saesweep.core.stats import LEVEL


@dataclass(frozen=True)
class Law:
    """One functional form: public parameter names, which of them are fitted as logs, its variable."""

    name: str
    formula: str
    param_names: tuple[str, ...]
    log_params: tuple[str, ...]
    x: str  # "n", "k", "n,k", "C" or "NMSE" (the last two held in the n column)
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
        Law("power_nmse", "dL(NMSE) = a * NMSE^(-b)", ("a", "b"), ("a",), "NMSE", False),
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


def design(law: Law, n: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Feature matrices of the power term (X_u) and the floor term (X_v, None without floor)."""
    ln, lk = np.log(n.astype(float)), np.log(k.astype(float))
    one = np.ones_like(ln)
    if law.x == "n,k":
        return np.column_stack([one, lk, ln, lk * ln]), np.column_stack([one, lk])
    lx = lk if law.x == "k" else ln
    return np.column_stack([one, -lx]), (one[:, None] if law.floor else None)


def log_predict(theta: np.ndarray, xu: np.ndarray, xv: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """log L and its Jacobian with respect to the internal parameters θ = (θ_u, θ_v)."""
    pu = xu.shape[1]
    u = xu @ theta[:pu]
    if xv is None:
        return u, xu
    f = np.logaddexp(u, xv @ theta[pu:])
    w = np.exp(u - f)[:, None]
    return f, np.hstack([w * xu, (1.0 - w) * xv])


def to_public(law: Law, theta: np.ndarray) -> np.ndarray:
    """Internal θ (log a, b, log c / α…η) → public parameters in ``law.param_names`` order."""
    out = theta.astype(float).copy()
    for i, name in enumerate(law.param_names):
        if name in law.log_params:
            out[..., i] = np.exp(theta[..., i])
    return out


def predict(law_entry: dict, n: np.ndarray | float | None = None, k: np.ndarray | float | None = None) -> np.ndarray:
    """Evaluate a fitted law entry of fits.json (any status but ``skipped``) at n and/or k
    (broadcast); the other variable may be omitted."""
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
    xu, xv = design(law, n_arr.ravel(), k_arr.ravel())
    return np.exp(log_predict(theta, xu, xv)[0]).reshape(n_arr.shape)


def unresolved(interval: list[float | None], exponent: str, what: str) -> str | None:
    """Why a fitted exponent leaves ``what`` not resolved: its 95 % (``LEVEL``) interval
    includes 0 or is unbounded; None when the interval excludes 0."""
    lo, hi = interval
    if lo is not None and hi is not None and not lo <= 0 <= hi:
        return None
    shown = f"[{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else "unbounded"
    return f"the exponent {exponent}'s {LEVEL:.0%} interval {shown} includes 0: {what} is not resolved"
