"""The premises every law is checked against after its (free) fit.

Every law claims that the loss falls with its variable(s), measurably, over the observed
range.  The fit is free (b is not constrained, so a contradiction shows instead of being
pinned at b = 0); afterwards L̂ is evaluated on a log grid of BAND_POINTS values spanning the
fitted cells' range of each variable (BAND_POINTS × BAND_POINTS in (n, k) for the joint law,
which is checked along n at each grid k and along k at each grid n):

    1. L̂ never rises between two neighbouring grid points (for the 1-D laws: b ≥ 0), and
    2. L̂ falls measurably along every grid line: L̂(x_min) / L̂(x_max) − 1 > MIN_FALL
       (for a pure power law: (x_max/x_min)^b − 1 > MIN_FALL, so with 1, b > 0).

A law failing either check keeps its parameters but gets ``"status": "contradicted"`` and a
``reason`` in words.  For a law with floor, check 2 implies that the power term is not
negligible against the floor, a·x_min^(−b) > MIN_FALL·c (since L̂(x_min) − L̂(x_max) <
a·x_min^(−b) and L̂(x_max) > c), and it also catches the other way a floor law degenerates on
flat data (c → 0, b → 0, so a·x^(−b) is itself a constant).

Passing both checks says the fitted curve falls; whether the data resolve that fall is a
separate question, answered by the exponent's interval (``scaling``: status "not resolved").
"""

from __future__ import annotations

import numpy as np

from saesweep.analysis.laws import Law, design, log_predict, to_public

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


def num(x: float) -> float | None:
    """A JSON-safe float (None for NaN or infinity)."""
    return float(x) if np.isfinite(x) else None


def premise(law: Law, theta: np.ndarray, nk: np.ndarray) -> tuple[dict, str | None]:
    """The premise checks of the module docstring for a fit ``theta`` to cells ``nk``: the
    ``premise`` record of its entry and, when a check fails, the reason in words (else None)."""
    ranges = {"n": (int(nk[:, 0].min()), int(nk[:, 0].max())), "k": (int(nk[:, 1].min()), int(nk[:, 1].max()))}
    ranges["C"] = ranges["n"]
    nn, kk = np.meshgrid(*(np.geomspace(*ranges[v], BAND_POINTS) for v in ("n", "k")))  # rows: k, columns: n
    log_l = log_predict(theta, *design(law, nn.ravel(), kk.ravel()))[0].reshape(nn.shape)
    variables = law.x.split(",")
    statement = f"L falls with {' and with '.join(variables)}, by more than {MIN_FALL:.0%} over the observed range"
    record: dict = {"statement": statement, "falls_with": {}}
    reasons = []
    for v in variables:
        lines = log_l.T if v == "k" else log_l  # each row: L̂ along v at one value of the other variable
        rises = bool(np.any(np.diff(lines, axis=1) > 0))
        fall = float(np.expm1(lines[:, 0] - lines[:, -1]).min())
        record["falls_with"][v] = {"rises": rises, "fall": num(fall), "range": list(ranges[v])}
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
        a, b, c = to_public(law, theta)
        with np.errstate(divide="ignore", over="ignore"):
            share = a * ranges[law.x][0] ** -b / c
        record["power_share"] = num(share)
        if reasons and not share > MIN_FALL:
            reasons[-1] += f" (a·{law.x}^(−b) at {law.x} = {ranges[law.x][0]} is {share:.1%} of the floor c)"
    record["holds"] = not reasons
    return record, "; ".join(reasons) or None
