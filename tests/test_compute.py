"""The compute frontier: the lower envelope of (C, L) points and the law fitted to it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from saesweep.analysis.compute import FLOPS, compute_points, fit_compute_frontiers, frontier
from saesweep.sae.flops import step_flops


def planted_logs(noise: float = 0.0) -> pd.DataFrame:
    """Held-out curves of five sizes whose losses follow L(n, t) = n^(−0.6) + (t/64)^(−0.6):
    at compute C ∝ n·t the best n grows as √C and L(C) ∝ C^(−0.3) along the envelope, and
    at each budget the best n is neither always the smallest nor the largest."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (64, 128, 256, 512, 1024, 2048):
        for tokens in np.geomspace(1_000, 2_048_000, 23).round().astype(int):
            loss = (n ** -0.6 + (tokens / 64) ** -0.6) * np.exp(noise * rng.standard_normal())
            rows.append({"site": "resid1", "arch": "topk", "curve": "k8", "n_latents": n, "seed": 0,
                         "tokens": tokens, "d": 32, "heldout_nmse": loss, "nmse": loss,
                         # dense steps (C ∝ n·t, as the planted law needs): one step of all tokens
                         "flops": step_flops("matryoshka", int(tokens), 32, n, {})})
    rows.append({"site": "resid1", "arch": "topk", "curve": "k8", "n_latents": 64, "seed": 0,
                 "tokens": 10, "d": 32, "heldout_nmse": np.nan, "nmse": 1.0, "flops": 1})  # a log row without the curve
    return pd.DataFrame(rows)


def test_points_carry_the_stated_compute() -> None:
    points = compute_points(planted_logs())
    assert len(points) == 6 * 23 and points["loss"].notna().all()
    row = points.iloc[0]
    assert row["compute"] == 12 * row["tokens"] * 32 * row["n_latents"]
    assert compute_points(planted_logs().drop(columns="flops")).empty  # a log from before FLOPs were counted


def test_frontier_is_the_lower_envelope() -> None:
    """No point of the cloud lies below the frontier's step function, and every frontier
    point is itself a point with lower loss than all points of smaller compute."""
    points = compute_points(planted_logs(noise=0.1))
    edge = frontier(points)
    assert edge["compute"].is_monotonic_increasing and edge["loss"].is_monotonic_decreasing
    for _, point in points.iterrows():
        before = edge[edge["compute"] <= point["compute"]]
        assert len(before) == 0 or before["loss"].min() <= point["loss"]
    assert edge["n_latents"].nunique() > 1  # the best n changes with the budget


def test_planted_frontier_law_gives_back_its_exponent() -> None:
    """Along the envelope of the planted cloud the loss falls as C^(−0.3) (up to the steps of
    the discrete sizes), so the pure law's exponent interval holds b = 0.3."""
    fits = fit_compute_frontiers(planted_logs(), bootstrap=50)
    (group,) = fits["groups"]
    power = group["laws"]["power"]
    assert power["status"] == "ok" and power["x"] == "C"
    low, high = power["ci95"]["b"]
    assert low < 0.3 < high and high - low < 0.1
    assert fits["flops"] == FLOPS


def test_groups_with_few_sizes_get_no_frontier() -> None:
    logs = planted_logs()
    assert fit_compute_frontiers(logs[logs["n_latents"] <= 128], bootstrap=0)["groups"] == []
    assert compute_points(logs.drop(columns="heldout_nmse")).empty
