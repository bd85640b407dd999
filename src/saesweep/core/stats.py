"""The one confidence level of every interval the project reports, and the quantiles that go with it.

A 95 % interval of an estimate θ̂ with standard error SE on ν degrees of freedom is

    θ̂ ± t_ν((1 + LEVEL) / 2) · SE,

t_ν the Student t quantile (scipy.stats.t); a sum of independent variance estimates
V = Σ_j v_j, each on ν_j degrees of freedom, gets the Welch–Satterthwaite degrees of freedom

    ν = V² / Σ_j (v_j² / ν_j).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import t as student_t

LEVEL = 0.95
"""The confidence level of every interval: fits' ci95 and bands, metric intervals, trends."""

TAILS_PERCENT = (50 * (1 - LEVEL), 50 * (1 + LEVEL))
"""The percentiles (2.5, 97.5) that bound a LEVEL percentile interval."""


def t_quantile(dof: float, level: float = LEVEL) -> float:
    """t_ν((1 + level)/2), the half-width of a two-sided ``level`` interval in standard errors;
    nan for ν ≤ 0 or nan (no degree of freedom, no interval)."""
    if not dof > 0:
        return math.nan
    return float(student_t.ppf((1 + level) / 2, dof))


def satterthwaite_dof(variances: Sequence[float], dofs: Sequence[float]) -> float:
    """Welch–Satterthwaite ν = (Σ v_j)² / Σ (v_j² / ν_j) of a sum of variance estimates v_j on
    ν_j degrees of freedom (terms with v_j = 0 drop out); nan when every v_j is 0 or any term
    has ν_j ≤ 0 or nan."""
    terms = [(v, d) for v, d in zip(variances, dofs) if v != 0]
    if not terms or not all(d > 0 for _, d in terms):
        return math.nan
    return sum(v for v, _ in terms) ** 2 / sum(v * v / d for v, d in terms)
