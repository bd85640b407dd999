"""Coverage of the architecture comparison's 95 % window-bootstrap interval on planted tables.

Each planted table is one cell's test part: W windows with variance_w ~ Gamma(4, 25) and
sq_error_w = 0.2 · variance_w · g_w, g_w ~ Gamma(5, 0.2) (mean 1), so the true ratio
Σ E[sq_error] / Σ variance is 0.2. ``analysis.window_bootstrap.site_replicates`` resamples
the windows; the interval is the 2.5–97.5 % percentile of its replicates. Prints, per W,
the share of tables whose interval holds 0.2, with its binomial standard error.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_window_bootstrap.py --tables 1000 --replicates 400
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from saesweep.analysis.window_bootstrap import site_replicates
from saesweep.core.split import TEST
from saesweep.core.stats import TAILS_PERCENT

TRUE_RATIO = 0.2


def coverage(windows: int, tables: int, replicates: int, seed: int) -> float:
    """The share of ``tables`` planted tables of ``windows`` windows whose interval holds the ratio."""
    rng = np.random.default_rng(seed)
    covered = 0
    for table in range(tables):
        variance = rng.gamma(4.0, 25.0, windows)
        frame = pd.DataFrame({
            "site": "s", "arch": "a", "setting": "a-k8", "n_latents": 64, "seed": 0, "part": TEST,
            "window": np.arange(windows), "tokens": 127, "variance": variance,
            "sq_error": TRUE_RATIO * variance * rng.gamma(5.0, 0.2, windows), "l0_sum": 8.0 * 127,
        })
        nmse, _ = site_replicates(frame, "s", replicates, table)[("s", "a", "a-k8", 64)]
        lo, hi = np.percentile(nmse, TAILS_PERCENT)
        covered += lo <= TRUE_RATIO <= hi
    return covered / tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    print("windows  coverage  (binomial s.e.)")
    for windows in args.windows:
        share = coverage(windows, args.tables, args.replicates, args.seed)
        print(f"{windows:7d}  {share:8.3f}  ({math.sqrt(share * (1 - share) / args.tables):.3f})")


if __name__ == "__main__":
    main()
