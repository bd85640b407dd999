"""The compute-efficient frontier (Gao et al. 2024, Fig. 1): held-out loss against training
compute, the best over dictionary sizes.

Points: every row of the training logs with a held-out normalised MSE (the trainer's
held-out curve) is a point (C, L) of its cell, with the training compute

    C = the log's ``flops``: Σ over the steps so far of each step's FLOPs (``sae.flops``:
        the architecture's step as it runs, e.g. TopK's dense encoder and sparse decode)

Logs written before the trainer counted FLOPs have no ``flops`` column and give no points.
Frontier: per (site, arch, curve), the points that no point at
smaller or equal C beats, i.e. with L below the L of every point of lower C (the lower
envelope of the (C, L) cloud). Law: ``scaling.fit_pair`` fits L(C) = a·C^(−b) and
L(C) = a·C^(−b) + c to the frontier points, with 95% intervals, and compares them by leave-one-out prediction error.

Points taken before the end of a run lie above what a run with that budget would reach: the
learning rate decays over the last ``train.lr.decay_fraction`` of a run's own budget, so a
point at half the budget has not had its decay. The frontier built from them is therefore
conservative except at each run's last point.
"""

from __future__ import annotations

import pandas as pd

from saesweep.analysis.envelope import lower_envelope
from saesweep.analysis.scaling import fit_pair

FLOPS = "Σ over steps of each step's FLOPs, sae/flops.py"
GROUP = ["site", "arch", "curve"]
MIN_SIZES = 3  # a frontier over fewer dictionary sizes says little about the best n


def compute_points(logs: pd.DataFrame) -> pd.DataFrame:
    """(site, arch, curve, n_latents, seed, tokens, compute, loss) for every held-out point
    of the training logs (the concatenated ``train_logs.parquet``)."""
    if "heldout_nmse" not in logs.columns or "flops" not in logs.columns:
        return pd.DataFrame(columns=[*GROUP, "n_latents", "seed", "tokens", "compute", "loss"])
    rows = logs[logs["heldout_nmse"].notna()]
    return pd.DataFrame({
        **{column: rows[column] for column in [*GROUP, "n_latents", "seed", "tokens"]},
        "compute": rows["flops"].astype(float),
        "loss": rows["heldout_nmse"],
    }).reset_index(drop=True)


def frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The points of one group that no point at smaller or equal compute beats (see the module
    docstring), in increasing compute."""
    return lower_envelope(points, "compute", "loss")


def fit_compute_frontiers(logs: pd.DataFrame, bootstrap: int, seed: int = 0) -> dict:
    """Per (site, arch, curve) with at least ``MIN_SIZES`` dictionary sizes: its frontier
    points and the laws in C fitted to them (``scaling.fit_pair``)."""
    points = compute_points(logs)
    groups = []
    for (site, arch, curve), group in points.groupby(GROUP):
        if group["n_latents"].nunique() < MIN_SIZES:
            continue
        edge = frontier(group)
        groups.append({
            "site": site, "arch": arch, "curve": curve,
            "frontier": [
                {"compute": float(c), "loss": float(l), "n_latents": int(n), "tokens": int(t)}
                for c, l, n, t in edge[["compute", "loss", "n_latents", "tokens"]].itertuples(index=False)
            ],
            "laws": fit_pair("C", edge["compute"].round().to_numpy(), edge["loss"].to_numpy(), bootstrap, seed, site, arch, curve),
        })
    return {"flops": FLOPS, "min_sizes": MIN_SIZES, "groups": groups}
