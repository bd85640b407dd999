"""Intervals of sampled metrics and the resolution of a trend across n."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from saesweep.analysis.intervals import paired_trend, point_intervals, trend_across_n


def table(means: dict[int, list[float]], se: float) -> pd.DataFrame:
    rows = [
        {"curve": "k8", "n_latents": n, "seed": seed, "probe_loss": value, "probe_loss_se": se}
        for n, values in means.items() for seed, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_one_seed_interval_is_its_sampling_error() -> None:
    points = point_intervals(table({512: [0.2], 2048: [0.1]}, se=0.01), "probe_loss")
    assert points["half_width"].tolist() == pytest.approx([0.0196, 0.0196])


def test_seed_spread_widens_the_interval_when_larger() -> None:
    points = point_intervals(table({512: [0.2, 0.3]}, se=0.001), "probe_loss")
    assert points["se"].iloc[0] == pytest.approx(pd.Series([0.2, 0.3]).std() / math.sqrt(2))


@pytest.mark.parametrize(("se", "expected"), [(0.01, "falls"), (0.05, "not resolved")])
def test_a_trend_is_resolved_only_beyond_its_interval(se: float, expected: str) -> None:
    """Δ = −0.1 between n = 512 and 8192: resolved with SE 0.01 (1.96·√2·0.01 = 0.028), not
    with SE 0.05 (0.139)."""
    points = point_intervals(table({512: [0.3], 2048: [0.25], 8192: [0.2]}, se=se), "probe_loss")
    assert trend_across_n(points) == expected


def test_a_trend_needs_two_sizes_and_intervals() -> None:
    assert trend_across_n(point_intervals(table({512: [0.3]}, se=0.01), "probe_loss")) == "one n"
    no_se = table({512: [0.3], 2048: [0.1]}, se=float("nan"))
    assert trend_across_n(point_intervals(no_se, "probe_loss")) == "no interval"


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
    assert trend_across_n(point_intervals(rows, "probe_loss")) == "not resolved"
    assert paired_trend(rows, "probe_loss") == "falls"
    assert paired_trend(rows, "explain_precision") is None
