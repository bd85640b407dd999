"""The lower envelope (Pareto front) of a cloud of (cost, loss) points: the points that no
point of smaller or equal cost beats.

A point (x_i, y_i) is on the envelope when y_i < min{y_j : x_j < x_i, or x_j = x_i and j
comes first in the order (x, y)}: sorted by x (ties by y), the points whose y is below every
y before them. Used for the compute frontier (x = training FLOPs, y = held-out loss) and for
an architecture's sparsity frontier (x = L0, y = normalised MSE) over its settings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def lower_envelope(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows of ``points`` on the lower envelope of (``x``, ``y``) (module docstring), in
    increasing ``x``, with a fresh index."""
    ordered = points.sort_values([x, y], kind="stable")
    best_before = ordered[y].cummin().shift(fill_value=np.inf)
    return ordered[ordered[y] < best_before].reset_index(drop=True)
