"""95% intervals of metrics that are means over sampled units (tasks, latents), and whether a
change across dictionary sizes is resolved by them.

A cell's metric m comes with its standard error SE over its sampled units (column
``{m}_se``). Over the seeds of one (curve, n) point, with mean m̄ of c seeds,

    SE(m̄) = max( √(Σ_seeds SE²) / c ,  s_seeds / √c )      (the second only with c ≥ 2)

— the sampling error of the units, or the spread between seeds where that is larger — and
the interval is m̄ ± 1.96 · SE(m̄). A change between the smallest and the largest n of a curve,
Δ = m̄(n_max) − m̄(n_min), is resolved when |Δ| > 1.96 · √(SE(n_min)² + SE(n_max)²).

Where every cell measures the same units (the probe's token tasks, ``PAIRED_UNITS``), the
change is judged on the paired differences instead: with Δ_u the change of unit u between
the two sizes (seed means), over the m units measured at both, it is resolved when
|mean Δ_u| > 1.96 · sd(Δ_u) / √m — the spread of difficulty between tasks cancels out of it.
(The sampled latents of the n-gram and ablation metrics differ from cell to cell: unpaired.)
"""

from __future__ import annotations

import math
import re

import pandas as pd

Z95 = 1.96
PAIRED_UNITS = {"probe_loss": re.compile(r"^probe_tasks_(.+)_loss$")}
"""Metric → the columns of its units, measured alike in every cell (the same tasks)."""


def point_intervals(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (curve, n_latents): ``mean``, ``se`` (of the mean, as in the module docstring;
    nan without a standard error) and ``half_width`` = 1.96 · se, from the rows with a value."""
    se_column = f"{metric}_se"
    usable = rows[rows[metric].notna()]
    out = []
    for (curve, n), group in usable.groupby(["curve", "n_latents"]):
        count = len(group)
        sampling = math.sqrt((group[se_column] ** 2).sum()) / count if se_column in group and group[se_column].notna().all() else math.nan
        seeds = group[metric].std() / math.sqrt(count) if count > 1 else math.nan
        se = max((v for v in (sampling, seeds) if not math.isnan(v)), default=math.nan)
        out.append({"curve": curve, "n_latents": n, "mean": group[metric].mean(), "se": se, "half_width": Z95 * se})
    return pd.DataFrame(out, columns=["curve", "n_latents", "mean", "se", "half_width"])


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
    if abs(change.mean()) <= Z95 * change.std() / math.sqrt(len(change)):
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
    if math.isnan(first["se"]) or math.isnan(last["se"]):
        return "no interval"
    change = last["mean"] - first["mean"]
    if abs(change) <= Z95 * math.hypot(first["se"], last["se"]):
        return "not resolved"
    return "rises" if change > 0 else "falls"
