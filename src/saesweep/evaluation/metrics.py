"""Metric definitions for evaluating SAEs: pure functions, one formula each.

Tensors go in; Python floats (or small tensors) come out. Large sums accumulate in
float64. A ratio whose denominator is zero is returned as ``nan`` (a plain float, no
warning or exception): callers can test it with ``math.isnan``.

Notation: x (N, d) are the (normalised) inputs of the SAE, x̂ its reconstructions,
x̄ the per-dimension mean of the evaluated x, z the latent codes. Sparse codes come as
``(indices, values)`` of their stored entries (e.g. a CSR code tensor's column indices and
values, or top-k pairs (N, k)); a dense code matrix (N, n) may be given instead as
``values`` with ``indices=None``.
Cross-entropies and entropies are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn import functional as F

NAN = float("nan")
DEAD_THRESHOLD = 1e-3


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or nan when the denominator is 0 (or not finite)."""
    if denominator == 0 or not math.isfinite(denominator):
        return NAN
    return numerator / denominator


# ----------------------------------------------------------------------------------
# Reconstruction


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained on one batch:
    FVU = Σ_i ‖x̂_i − x_i‖² / Σ_i ‖x_i − x̄‖², x̄ = per-dimension mean of this batch.

    The variance is taken around the mean, not around zero. nan if all x are equal."""
    x64, x_hat64 = x.double(), x_hat.double()
    error = (x_hat64 - x64).pow(2).sum().item()
    variance = (x64 - x64.mean(dim=0)).pow(2).sum().item()
    return _ratio(error, variance)


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean over tokens of cos(x_i, x̂_i) = x_i·x̂_i / max(‖x_i‖‖x̂_i‖, eps)."""
    return (_cosine_sum(x, x_hat, eps).item() / x.shape[0]) if x.shape[0] else NAN


