"""The training budget's laws (``analysis.convergence_fits``): tokens to convergence against n
from converge-mode cells, n_opt(C) from the compute frontier, their rows and figure."""

from __future__ import annotations

import numpy as np
import pandas as pd

from saesweep.analysis.convergence_fits import fit_convergence, n_opt_fits, power_fit, report_rows, tokens_to_converge_fits
from saesweep.analysis.convergence_plots import plot_convergence
from saesweep.analysis.report import fit_table
from test_compute import planted_logs

SIZES = (256, 512, 1024, 2048, 4096)


def converge_cells(beta: float = 0.6, noise: float = 0.0, seeds: int = 2) -> pd.DataFrame:
    """Cells whose tokens to convergence are 50·n^β (times log-normal noise per seed); the
    largest n was ended by its cap (converged false, tokens = the cap)."""
    rng = np.random.default_rng(1)
    rows = []
    for n in SIZES:
        for seed in range(seeds):
            capped = n == SIZES[-1]
            tokens = 50 * n**beta * np.exp(noise * rng.standard_normal())
            rows.append({"site": "resid8", "arch": "topk", "curve": "k32", "n_latents": n, "seed": seed,
                         "converged": not capped, "tokens_to_converge": None if capped else tokens,
                         "tokens": 40_000 if capped else tokens})
    return pd.DataFrame(rows)


def test_a_planted_exponent_comes_back_with_an_interval_that_holds_it() -> None:
    x = np.array(SIZES, dtype=float)
    exact = power_fit(x, 50 * x**0.6, 50, np.random.default_rng(0))
    assert exact["status"] == "ok" and abs(exact["params"]["beta"] - 0.6) < 1e-4 and abs(exact["params"]["a"] - 50) < 0.1
    noisy = power_fit(x, 50 * x**0.6 * np.exp(0.05 * np.random.default_rng(2).standard_normal(5)), 200,
                      np.random.default_rng(0))
    low, high = noisy["ci95"]["beta"]
    assert low < 0.6 < high and low < noisy["params"]["beta"] < high and high - low < 0.6
    assert power_fit(x[:2], x[:2], 10, np.random.default_rng(0))["status"] == "skipped"


def test_tokens_to_convergence_leaves_out_and_counts_the_capped_cells() -> None:
    fits = tokens_to_converge_fits(converge_cells(noise=0.02), bootstrap=50, seed=0)
    (group,) = fits["groups"]
    assert [p["n"] for p in group["points"]] == list(SIZES[:-1])  # seeds averaged, the capped n left out
    assert group["n_capped"] == 2 and group["capped"] == [4096, 4096]
    low, high = group["ci95"]["beta"]
    assert group["status"] == "ok" and low < 0.6 < high
    # a sweep with a fixed budget has nothing to fit, and says why
    fixed = converge_cells().assign(converged=None, tokens_to_converge=None)
    assert tokens_to_converge_fits(fixed, 10, 0) == {"law": fits["law"], "groups": [],
                                                     "reason": "no cell trained with train.budget.mode converge"}


def test_n_opt_of_the_planted_frontier_grows_as_the_square_root_of_compute() -> None:
    """The planted cloud of test_compute puts the best n at √C (up to the sizes' and the token
    grid's steps): fitted to where each size enters the frontier, β's interval holds 0.5; fitted
    to every frontier point it would not (the staircase stays at 2048 beyond its entry)."""
    (group,) = n_opt_fits(planted_logs(), bootstrap=50, seed=0)["groups"]
    low, high = group["ci95"]["beta"]
    assert group["status"] == "ok" and low < 0.5 < high and abs(group["params"]["beta"] - 0.5) < 0.1
    assert [entry["n"] for entry in group["entries"]] == [128, 256, 512, 1024, 2048]
    points = pd.DataFrame(group["points"])
    every = power_fit(points["compute"].round().to_numpy(), points["n"].to_numpy(), 50, np.random.default_rng(0))
    assert every["ci95"]["beta"][1] < 0.5
    # a frontier that two sizes enter after the smallest is not fitted
    few = planted_logs()
    (skipped,) = n_opt_fits(few[few["n_latents"] <= 256], bootstrap=10, seed=0)["groups"]
    assert skipped["status"] == "skipped" and "2 size(s) enter the frontier" in skipped["reason"]


def test_the_laws_reach_the_fit_table_and_the_figure(tmp_path) -> None:
    cells = converge_cells(noise=0.02)
    fits = {"groups": [], "convergence": fit_convergence(cells, planted_logs(), bootstrap=20)}
    table = fit_table(fits)
    rows = table[table["metric"].isin(["tokens_to_converge", "n_opt"])]
    assert list(rows["metric"]) == ["tokens_to_converge", "n_opt"] == [row["metric"] for row in report_rows(fits)]
    assert rows["parameters (95% CI)"].str.contains("beta = ").all()
    assert "1 cell" not in rows["reason"].iloc[0] and "2 cell(s) ended by the cap" in rows["reason"].iloc[0]
    png, svg = plot_convergence(cells, fits, tmp_path / "convergence", "t")
    assert png.stat().st_size > 10_000 and "tokens to convergence" in svg.read_text()


def test_a_flat_power_fit_is_not_resolved_and_a_steep_one_is() -> None:
    """The status rule of every law: an exponent whose 95 % interval includes 0 is "not resolved"."""
    x = np.array([1e3, 1e4, 1e5, 1e6])
    flat = power_fit(x, np.array([100.0, 101.0, 99.0, 100.5]), 200, np.random.default_rng(0))
    assert flat["status"] == "not resolved" and "includes 0" in flat["reason"]
    lo, hi = flat["ci95"]["beta"]
    assert lo <= 0 <= hi
    steep = power_fit(x, 3.0 * x**0.5 * np.array([1.0, 1.02, 0.99, 1.01]), 200, np.random.default_rng(0))
    assert steep["status"] == "ok" and steep["ci95"]["beta"][0] > 0
