"""The convergence stop (``train.convergence``) on planted held-out curves: it stops exactly at
the first point the criterion names, never before and never past the cap; its grid; the
config keys that make it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import tiny_config
from saesweep.core.errors import UserError
from saesweep.core.job_settings import ConvergenceSettings
from saesweep.plan.config import validate_config
from saesweep.plan.settings import train_settings
from saesweep.train.convergence import converged, curve, heldout_grid, outcome, stop_index

CAP = 1_000_000


def planted(tokens: list[int], floor: float = 0.05, scale: float = 2.0, alpha: float = 0.5) -> list[float]:
    """L(t) = floor + scale · t^(−alpha) at each t."""
    return [floor + scale * t ** -alpha for t in tokens]


def expected_stop(tokens: list[int], losses: list[float], rule: ConvergenceSettings) -> int | None:
    """The first index i ≥ W with t_i ≥ t_min and a relative fall over W points below ε, by hand."""
    for i in range(rule.window, len(losses)):
        fall = (losses[i - rule.window] - losses[i]) / losses[i - rule.window]
        if tokens[i] >= rule.min_tokens and fall < rule.eps:
            return i
    return None


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("eps", [0.3, 0.1, 0.03])
def test_a_planted_curve_stops_at_the_first_point_the_criterion_names(window, eps) -> None:
    rule = ConvergenceSettings(eps=eps, window=window, min_tokens=0)
    tokens = heldout_grid(CAP, 14, rule)
    losses = planted(tokens)
    index, done = stop_index(tokens, losses, rule, CAP)
    assert done and index == expected_stop(tokens, losses, rule)
    # not before: the criterion holds at no earlier prefix, and it holds at the stop
    assert not any(converged(tokens[: i + 1], losses[: i + 1], rule) for i in range(index))
    assert converged(tokens[: index + 1], losses[: index + 1], rule)
    # for L = L∞ + A·t^(−α) the stop is where the reducible share A·s^(−α) / L(s) at s = t/2 first
    # drops below ε / (1 − 2^(−α)) (the grid's points W apart are a doubling apart up to rounding)
    alpha, scale, floor = 0.5, 2.0, 0.05
    share = [scale * (t / 2) ** -alpha / (floor + scale * (t / 2) ** -alpha) for t in tokens]
    first = next(i for i in range(window, len(tokens)) if share[i] < eps / (1 - 2**-alpha))
    assert abs(index - first) <= 1


def test_the_cap_ends_a_curve_that_does_not_converge_and_is_never_passed() -> None:
    rule = ConvergenceSettings(eps=1e-6, window=2, min_tokens=0)
    tokens = heldout_grid(CAP, 8, rule) + [2 * CAP, 4 * CAP]  # points past the cap must never be reached
    losses = [1.0 / t for t in tokens]  # falls by half every doubling, forever
    index, done = stop_index(tokens, losses, rule, CAP)
    assert not done and tokens[index] == CAP
    assert outcome([{"tokens": t, "heldout_nmse": loss} for t, loss in zip(tokens, losses)], rule, CAP) == {
        "budget": "converge", "converged": False, "tokens_to_converge": None,
    }


def test_no_stop_before_the_minimum_and_a_rising_loss_has_converged() -> None:
    flat_rule = ConvergenceSettings(eps=0.01, window=1, min_tokens=100_000)
    tokens = heldout_grid(CAP, 8, flat_rule)
    flat = [0.2] * len(tokens)  # converged from the second point on, were it not for t_min
    index, done = stop_index(tokens, flat, flat_rule, CAP)
    assert done and tokens[index] == min(t for t in tokens if t >= 100_000) and tokens[index - 1] < 100_000
    rising = [0.5, 0.4, 0.3, 0.31, 0.2]
    assert stop_index([1, 2, 4, 8, 16], rising, ConvergenceSettings(eps=0.01, window=1, min_tokens=0), 16) == (3, True)


def test_the_grid_has_window_points_per_doubling() -> None:
    doublings = sorted({math.ceil(12000 / 2**j) for j in range(6)})
    assert heldout_grid(12000, 6, ConvergenceSettings(eps=0.1, window=1, min_tokens=0)) == doublings
    grid = heldout_grid(12000, 6, ConvergenceSettings(eps=0.1, window=3, min_tokens=0))
    assert len(grid) == 3 * 5 + 1 and grid[-1] == 12000 and grid[0] == 375
    assert set(doublings) <= set(grid)
    ratios = np.array(grid[3:]) / np.array(grid[:-3])  # W points back is one doubling
    assert np.allclose(ratios, 2, rtol=1e-2)
    assert heldout_grid(12000, 0, ConvergenceSettings(eps=0.1, window=3, min_tokens=0)) == []


def test_the_curve_and_outcome_read_a_training_log() -> None:
    rows = [{"tokens": 256, "nmse": 0.9}, {"tokens": 512, "nmse": 0.8, "heldout_nmse": 0.5},
            {"tokens": 1024, "nmse": 0.7, "heldout_nmse": 0.499}]
    assert curve(rows) == ([512, 1024], [0.5, 0.499])
    rule = ConvergenceSettings(eps=0.01, window=1, min_tokens=0)
    assert outcome(rows, rule, 4096) == {"budget": "converge", "converged": True, "tokens_to_converge": 1024}
    assert outcome(rows, None, 4096) == {"budget": "fixed", "converged": None, "tokens_to_converge": None}


def test_converge_mode_reaches_the_cell_settings_and_needs_a_constant_rate(tmp_path) -> None:
    base = tiny_config(tmp_path, tmp_path)
    fixed = train_settings(validate_config(base), "resid2", "topk-n64-k4-s0")
    assert fixed.convergence is None
    config = validate_config({**base, "train": {**base["train"], "budget": {"mode": "converge", "eps": 0.05}}})
    settings = train_settings(config, "resid2", "topk-n64-k4-s0")
    assert settings.convergence == ConvergenceSettings(eps=0.05, window=2, min_tokens=0)
    assert settings.tokens == fixed.tokens  # the budget rule gives the cap
    decaying = {**base["train"], "budget": {"mode": "converge"}, "lr": {**base["train"]["lr"], "decay": "linear"}}
    with pytest.raises(UserError, match="train.lr.decay"):
        validate_config({**base, "train": decaying})
    one_point = {**base["train"], "budget": {"mode": "converge"}, "heldout": {"points": 1}}
    with pytest.raises(UserError, match="train.heldout.points"):
        validate_config({**base, "train": one_point})
