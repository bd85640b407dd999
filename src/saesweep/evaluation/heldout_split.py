"""The reconstruction metrics that the architecture comparison uses (normalised MSE and L0)
on two disjoint parts of the evaluated held-out tokens, with per-window sums so that
analysis can resample them (``analysis.compare``).

Unit: the window. The held-out activations are stored window by window, ``context −
skip_positions`` kept positions each, in extraction order; token i of the evaluated tokens
belongs to window ⌊i / (context − skip_positions)⌋ (the last one may be partial). The tokens
of one window share their context, so their errors are correlated: a window, not a token,
is the unit that is resampled (a token-level bootstrap would treat 127 correlated errors as
127 independent ones and give intervals too narrow).

Parts: window w is in ``validation`` when w is even and in ``test`` when w is odd. The
comparison chooses each architecture's settings on validation and reports test values.
Interleaving gives both parts text from the same speeches (contiguous halves of 64 windows
would put different speeches in each, a shift between selection and report).

Per window w of a part the statistics are

    tokens_w   = #tokens of w
    sq_error_w = Σ_{i∈w} ‖x̂_i − x_i‖²
    variance_w = Σ_{i∈w} ‖x_i − x̄_part‖²,  x̄_part the mean of x over the part's tokens
    l0_sum_w   = Σ_{i∈w} #{j : z_ij > 0}

(x the normalised inputs, as ``metrics.ReconstructionAccumulator``), and the part's metrics

    nmse = Σ_w sq_error_w / Σ_w variance_w,   l0 = Σ_w l0_sum_w / Σ_w tokens_w,

equal to ``ReconstructionAccumulator``'s on the part's tokens alone. x̄_part is kept fixed
when windows are resampled (a bias of order 1/#tokens in the denominator).
"""

from __future__ import annotations

from typing import Any

import torch

from saesweep.core.split import PARTS, UNIT, WINDOWS_KEY
from saesweep.sae.base import SparseAutoencoder


def tokens_per_window(manifest: dict[str, Any]) -> int:
    """Kept positions of one stored window: ``context − skip_positions`` of the shards' manifest."""
    return int(manifest["context"]) - int(manifest["skip_positions"])


def part_of_window(window: torch.Tensor) -> torch.Tensor:
    """The index into ``PARTS`` of each window: 0 (validation) for even w, 1 (test) for odd w."""
    return window % 2


@torch.no_grad()
def split_metrics(
    sae: SparseAutoencoder, activations: torch.Tensor, window_tokens: int, batch_size: int
) -> dict[str, Any]:
    """``{"validation": {nmse, l0, tokens}, "test": {…}, "heldout_windows": {unit,
    tokens_per_window, validation: {window, tokens, sq_error, variance, l0_sum}, test: {…}}}``
    of the SAE on ``activations`` (T, d), in batches of ``batch_size`` tokens; every sum in
    float64 on the activations' device (module docstring)."""
    device = activations.device
    n_windows = -(-len(activations) // window_tokens)
    sums = {
        name: torch.zeros(n_windows, dtype=torch.float64, device=device)
        for name in ("tokens", "sq_error", "square", "l0_sum")
    }
    x_sum = torch.zeros(n_windows, activations.shape[1], dtype=torch.float64, device=device)
    for start in range(0, len(activations), batch_size):
        x = sae.normalise(activations[start : start + batch_size])
        window = torch.arange(start, start + len(x), device=device) // window_tokens
        codes = sae.sparse_codes(sae.pre_activations(x))
        x64 = x.double()
        rows = torch.repeat_interleave(torch.arange(len(x), device=device), codes.crow_indices().diff())
        fired = torch.zeros(len(x), dtype=torch.float64, device=device).index_add_(
            0, rows, (codes.values() > 0).double()
        )
        sums["tokens"].index_add_(0, window, torch.ones_like(x64[:, 0]))
        sums["sq_error"].index_add_(0, window, (sae.decode(codes).double() - x64).pow(2).sum(dim=1))
        sums["square"].index_add_(0, window, x64.pow(2).sum(dim=1))
        sums["l0_sum"].index_add_(0, window, fired)
        x_sum.index_add_(0, window, x64)
    windows = torch.arange(n_windows, device=device)
    part = part_of_window(windows)
    result: dict[str, Any] = {WINDOWS_KEY: {"unit": UNIT, "tokens_per_window": window_tokens}}
    for index, name in enumerate(PARTS):
        chosen = part == index
        tokens = sums["tokens"][chosen]
        mean = x_sum[chosen].sum(dim=0) / tokens.sum()
        # Σ‖x − x̄‖² = Σ‖x‖² − 2 x̄·Σx + N‖x̄‖², per window
        variance = sums["square"][chosen] - 2 * x_sum[chosen] @ mean + tokens * mean.pow(2).sum()
        columns = {"tokens": tokens, "sq_error": sums["sq_error"][chosen], "variance": variance, "l0_sum": sums["l0_sum"][chosen]}
        result[name] = {
            "nmse": (columns["sq_error"].sum() / columns["variance"].sum()).item(),
            "l0": (columns["l0_sum"].sum() / tokens.sum()).item(),
            "tokens": int(tokens.sum().item()),
        }
        result[WINDOWS_KEY][name] = {
            "window": windows[chosen].tolist(),
            **{key: column.tolist() for key, column in columns.items()},
        }
    return result