def _cosine_sum(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Σ_i cos(x_i, x̂_i), a float64 scalar tensor on the inputs' device."""
    x64, x_hat64 = x.double(), x_hat.double()
    norms = (x64.norm(dim=1) * x_hat64.norm(dim=1)).clamp_min(eps)
    return ((x64 * x_hat64).sum(dim=1) / norms).sum()


def l0(values: torch.Tensor) -> float:
    """L0 = mean over tokens of #{j : z_j > 0}; ``values`` is (N, k) top-k values or a
    dense (N, n) code matrix (the count is the same). Equals k for TopK unless some of
    the k largest pre-activations are ≤ 0."""
    return (values > 0).sum().item() / values.shape[0] if values.shape[0] else NAN


def fired_counts(
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
    n_latents: int | None = None,
    threshold: float = DEAD_THRESHOLD,
) -> torch.Tensor:
    """c_j = #{tokens i : z_ij > threshold}, an int64 tensor of shape (n_latents,) on the
    device of ``values``.

    With ``indices``, ``values`` are the stored entries' values of the same shape (top-k
    pairs (N, k), or a CSR tensor's flat column indices and values) and ``n_latents`` is
    required; with ``indices=None``, ``values`` is the dense (N, n) code matrix."""
    fired = values > threshold
    if indices is None:
        return fired.sum(dim=0, dtype=torch.int64)
    if n_latents is None:
        raise ValueError("n_latents is required with top-k indices")
    counts = torch.zeros(n_latents, dtype=torch.int64, device=values.device)
    return counts.index_add_(0, indices.flatten(), fired.flatten().long())


def dead_fraction(counts: torch.Tensor) -> float:
    """Dead fraction = #{j : c_j = 0} / n, with c = ``fired_counts`` over all evaluated
    tokens (a latent is dead if it never exceeds the threshold, 1e-3 by default)."""
    return (counts == 0).double().mean().item() if counts.numel() else NAN


class FiringHistogram(NamedTuple):
    """Histogram of log10 firing frequencies of the live latents."""

    edges: torch.Tensor  # (bins + 1,) float64, log10 frequency
    counts: torch.Tensor  # (bins,) int64, live latents per bin
    n_dead: int  # latents with c_j = 0, not in any bin


def firing_histogram(
    counts: torch.Tensor, n_tokens: int, bins: int = 40, log10_min: float | None = None
) -> FiringHistogram:
    """Histogram of log10 f_j over live latents, f_j = c_j / n_tokens ∈ (0, 1].

    ``bins`` equal-width bins span [log10_min, 0]; log10_min defaults to
    log10(1 / n_tokens), the lowest non-zero frequency (pass a fixed value to compare
    runs). Frequencies below log10_min fall into the first bin. Dead latents (c_j = 0)
    are counted in ``n_dead`` only."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    lo = -math.log10(n_tokens) if log10_min is None else float(log10_min)
    if lo >= 0:
        lo = -1.0  # a single token: every live latent has frequency 1
    live = counts[counts > 0].double()
    log_freq = (live / n_tokens).log10().clamp(lo, 0.0)
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64, device=counts.device)
    which = torch.bucketize(log_freq, edges[1:-1], right=True)
    binned = torch.bincount(which, minlength=bins).to(torch.int64)
    return FiringHistogram(edges, binned, int((counts == 0).sum().item()))


class ReconstructionAccumulator:
    """Streams reconstruction metrics over many batches.

    Keeps, in float64: N (tokens), the per-dimension running mean and sum of squared
    deviations of x (merged batch by batch with Chan's parallel formula, so that
    Σ_i ‖x_i − x̄‖² needs no second pass), Σ‖x̂ − x‖², Σ cos(x, x̂); and, when codes are
    given, Σ L0 and the per-latent ``fired_counts``. The sums stay tensors on the inputs'
    device (``update`` never copies to the host); ``result()`` then gives

        normalised_mse    = Σ‖x̂ − x‖² / Σ‖x − x̄‖²   (x̄ over all evaluated tokens)
        mse               = Σ‖x̂ − x‖² / (N·d)
        cosine_similarity = mean over tokens of cos(x, x̂)
        l0                = mean over tokens of #{z_j > 0}
        dead_fraction     = #{j : no token with z_j > dead_threshold} / n_latents

    equal to the batch functions on the concatenation of all batches.
    """

    def __init__(self, n_latents: int | None = None, dead_threshold: float = DEAD_THRESHOLD) -> None:
        self.n_latents = n_latents
        self.dead_threshold = dead_threshold
        self.n_tokens = 0
        self.n_coded = 0  # tokens whose codes were given
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        # float64 / int64 scalars and the (n,) counts, made on the first batch's device
        self.sq_error: torch.Tensor | None = None
        self.cos_sum: torch.Tensor | None = None
        self.l0_sum: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        indices: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: x, x̂ of shape (B, d); optional codes: the (indices, values) of their
        stored entries, e.g. of the CSR codes of ``SparseAutoencoder.encode`` (or ``values``
        dense (B, n) with ``indices=None``)."""
        if x.shape != x_hat.shape or x.dim() != 2:
            raise ValueError(f"x and x_hat must both be (B, d), got {tuple(x.shape)}, {tuple(x_hat.shape)}")
        b = x.shape[0]
        if b == 0:
            return
        x64 = x.detach().double()
        batch_mean = x64.mean(dim=0)
        batch_m2 = (x64 - batch_mean).pow(2).sum(dim=0)
        if self.mean is None:
            self.mean, self.m2 = batch_mean, batch_m2
            self.sq_error = torch.zeros((), dtype=torch.float64, device=x.device)
            self.cos_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        else:
            total = self.n_tokens + b
            delta = batch_mean - self.mean
            self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.n_tokens * b / total)
            self.mean = self.mean + delta * (b / total)
        self.n_tokens += b
        self.sq_error += (x_hat.detach().double() - x64).pow(2).sum()
        self.cos_sum += _cosine_sum(x.detach(), x_hat.detach())
        if values is not None:
            values = values.detach()
            if indices is None and self.n_latents is None:
                self.n_latents = values.shape[1]
            if self.n_latents is None:
                raise ValueError("pass n_latents to the accumulator to count firing of top-k codes")
            counts = fired_counts(values, indices, self.n_latents, self.dead_threshold)
            fired = (values > 0).sum(dtype=torch.int64)
            self.counts = counts if self.counts is None else self.counts + counts
            self.l0_sum = fired if self.l0_sum is None else self.l0_sum + fired
            self.n_coded += b

    def result(self) -> dict[str, float]:
        """The metrics over everything seen so far (l0, dead_fraction only if codes were given)."""
        out: dict[str, float] = {"n_tokens": float(self.n_tokens)}
        if self.n_tokens == 0 or self.m2 is None:
            return out | {"normalised_mse": NAN, "mse": NAN, "cosine_similarity": NAN}
        sq_error = self.sq_error.item()
        out["normalised_mse"] = _ratio(sq_error, self.m2.sum().item())
        out["mse"] = sq_error / (self.n_tokens * self.m2.numel())
        out["cosine_similarity"] = self.cos_sum.item() / self.n_tokens
        if self.n_coded:
            out["l0"] = self.l0_sum.item() / self.n_coded
            out["dead_fraction"] = dead_fraction(self.counts)
        return out

    def histogram(self, bins: int = 40, log10_min: float | None = None) -> FiringHistogram:
        """``firing_histogram`` of the accumulated fired counts."""
        if self.counts is None:
            raise ValueError("no latent codes were given to update()")
        return firing_histogram(self.counts, self.n_coded, bins, log10_min)


# ----------------------------------------------------------------------------------
# Downstream (language-model) metrics


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 when splicing in the
    SAE costs nothing, 0 when it is as bad as zero-ablating the site. nan if CE_zero = CE_clean."""
    return _ratio(ce_zero - ce_sae, ce_zero - ce_clean)


def kl_score(kl_sae: float, kl_zero: float) -> float:
    """KL score = (KL_zero − KL_sae) / KL_zero, KLs of next-token distributions vs the clean
    model. nan if KL_zero = 0."""
    return _ratio(kl_zero - kl_sae, kl_zero)


def _positions(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.bool()


def masked_log_probs(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits[t]) (float32) at the positions t with mask[t], in row-major order:
    shape (P, V) for logits (..., T, V) and mask (..., T) bool (None = all positions)."""
    keep = _positions(mask, logits.shape[:-1]).to(logits.device)
    return F.log_softmax(logits[keep].float(), dim=-1)


