"""Ablation sparsity as Gao et al. 2024 define it (§4.5): at a token, each active latent of
the SAE's code is ablated in turn, and the sparsity of the change it makes to the logits of
that token and the following ones is averaged.

For a sampled token at position p of a held-out window (p ≥ max(skip, 1), p + T ≤ C) with
active latents S = {j : z_j > 0} of the code of its activation, the site's output is the SAE
reconstruction â at every kept position, and for latent j ∈ S the ablated forward also
removes j at p: â_p − z_j · s · D_j (s the SAE's activation scale). With ℓ the logits of the
unablated and ℓ^(j) of the ablated forward at the T positions p … p + T − 1 (the token's own
next-token prediction and the T − 1 after it; T = ``ABLATION_TOKENS`` = 16, fixed),

    Δ^(j) = ℓ^(j) − ℓ  (T, V),    s_j = (‖Δ'‖₁ / ‖Δ'‖₂)² / (V·T)   (``metrics.ablation_sparsity``,
                                                               Δ' = Δ minus each position's median),
    token score = (1 / |S|) Σ_{j∈S} s_j,     ablation_sparsity = mean of the token scores

over the sampled tokens with an active latent (tokens weighted equally, the active latents
of a token equally: every (token, active latent) pair of a token counts 1/|S|), with its
standard error over the tokens. Lower is sparser.

With a cap m > 0 (``evaluate.ablation_latents``), a token with more than m active latents
has m of them ablated, drawn uniformly without replacement (seeded): the token score is then
the mean over a uniform sample of S, an unbiased estimate of the mean over all of S, at m/|S|
of the cost. m = 0 ablates every active latent (the paper's definition).

Cost: the prefix before p is run once per token (its key/value cache is reused); the T
positions from p are run for 1 + |S| sequences, ``batch`` at a time. Logits held: batch · T · V
float32.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from saesweep.data.lm import spliced
from saesweep.evaluation.metrics import ablation_sparsity, mean_and_standard_error
from saesweep.evaluation.splice import reconstructor
from saesweep.sae.base import SparseAutoencoder

ABLATION_TOKENS = 16
"""T: the positions whose logits an ablation is measured at (the token's and the 15 after it)."""


def eligible_positions(context: int, skip: int) -> range:
    """Positions p of a window of ``context`` tokens an ablation can be measured from: kept
    (p ≥ skip), with a prefix to cache (p ≥ 1) and T positions left (p + T ≤ context)."""
    return range(max(skip, 1), context - ABLATION_TOKENS + 1)


def sample_tokens(windows: int, context: int, skip: int, count: int, seed: int) -> list[tuple[int, int]]:
    """A seeded sample (CPU generator) of up to ``count`` distinct (window, position) pairs among
    the ``eligible_positions`` of ``windows`` windows, in increasing order."""
    positions = eligible_positions(context, skip)
    total = windows * len(positions)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return [(int(i) // len(positions), positions[int(i) % len(positions)]) for i in order]


@torch.no_grad()
def token_ablation_scores(
    sae: SparseAutoencoder, lm: torch.nn.Module, site: str, window: torch.Tensor, skip: int, position: int, batch: int,
    cap: int = 0, generator: torch.Generator | None = None,
) -> tuple[list[int], list[float]]:
    """(ablated latents, s_j for each) of the token at ``position`` of ``window`` (C,) token
    ids: every active latent, or ``cap`` of them drawn with ``generator`` (CPU) when more are
    active and cap > 0 (module docstring)."""
    reconstruct = reconstructor(sae)
    captured: list[torch.Tensor] = []

    def prefix_replace(output: torch.Tensor) -> torch.Tensor:
        if output.shape[1] > skip:
            output = output.clone()
            output[:, skip:] = reconstruct(output[:, skip:].float()).to(output.dtype)
        return output

    with spliced(lm, site, prefix_replace):
        cache = lm(input_ids=window[None, :position], use_cache=True).past_key_values
    end = position + ABLATION_TOKENS
    ids = window[position:end]

    def capture(output: torch.Tensor) -> torch.Tensor:
        captured.append(output[0, 0].float())
        return output

    with spliced(lm, site, capture):  # the site's clean output at p (upstream splices do not reach it)
        lm(input_ids=ids[None, :1], past_key_values=copy.deepcopy(cache), use_cache=True)
    codes = sae.encode(sae.normalise(captured[0][None])).to_sparse_coo()
    active = codes.values() > 0
    latents, values = codes.indices()[1][active], codes.values()[active]
    if len(latents) == 0:
        return [], []
    if 0 < cap < len(latents):
        keep = torch.randperm(len(latents), generator=generator)[:cap].sort().values.to(latents.device)
        latents, values = latents[keep], values[keep]
    removed = torch.cat([torch.zeros(1, sae.W_dec.shape[1], device=values.device),
                         values[:, None] * sae.W_dec[latents] * sae.act_scale])  # row 0: unablated

    def logits_of(rows: torch.Tensor) -> torch.Tensor:
        def replace(output: torch.Tensor) -> torch.Tensor:
            out = reconstruct(output.float())
            out[:, 0] -= rows
            return out.to(output.dtype)

        part_cache = copy.deepcopy(cache)
        part_cache.batch_repeat_interleave(len(rows))
        with spliced(lm, site, replace):
            return lm(input_ids=ids.expand(len(rows), -1), past_key_values=part_cache, use_cache=True).logits.float()

    base = logits_of(removed[:1])[0]
    scores: list[float] = []
    for start in range(1, len(removed), batch):
        for delta in logits_of(removed[start : start + batch]) - base:
            scores.append(ablation_sparsity(delta))
    return latents.tolist(), scores


def ablation_metrics(
    sae: SparseAutoencoder, lm: torch.nn.Module, site: str, windows: torch.Tensor, skip: int, tokens: int, batch: int,
    seed: int, cap: int = 0,
) -> dict[str, Any]:
    """``ablation_sparsity`` (mean over ``tokens`` sampled tokens of ``windows`` (A, C) of the
    token scores, at most ``cap`` latents per token, 0: all), its standard error over the
    tokens, and ``ablation_sparsity_count`` (tokens scored) and ``ablation_sparsity_latents``
    (ablations run)."""
    token_scores, ablations = [], 0
    generator = torch.Generator().manual_seed(seed)
    for window, position in sample_tokens(len(windows), windows.shape[1], skip, tokens, seed):
        _, scores = token_ablation_scores(sae, lm, site, windows[window], skip, position, batch, cap, generator)
        finite = [score for score in scores if math.isfinite(score)]
        ablations += len(scores)
        if finite:
            token_scores.append(sum(finite) / len(finite))
    mean, se = mean_and_standard_error(token_scores)
    return {"ablation_sparsity": mean, "ablation_sparsity_se": se, "ablation_sparsity_count": len(token_scores),
            "ablation_sparsity_latents": ablations}
