"""Intervals of sampled metrics and the resolution of a trend across n."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from scipy.stats import t as student_t

from saesweep.analysis.intervals import paired_trend, point_intervals, trend_across_n
from saesweep.core.stats import satterthwaite_dof, t_quantile


def table(means: dict[int, list[float]], se: float, count: int = 10) -> pd.DataFrame:
    rows = [
        {"curve": "k8", "n_latents": n, "seed": seed, "probe_loss": value, "probe_loss_se": se, "probe_loss_count": count}
        for n, values in means.items() for seed, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_one_seed_interval_is_its_sampling_error_with_a_t_quantile() -> None:
    """10 sampled units: 9 degrees of freedom, t_9(0.975) = 2.262, not 1.96."""
    points = point_intervals(table({512: [0.2], 2048: [0.1]}, se=0.01), "probe_loss")
    assert points["dof"].tolist() == [9, 9]
    assert points["half_width"].tolist() == pytest.approx([0.02262, 0.02262], abs=1e-5)


def test_seed_spread_widens_the_interval_when_larger() -> None:
    """Two seeds 0.1 apart with tiny unit errors: the seed term dominates, SE = s/√2 on about
    c − 1 = 1 degree of freedom (t = 12.7)."""
    points = point_intervals(table({512: [0.2, 0.3]}, se=0.001), "probe_loss")
    assert points["se"].iloc[0] == pytest.approx(pd.Series([0.2, 0.3]).std() / math.sqrt(2))
    assert points["dof"].iloc[0] == pytest.approx(1.0, abs=0.01)
    assert points["half_width"].iloc[0] == pytest.approx(student_t.ppf(0.975, points["dof"].iloc[0]) * points["se"].iloc[0])


def test_seed_variance_enters_beside_the_sampling_error() -> None:
    """Two seeds whose spread (s²/c = 0.0004) exceeds their sampling error (Σ SE²/c² = 0.00005):
    SE² = τ̂²/c + Σ SE²/c² = s²/c, its degrees of freedom between c − 1 and the units'."""
    points = point_intervals(table({512: [0.2, 0.24]}, se=0.01, count=50), "probe_loss")
    seed_term, sampling = 0.0008 / 2 - 2 * 0.0001 / 4, [0.0001 / 4] * 2
    assert points["se"].iloc[0] == pytest.approx(math.sqrt(0.0008 / 2))
    assert points["dof"].iloc[0] == pytest.approx(satterthwaite_dof([*sampling, seed_term], [49, 49, 1]))
    assert 1 < points["dof"].iloc[0] < 49


def test_few_units_are_judged_with_t_not_z() -> None:
    """Δ = 0.1 with SE 0.03 at each end from 4 units each (ν = 6): z would call it resolved
    (1.96·√2·0.03 = 0.083), t_6 does not (2.447·√2·0.03 = 0.104)."""
    points = point_intervals(table({512: [0.3], 2048: [0.2]}, se=0.03, count=4), "probe_loss")
    assert 1.96 * math.sqrt(2) * 0.03 < 0.1 < t_quantile(6) * math.sqrt(2) * 0.03
    assert trend_across_n(points) == "not resolved"
    assert trend_across_n(point_intervals(table({512: [0.3], 2048: [0.2]}, se=0.03, count=400), "probe_loss")) == "falls"


@pytest.mark.parametrize(("se", "expected"), [(0.01, "falls"), (0.05, "not resolved")])
def test_a_trend_is_resolved_only_beyond_its_interval(se: float, expected: str) -> None:
    """Δ = −0.1 between n = 512 and 8192: resolved with SE 0.01 (t_18·√2·0.01 = 0.030), not
    with SE 0.05 (0.149)."""
    points = point_intervals(table({512: [0.3], 2048: [0.25], 8192: [0.2]}, se=se), "probe_loss")
    assert trend_across_n(points) == expected


def test_a_trend_needs_two_sizes_and_intervals() -> None:
    assert trend_across_n(point_intervals(table({512: [0.3]}, se=0.01), "probe_loss")) == "one n"
    no_se = table({512: [0.3], 2048: [0.1]}, se=float("nan"))
    assert trend_across_n(point_intervals(no_se, "probe_loss")) == "no interval"
    no_count = table({512: [0.3], 2048: [0.1]}, se=0.01).drop(columns="probe_loss_count")
    assert trend_across_n(point_intervals(no_count, "probe_loss")) == "no interval"  # unknown ν


def test_paired_tasks_resolve_a_change_their_spread_hides() -> None:
    """Ten tasks of very different difficulty, each 0.02 easier at the larger n: the intervals
    of the means overlap (spread 0.1 between tasks), the paired differences resolve it."""
    difficulty = [0.1 * task for task in range(10)]
    rows = pd.DataFrame([
        {"curve": "k8", "n_latents": n, "seed": 0, **{f"probe_tasks_t{t}_loss": d - (0.02 if n == 2048 else 0.0) for t, d in enumerate(difficulty)}}
        for n in (512, 2048)
    ])
    units = rows.filter(like="probe_tasks_")
    rows["probe_loss"] = units.mean(axis=1)
    rows["probe_loss_se"] = units.std(axis=1) / math.sqrt(10)
    rows["probe_loss_count"] = 10
    assert trend_across_n(point_intervals(rows, "probe_loss")) == "not resolved"
    assert paired_trend(rows, "probe_loss") == "falls"
    assert paired_trend(rows, "explain_precision") is None
