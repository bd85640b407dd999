"""When things happen while a cell trains: the learning rate at each token and the token
counts of the held-out curve.

Learning rate at token t with peak lr, warm-up W and decay over the last fraction f of a
budget T:

    lr(t) = lr · min(1, t / W) · decay(t),   decay(t) = 1 before (1 − f)·T, then falls
    linearly (or as a half cosine) to 0 at T.

Every batch is whole (``data.loader``): a budget T that is not a multiple of the batch size
B trains to T_end = ⌊T / B⌋·B tokens and drops the rest.

The held-out curve: after the first step at or past each of the token counts
B·⌈S^(j/(P−1))⌉, j = 0 … P − 1, S = T_end / B steps, P = ``heldout.points`` (log-spaced from
the first step to the last, rounded up to whole steps), so that a sweep gives L(n, tokens)
for the compute frontier. Points before the learning-rate decay are not what a run with that
budget would reach (its decay would come earlier), so they lie above it. With
``train.budget`` converge, T is a cap and the curve has W points per doubling of T_end
(``train.convergence``).
"""

from __future__ import annotations

import math

from saesweep.core.job_settings import TrainSettings
from saesweep.data.loader import whole_batches_end
from saesweep.train import convergence


def lr_at(settings: TrainSettings, tokens: int) -> float:
    """The learning rate after ``tokens`` training tokens (see the module docstring)."""
    peak, budget = settings.lr, settings.tokens
    warmup = settings.warmup_tokens
    factor = min(1.0, tokens / warmup) if warmup > 0 else 1.0
    decay_start = (1 - settings.decay_fraction) * budget
    if settings.decay != "none" and tokens > decay_start and budget > decay_start:
        progress = (tokens - decay_start) / (budget - decay_start)
        factor *= 1 - progress if settings.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return peak * factor


def heldout_points(settings: TrainSettings) -> list[int]:
    """The token counts of the held-out curve (increasing, distinct). A fixed budget:
    B·⌈S^(j/(P−1))⌉, j = 0 … P − 1, log-evenly spaced whole steps (fewer than P when S < P),
    S = T_end / B whole steps; P = 1: T_end alone. ``train.budget`` converge: W points per
    doubling of the cap's whole batches T_end (``convergence.heldout_grid``)."""
    batch, points = settings.batch_size, settings.heldout.points
    end = whole_batches_end(0, settings.tokens, batch)
    if settings.convergence:
        return convergence.heldout_grid(end, points, settings.convergence)
    steps = end // batch
    if points <= 1:
        return [steps * batch] if points else []
    return sorted({batch * min(steps, math.ceil(steps ** (j / (points - 1)) - 1e-9)) for j in range(points)})
