"""Feature recovery of a cell trained on synthetic activations (``data.synthetic``), scored
against the planted dictionary with SAELens' own definitions (``sae_lens.synthetic``), so
that a scaled-down run reads against SynthSAEBench's table; and the LM metrics, which such a
cell cannot have, marked not applicable.

With f_i (i < N) the true feature directions and W_dec[j] (j < n) the SAE's decoder rows:

- ``mcc``: SAELens' ``mean_correlation_coefficient``: the one-to-one matching of latents to
  features that maximises Σ |cos(W_dec[j], f_i)| (Hungarian algorithm, min(n, N) pairs), and
  the mean |cos| of the matched pairs;
- ``feature_uniqueness``: SAELens' ``feature_uniqueness``: with each latent matched to its
  best feature i*(j) = argmax_i |cos(W_dec[j], f_i)|, #{distinct i*(j)} / n;
- ``firing_precision``, ``firing_recall``, ``firing_f1``: SAELens' classification metrics:
  latent j as a detector of its best feature i*(j) over the held-out rows, fired when z_j ≠ 0
  and true when c_i*(j) > 0; precision TP/(TP+FP), recall TP/(TP+FN), F1 their harmonic mean,
  each 0 where undefined, averaged over all n latents (a dead latent counts 0);
- ``true_l0``: the mean number of active true features per held-out row.

The decoder directions are those of the raw activations: the SAE's normalisation
x = (a − μ)/s shifts and scales every direction alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from saesweep.core.errors import UserError
from saesweep.data.activations import REEXTRACT, ActivationStore
from saesweep.data.synthetic import PLANTED_KEY, SUPPORT, load_planted
from saesweep.sae.base import SparseAutoencoder

LM_NOT_APPLICABLE = "synthetic activations (config key synthetic): there is no language model or text"
"""Why a synthetic cell has no LM metric."""
LM_METRICS = {
    "downstream": ("ce_clean", "ce_sae", "ce_zero_ablation", "delta_lm_loss", "delta_lm_loss_error_added",
                   "ce_loss_recovered", "kl_sae", "kl_zero_ablation", "kl_score"),
    "probes": ("probe_loss", "probe_loss_se", "probe_loss_count"),
    "explanations": ("explain_precision", "explain_precision_se", "explain_precision_count",
                     "explain_recall", "explain_recall_se", "explain_recall_count"),
    "ablation": ("ablation_sparsity", "ablation_sparsity_se", "ablation_sparsity_count"),
}
"""The metrics that need the LM or its tokens, by the group ``not_applicable`` names."""


def lm_metrics_not_applicable(ks: list[int]) -> tuple[dict[str, Any], dict[str, str]]:
    """(metrics, not_applicable) of a synthetic cell: every LM metric NaN (ΔLM loss at every k'
    as well), and the reason for each group."""
    metrics: dict[str, Any] = {name: math.nan for names in LM_METRICS.values() for name in names}
    metrics["k_transfer_delta_lm_loss"] = {str(k): math.nan for k in ks}
    metrics["probe_tasks"] = {}
    return metrics, {group: LM_NOT_APPLICABLE for group in LM_METRICS}


Support = tuple[np.ndarray, np.ndarray, np.ndarray]
"""True feature activations of rows as CSR: (offsets (rows + 1,), feature indices, values)."""


def true_support(store: ActivationStore, rows: int) -> Support:
    """The true feature activations of the first ``rows`` held-out rows, from the shards'
    ``SUPPORT`` datasets (in memory: about 12 bytes per active feature)."""
    offsets, indices, values, have = [np.zeros(1, dtype=np.int64)], [], [], 0
    for index in range(len(store.shards)):
        if have >= rows:
            break
        with store.open_shard(index) as handle:
            shard_offsets, shard_indices, shard_values = (store.whole(index, store.dataset(index, handle, name)) for name in SUPPORT)
        take = min(rows - have, len(shard_offsets) - 1)
        offsets.append(offsets[-1][-1] + shard_offsets[1 : take + 1])
        indices.append(shard_indices[: shard_offsets[take]])
        values.append(shard_values[: shard_offsets[take]])
        have += take
    if have < rows:
        raise UserError(f"synthetic activation folder {store.folder}: its true support covers {have} rows, fewer than {rows}; {REEXTRACT}")
    return np.concatenate(offsets), np.concatenate(indices), np.concatenate(values)


def support_rows(support: Support, start: int, count: int, n_features: int, device: torch.device) -> torch.Tensor:
    """Rows [start, start + count) of the true feature activations, dense (count, N) on ``device``."""
    offsets, indices, values = support
    low, high = offsets[start], offsets[start + count]
    rows = np.repeat(np.arange(count), np.diff(offsets[start : start + count + 1]))
    dense = torch.zeros(count, n_features, device=device)
    dense[torch.from_numpy(rows).to(device), torch.from_numpy(indices[low:high]).to(device).long()] = (
        torch.from_numpy(values[low:high]).to(device).float()
    )
    return dense


@torch.no_grad()
def recovery_metrics(sae: SparseAutoencoder, store: ActivationStore, activations: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """``mcc``, ``feature_uniqueness``, ``firing_precision/recall/f1`` and ``true_l0`` (module
    docstring) of ``sae`` on the held-out ``activations`` (the first rows of ``store``), by
    SAELens' functions, on the SAE's device."""
    from sae_lens.synthetic import ClassificationMetricsCalculator, feature_uniqueness, mean_correlation_coefficient

    device = sae.W_dec.device
    planted = load_planted(store.folder / store.manifest[PLANTED_KEY], device)
    features = planted.feature_dict.feature_vectors.float()
    decoder = sae.W_dec.float()
    calculator = ClassificationMetricsCalculator(decoder, features)
    support = true_support(store, len(activations))
    for start in range(0, len(activations), batch_size):
        codes = sae.encode(sae.normalise(activations[start : start + batch_size])).to_dense()
        calculator.add_batch(codes, support_rows(support, start, len(codes), features.shape[0], device))
    classification = calculator.compute()
    return {
        "mcc": mean_correlation_coefficient(decoder, features),
        "feature_uniqueness": feature_uniqueness(decoder, features),
        "firing_precision": classification.precision,
        "firing_recall": classification.recall,
        "firing_f1": classification.f1_score,
        "true_l0": len(support[1]) / len(activations),
    }
