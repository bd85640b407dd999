"""Bootstrap replicates of the cells' test-part normalised MSE and L0, resampling held-out
windows and seeds, for the intervals of the architecture comparison (``analysis.compare``).

Every cell of a site is evaluated on the same held-out windows (``evaluation.heldout_split``).
A replicate b draws W windows with replacement from the W test windows, as multiplicities
m_bw (one draw shared by every cell of the site: the comparison is paired, as the cells
are), and gives each cell c

    nmse_bc = Σ_w m_bw sq_error_cw / Σ_w m_bw variance_cw,   l0_bc = Σ_w m_bw l0_sum_cw / Σ_w m_bw tokens_cw.

A setting (the cells that differ only in seed) with S seeds also draws S of its seeds with
replacement in each replicate and takes the mean of those cells' values: replicate values
of a setting combine both sources of variation, windows and training seeds. With one seed
only windows vary, and the interval says nothing about retraining.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from saesweep.core.errors import UserError
from saesweep.core.files import read_json
from saesweep.core.split import PARTS, STATISTICS, TEST, UNIT, WINDOWS_KEY

CELL_KEY = ["site", "arch", "setting", "n_latents", "seed"]


def read_windows(metrics_paths: list[Path]) -> pd.DataFrame:
    """One row per (cell, part, window) of the cells' ``metrics.json``: ``CELL_KEY``, part,
    window and the sums ``STATISTICS``. A file without them (evaluated before the split
    existed) is a UserError naming it."""
    frames = []
    for path in metrics_paths:
        metrics = read_json(path, "cell metrics")
        block = metrics.get(WINDOWS_KEY)
        if block is None or block.get("unit") != UNIT:
            raise UserError(
                f"cell metrics {path} have no per-{UNIT} sums ({WINDOWS_KEY!r}): evaluated before the "
                "validation/test split; delete the file and rerun the workflow to evaluate the cell again"
            )
        for part in PARTS:
            frame = pd.DataFrame(block[part]).assign(part=part, **{key: metrics[key] for key in CELL_KEY})
            frames.append(frame)
    columns = [*CELL_KEY, "part", "window", *STATISTICS]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def window_draws(windows: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities m (replicates, W) of the W windows in each replicate (each row sums to W)."""
    return rng.multinomial(len(windows), np.full(len(windows), 1 / len(windows)), size=replicates)


def cell_replicates(test_windows: pd.DataFrame, draws: np.ndarray, windows: np.ndarray) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Per cell (its ``CELL_KEY`` tuple): (nmse_b, l0_b) over the replicates ``draws`` of the
    site's test ``windows`` (module docstring). Every cell must have exactly these windows."""
    result = {}
    for key, rows in test_windows.groupby(CELL_KEY, sort=False, dropna=False):  # an external SAE has no seed
        rows = rows.set_index("window")
        if len(rows) != len(windows) or not np.array_equal(np.sort(rows.index.to_numpy()), windows):
            raise UserError(
                f"cell {key}: its test windows differ from the other cells' at site {key[0]}: evaluated "
                "with another evaluate.tokens or another held-out extraction; cells compared must share them"
            )
        stats = rows.loc[windows, list(STATISTICS)].to_numpy(dtype=np.float64)
        sums = draws @ stats  # (replicates, statistics)
        tokens, sq_error, variance, l0_sum = (sums[:, STATISTICS.index(name)] for name in STATISTICS)
        result[key] = (sq_error / variance, l0_sum / tokens)
    return result


def setting_replicates(
    cells: dict[tuple, tuple[np.ndarray, np.ndarray]], rng: np.random.Generator
) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Per setting (``CELL_KEY`` without seed): (nmse_b, l0_b), the mean over S seeds drawn
    with replacement in each replicate of its cells' replicate values (module docstring)."""
    by_setting: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
    for key, values in cells.items():
        by_setting.setdefault(key[:-1], []).append(values)
    result = {}
    for key, members in by_setting.items():
        nmse = np.stack([m[0] for m in members])  # (S, replicates)
        l0 = np.stack([m[1] for m in members])
        seeds, replicates = nmse.shape
        if seeds > 1:
            chosen = rng.integers(seeds, size=(seeds, replicates))
            columns = np.arange(replicates)
            nmse, l0 = nmse[chosen, columns], l0[chosen, columns]
        result[key] = (nmse.mean(axis=0), l0.mean(axis=0))
    return result


def site_replicates(windows: pd.DataFrame, site: str, replicates: int, seed: int) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Per setting of ``site``: its test (nmse_b, l0_b) over ``replicates`` replicates, seeded."""
    rng = np.random.default_rng(seed)
    test = windows[(windows["site"] == site) & (windows["part"] == TEST)]
    window_ids = np.sort(test["window"].unique())
    draws = window_draws(window_ids, replicates, rng)
    return setting_replicates(cell_replicates(test, draws, window_ids), rng)