def next_token_ce_sum_of_log_probs(
    log_probs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """``next_token_ce_sum`` from ``masked_log_probs(logits, mask)``: the positions t < T−1
    among the masked ones, each scored on tokens[t+1]."""
    keep = _positions(mask, tokens.shape)
    has_target = torch.zeros_like(keep)
    has_target[..., :-1] = True
    targets = torch.zeros_like(tokens)
    targets[..., :-1] = tokens[..., 1:]
    scored = has_target[keep].to(log_probs.device)
    picked = log_probs[scored].gather(-1, targets[keep].to(log_probs.device)[scored][:, None]).squeeze(-1)
    return -picked.double().sum().item(), int(scored.sum().item())


def next_token_ce_sum(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """(Σ_t −log softmax(logits[t])[tokens[t+1]], count) over positions t < T−1 with mask[t].

    logits (..., T, V), tokens (..., T), mask (..., T) bool over logit positions t (None =
    all); the last position has no target and never counts. Sums over batches then
    divide, to average over a stream."""
    keep = _positions(mask, tokens.shape).clone()
    keep[..., -1] = False
    return next_token_ce_sum_of_log_probs(masked_log_probs(logits, keep), tokens, keep)


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean CE (nats) of predicting tokens[t+1] from logits[t] over positions t where mask[t]
    (see ``next_token_ce_sum``); nan if no position counts."""
    total, count = next_token_ce_sum(logits, tokens, mask)
    return _ratio(total, count)


def kl_sum_of_log_probs(log_probs_ref: torch.Tensor, log_probs: torch.Tensor) -> tuple[float, int]:
    """(Σ_t KL(p_ref,t ‖ p_t), count) for log-probabilities (P, V) of the same P positions:
    KL(p_ref ‖ p) = Σ_v p_ref(v) (log p_ref(v) − log p(v))."""
    if log_probs_ref.shape != log_probs.shape:
        raise ValueError(f"log-probability shapes differ: {tuple(log_probs_ref.shape)} vs {tuple(log_probs.shape)}")
    kl = (log_probs_ref.exp() * (log_probs_ref - log_probs)).sum(dim=-1)
    return kl.double().sum().item(), log_probs.shape[0]


def next_token_kl_sum(
    logits_ref: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """(Σ_t KL(p_ref,t ‖ p_t), count) over positions t with mask[t], where
    KL(p_ref ‖ p) = Σ_v p_ref(v) (log p_ref(v) − log p(v)), p = softmax(logits[t]).

    logits_ref, logits (..., T, V); mask (..., T) bool (None = all positions, the last
    included: no target is needed)."""
    if logits_ref.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_ref.shape)} vs {tuple(logits.shape)}")
    return kl_sum_of_log_probs(masked_log_probs(logits_ref, mask), masked_log_probs(logits, mask))


def next_token_kl(logits_ref: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over masked positions of KL(p_ref ‖ p) (see ``next_token_kl_sum``); nan if none."""
    total, count = next_token_kl_sum(logits_ref, logits, mask)
    return _ratio(total, count)


def ablation_sparsity(delta_logits: torch.Tensor) -> float:
    """Downstream sparsity of ablating one latent at one token, for the logit changes Δ (T, V)
    at that token and the T − 1 after it (Gao et al. 2024, §4.5): with each position's
    median change over the vocabulary subtracted, Δ'_tv = Δ_tv − median_v Δ_tv (a shift of
    all logits changes no probability),

        (‖Δ'‖₁ / ‖Δ'‖₂)² / (V·T),   norms over all T·V entries.

    In [1/(V·T), 1]: 1/(V·T) when one logit moves, 1 when all move alike (after the
    median); lower = sparser. nan if Δ' = 0."""
    d = delta_logits - delta_logits.median(dim=-1, keepdim=True).values
    d = d.double()
    l1, l2sq = d.abs().sum().item(), d.pow(2).sum().item()
    return _ratio(l1 * l1, l2sq) / d.numel() if d.numel() else NAN


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error s/√m) of the finite values among ``values``, s the sample
    standard deviation (ddof 1), over the m finite values: the 95 % interval of a metric
    averaged over m sampled latents or tasks is mean ± t_{m−1}(0.975)·SE, on m − 1 degrees of
    freedom (``core.stats.t_quantile(m − 1)``; m is stored beside the SE as ``{name}_count``,
    and ``analysis.intervals`` combines it with the seeds). nan for the mean without values,
    for the SE below 2."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return NAN, NAN
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, NAN
    variance = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(variance / len(finite))
