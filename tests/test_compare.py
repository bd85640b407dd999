"""Architectures at matched L0: exact on planted power-law frontiers, never extrapolated,
the lower frontier wins, and the report page says when nothing can be compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saesweep.analysis.compare import matched_l0_table, write_comparison


def frontier(arch: str, l0: list[float], scale: float, n: int = 1024, prefix: str = "k") -> pd.DataFrame:
    """Cells on the planted frontier nmse = scale · L0^(−1/2), two seeds each."""
    rows = [
        {"site": "resid8", "arch": arch, "n_latents": n, "seed": seed, "setting": f"{arch}-{prefix}{value}",
         "l0": value, "nmse": scale * value**-0.5, "delta_lm_loss": 0.1 * scale * value**-0.5}
        for value in l0 for seed in (0, 1)
    ]
    return pd.DataFrame(rows)


def test_interpolation_is_exact_on_power_laws_and_the_lower_frontier_wins() -> None:
    cells = pd.concat([frontier("topk", [8, 32, 128], 0.5), frontier("relu", [20, 60, 200], 0.8, prefix="l")])
    table = matched_l0_table(cells)
    compared = sorted(table["l0"].unique())
    assert compared == [20, 32, 60, 128]  # the L0s of any cell where both frontiers have a value
    for row in table.itertuples():
        scale = 0.5 if row.arch == "topk" else 0.8
        assert row.value == pytest.approx(scale * row.l0**-0.5, rel=1e-9)
        assert row.wins == (row.arch == "topk")
    relu = table[table["arch"] == "relu"].iloc[0]
    assert (relu.l0_min, relu.l0_max) == (20, 200)


def test_no_extrapolation_and_single_settings_have_no_frontier() -> None:
    apart = pd.concat([frontier("topk", [8, 16], 0.5), frontier("relu", [100, 300], 0.8, prefix="l")])
    assert matched_l0_table(apart).empty
    single = pd.concat([frontier("topk", [8, 32, 128], 0.5), frontier("relu", [40], 0.1, prefix="l")])
    assert matched_l0_table(single).empty  # one relu setting is no frontier, however good


def test_comparison_files(tmp_path: Path) -> None:
    cells = pd.concat([frontier("topk", [8, 32, 128], 0.5), frontier("batchtopk", [10, 30, 100], 0.4)])
    cells.to_parquet(tmp_path / "cells.parquet")
    table = write_comparison(tmp_path / "cells.parquet", tmp_path / "a.csv", tmp_path / "a.html")
    assert set(table["metric"]) == {"nmse", "delta_lm_loss"}
    assert table[table["wins"]]["arch"].eq("batchtopk").all()
    assert pd.read_csv(tmp_path / "a.csv").shape == table.shape
    page = (tmp_path / "a.html").read_text()
    assert "nmse at matched L0" in page and "batchtopk" in page and "L0 range" in page
    pd.concat([frontier("topk", [8, 32], 0.5)]).to_parquet(tmp_path / "one.parquet")
    write_comparison(tmp_path / "one.parquet", tmp_path / "b.csv", tmp_path / "b.html")
    assert "No L0 at which two architectures can be compared" in (tmp_path / "b.html").read_text()
    assert np.isfinite(table["value"]).all()
