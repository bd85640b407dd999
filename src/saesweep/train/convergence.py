"""Ending a cell when its held-out loss has converged (config key ``train.budget``).

With ``train.budget.mode: converge`` a cell's token budget T (``train.tokens``) is a cap; the
cell ends at the first held-out point that meets the criterion below, or at T.

Held-out points: W per doubling of tokens (W = ``train.budget.window``) over the last
P − 1 doublings before T (P = ``train.heldout.points``),

    t_j = ⌈T · 2^(−j/W)⌉,   j = W·(P − 1) … 0,

taken, as every held-out point, after the first step at or past t_j (``heldout_grid``).

Criterion at the i-th point (tokens t_i, held-out normalised MSE L_i), i ≥ W:

    converged(i)  ⇔  t_i ≥ t_min  and  (L_{i−W} − L_i) / L_{i−W} < ε,

ε = ``train.budget.eps``, t_min = ``train.budget.min_tokens``: the held-out loss fell by
less than a fraction ε over the last doubling of tokens (t_{i−W} ≈ t_i / 2), or rose. The
run stops at the first such point; where none comes, the cap T ends it (``converged`` is
then false). For a curve L(t) = L∞ + A·t^(−α) the fall over the doubling from s = t/2 to t
is (1 − 2^(−α))·A·s^(−α) / L(s), so the criterion stops once the reducible share A·s^(−α) / L(s)
of the loss at s is below ε / (1 − 2^(−α)): a rule with no scale in t, so the tokens it takes
can be compared across dictionary sizes (``analysis.convergence_fits``).

Learning rate: converge mode needs a constant rate after warm-up (``train.lr.decay: none``,
checked by ``plan.config``): a decay needs the run's end, which is not known in advance. Each
held-out point of such a run is then exactly the end of a run with that many tokens (the
batches depend only on the seed, ``data.loader``), so mid-run points are runs of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from saesweep.core.job_settings import ConvergenceSettings

LOSS = "heldout_nmse"
"""The column of the training log the criterion reads."""


def heldout_grid(cap: int, points: int, rule: ConvergenceSettings) -> list[int]:
    """The token counts t_j = ⌈T·2^(−j/W)⌉, j = W·(P − 1) … 0, of the held-out curve
    (increasing, distinct)."""
    per_doubling = rule.window
    if points == 0:
        return []
    return sorted({max(1, math.ceil(cap / 2 ** (j / per_doubling))) for j in range(per_doubling * (points - 1) + 1)})


def converged(tokens: Sequence[int], losses: Sequence[float], rule: ConvergenceSettings) -> bool:
    """Whether the criterion of the module docstring holds at the last point of the held-out
    curve (tokens, losses) so far."""
    i, window = len(losses) - 1, rule.window
    if i < window or tokens[i] < rule.min_tokens:
        return False
    before = losses[i - window]
    return (before - losses[i]) / before < rule.eps


def stop_index(tokens: Sequence[int], losses: Sequence[float], rule: ConvergenceSettings, cap: int) -> tuple[int, bool]:
    """Where a run with this held-out curve ends: (index of its last point, whether the
    criterion ended it). The first point meeting the criterion; else the first point at or past
    the cap T (the last point when the curve stops short of T, as a curve so far does)."""
    for i in range(len(losses)):
        if converged(tokens[: i + 1], losses[: i + 1], rule):
            return i, True
        if tokens[i] >= cap:
            return i, False
    return len(losses) - 1, False


def curve(log_rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """The held-out curve (tokens, losses) of a training log's rows so far."""
    rows = [row for row in log_rows if row.get(LOSS) is not None]
    return [int(row["tokens"]) for row in rows], [float(row[LOSS]) for row in rows]


def outcome(log_rows: list[dict[str, Any]], rule: ConvergenceSettings | None, cap: int) -> dict[str, Any]:
    """The training facts of ``cfg.json`` about the budget: ``budget`` (fixed or converge),
    ``converged`` (whether the criterion ended the run; None for a fixed budget) and
    ``tokens_to_converge`` (the tokens at the point where it did; None otherwise)."""
    if rule is None:
        return {"budget": "fixed", "converged": None, "tokens_to_converge": None}
    tokens, losses = curve(log_rows)
    if not losses:
        return {"budget": "converge", "converged": False, "tokens_to_converge": None}
    index, done = stop_index(tokens, losses, rule, cap)
    return {"budget": "converge", "converged": done, "tokens_to_converge": tokens[index] if done else None}
