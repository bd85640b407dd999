"""95% intervals of metrics that are means over sampled units (tasks, latents), and whether a
change across dictionary sizes is resolved by them.

A cell's metric m comes with its standard error SE over its m_u sampled units (column
``{m}_se``, on ν = m_u − 1 degrees of freedom; m_u in ``{m}_count``). Over the c seeds of one
(curve, n) point, with seed values m_i of mean m̄, the seeds are a random effect: m_i = μ + b_i
+ e_i, Var(b_i) = τ², Var(e_i) = SE_i². Then Var(m̄) = τ²/c + Σ SE_i²/c², and with the
moment estimate τ̂² = max(0, s² − Σ SE_i²/c) (s² the sample variance of the m_i)

    SE(m̄)² = τ̂²/c + Σ SE_i²/c² = max( Σ SE_i²/c² ,  s²/c )

— the sampling error of the units, or the spread between seeds where that is larger: with
c ≥ 2 seeds the seed-to-seed variance enters every interval through τ̂². The degrees of freedom
are Welch–Satterthwaite's (``core.stats.satterthwaite_dof``) over the terms τ̂²/c (ν = c − 1)
and SE_i²/c² (ν = m_u,i − 1), and the interval is m̄ ± t_ν(0.975) · SE(m̄)
(``core.stats.t_quantile``). A change between the smallest and the largest n of a curve,
Δ = m̄(n_max) − m̄(n_min), is resolved when |Δ| > t_ν(0.975) · √(SE(n_min)² + SE(n_max)²),
ν the Welch–Satterthwaite degrees of freedom of the two squared SEs.

Where every cell measures the same units (the probe's token tasks, ``PAIRED_UNITS``), the
change is judged on the paired differences instead: with Δ_u the change of unit u between
the two sizes (seed means), over the m units measured at both, it is resolved when
|mean Δ_u| > t_{m−1}(0.975) · sd(Δ_u) / √m — the spread of difficulty between tasks cancels
out of it. (The sampled latents of the n-gram and ablation metrics differ from cell to cell:
unpaired.)
"""

from __future__ import annotations

import math
import re

import pandas as pd

from saesweep.core.stats import satterthwaite_dof, t_quantile

PAIRED_UNITS = {"probe_loss": re.compile(r"^probe_tasks_(.+)_loss$")}
"""Metric → the columns of its units, measured alike in every cell (the same tasks)."""
COLUMNS = ["curve", "n_latents", "mean", "se", "dof", "half_width"]


def _point(values: pd.Series, se: pd.Series | None, count: pd.Series | None) -> tuple[float, float]:
    """(SE(m̄), ν) of one point's seed values with their unit SEs and unit counts (module docstring)."""
    c = len(values)
    if se is None or se.isna().any():
        sampling, sampling_dof = [], []
    else:
        sampling = [v * v / (c * c) for v in se]
        sampling_dof = [n - 1 for n in count] if count is not None and count.notna().all() else [math.nan] * c
    seed_term = max(0.0, values.var() / c - sum(sampling)) if c > 1 else 0.0
    variances = [*sampling, seed_term] if c > 1 else sampling
    dofs = [*sampling_dof, c - 1] if c > 1 else sampling_dof
    if not variances:
        return math.nan, math.nan
    total = sum(variances)
    return math.sqrt(total), (satterthwaite_dof(variances, dofs) if total > 0 else math.nan)


def point_intervals(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (curve, n_latents): ``mean``, ``se`` (of the mean, as in the module docstring; nan
    without a standard error and a single seed), ``dof`` (its degrees of freedom; nan without
    the ``{metric}_count`` column) and ``half_width`` = t_dof(0.975) · se, from the rows with a
    value."""
    usable = rows[rows[metric].notna()]
    out = []
    for (curve, n), group in usable.groupby(["curve", "n_latents"]):
        se, dof = _point(group[metric], group.get(f"{metric}_se"), group.get(f"{metric}_count"))
        out.append({"curve": curve, "n_latents": n, "mean": group[metric].mean(), "se": se, "dof": dof,
                    "half_width": t_quantile(dof) * se})
    return pd.DataFrame(out, columns=COLUMNS)


def paired_trend(rows: pd.DataFrame, metric: str) -> str | None:
    """The trend of one curve's ``rows`` from the smallest to the largest n judged on paired
    unit differences (module docstring), or None when ``metric`` has no paired units."""
    pattern = PAIRED_UNITS.get(metric)
    units = [column for column in rows.columns if pattern and pattern.match(column)]
    if not units:
        return None
    sizes = sorted(rows["n_latents"].unique())
    if len(sizes) < 2:
        return "one n"
    means = rows.groupby("n_latents")[units].mean()
    change = (means.loc[sizes[-1]] - means.loc[sizes[0]]).dropna()
    if len(change) < 2:
        return "no interval"
    if abs(change.mean()) <= t_quantile(len(change) - 1) * change.std() / math.sqrt(len(change)):
        return "not resolved"
    return "rises" if change.mean() > 0 else "falls"


def trend_across_n(points: pd.DataFrame) -> str:
    """For one curve's ``point_intervals`` rows: "rises" or "falls" with n when the change from
    the smallest to the largest n is resolved, "not resolved" when it is not, "one n" or "no
    interval" when it cannot be judged."""
    if points["n_latents"].nunique() < 2:
        return "one n"
    ordered = points.sort_values("n_latents")
    first, last = ordered.iloc[0], ordered.iloc[-1]
    dof = satterthwaite_dof([first["se"] ** 2, last["se"] ** 2], [first["dof"], last["dof"]])
    if math.isnan(dof):
        return "no interval"
    change = last["mean"] - first["mean"]
    if abs(change) <= t_quantile(dof) * math.hypot(first["se"], last["se"]):
        return "not resolved"
    return "rises" if change > 0 else "falls"
