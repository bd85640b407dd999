"""Evaluating one trained cell of any architecture on held-out tokens only, through the
architecture interface; the definitions live in ``metrics`` and ``probes``, the metrics on
the analysis tokens (the last three below) in ``analysis``, streamed over chunks of tokens.

- reconstruction (normalised MSE, cosine, measured L0, dead fraction, firing histogram) on
  the first ``tokens`` held-out activations, normalised MSE and L0 again on their
  validation and test windows (``heldout_split``), and the k-transfer sweep: the same SAE
  evaluated with k' = f·k active latents (architectures with ``k_override`` only: TopK,
  Multi-TopK and Matryoshka TopK; for the others the metrics say why it does not apply);
- downstream, on ``downstream_windows`` held-out windows: the site's output a at every
  kept position (from ``skip_positions`` on) replaced by the SAE reconstruction â
  (ΔLM loss, CE recovered against zero ablation, KL score), and by â + (a − â) as a
  built-in check that must give ΔLM ≈ 0;
- probe loss of the best single latent on automatically labelled token tasks;
- n-gram explanations (precision, recall) and ablation sparsity on seeded samples of live
  latents.

Each of the last three is a mean over sampled units (tasks, latents) and comes with its
standard error over them (``{metric}_se``) and the number of units (``{metric}_count``).

A cell trained on synthetic activations (a held-out manifest naming a planted dictionary)
has no LM: it is scored on feature recovery instead (``recovery``), and the LM metrics are
NaN with their reason in ``not_applicable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saesweep.core.devices import resolve_device
from saesweep.core.job_settings import EvalSettings, to_json
from saesweep.data.activations import ActivationStore
from saesweep.data.synthetic import PLANTED_KEY
from saesweep.evaluation.analysis import analysis_metrics
from saesweep.evaluation.comparability import protocol_hash
from saesweep.evaluation.recovery import lm_metrics_not_applicable, recovery_metrics
from saesweep.evaluation.heldout_split import split_metrics, tokens_per_window
from saesweep.evaluation.density import density_metrics
from saesweep.evaluation.n2g import n2g_pad
from saesweep.evaluation.refine import RefinementAccumulator
from saesweep.sae.export import load_sae
from saesweep.core.files import write_json
from saesweep.data.lm import load_lm
from saesweep.evaluation.metrics import (
    ReconstructionAccumulator,
    ce_loss_recovered,
    kl_score,
    kl_sum_of_log_probs,
    masked_log_probs,
    next_token_ce_sum_of_log_probs,
)
from saesweep.evaluation.splice import reconstructor, spliced_logits
from saesweep.core.provenance import provenance
from saesweep.sae.base import SparseAutoencoder


# Where an evaluation job's device setting comes from (``plan.settings.eval_settings``).
DEVICE_KEY = "config key evaluate.device (train.device when it is null)"


def k_transfer_values(k: int, n: int, factors: list[float]) -> list[int]:
    """Distinct k' = round(f·k), clipped to 1 … n − 1, in increasing order."""
    return sorted({min(n - 1, max(1, round(f * k))) for f in factors})


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder, activations: torch.Tensor, batch_size: int, ks: list[int], refine_tokens: int,
) -> dict[str, Any]:
    """Reconstruction metrics of the SAE as trained, normalised MSE at every k' in ``ks``, and
    the refinement metrics on the first ``refine_tokens``."""
    own = ReconstructionAccumulator(n_latents=sae.n)
    others = {k: ReconstructionAccumulator() for k in ks}
    refined = RefinementAccumulator(refine_tokens)  # Gao et al. §5.1 (evaluation.refine)
    for start in range(0, len(activations), batch_size):
        x = sae.normalise(activations[start : start + batch_size])
        pre = sae.pre_activations(x)
        codes = sae.sparse_codes(pre)
        own.update(x, sae.decode(codes), codes.col_indices(), codes.values())
        refined.update(sae, x, codes)
        for k, accumulator in others.items():
            accumulator.update(x, sae.decode(sae.sparse_codes(pre, k)))
    result = own.result()
    return {
        "nmse": result["normalised_mse"],
        "mse": result["mse"],
        "cosine_similarity": result["cosine_similarity"],
        "l0": result["l0"],
        "dead_fraction": result["dead_fraction"],
        **density_metrics(own.counts, own.n_coded),
        **refined.result(),
        "k_transfer_nmse": {str(k): accumulator.result()["normalised_mse"] for k, accumulator in others.items()},
    }


Replacement = Callable[[torch.Tensor], torch.Tensor] | None
"""What the site's output is replaced by in a spliced forward (None: nothing, the clean LM)."""


class Downstream:
    """Next-token losses of the LM on held-out windows (W, C), on the LM's device, with a
    site's output replaced.

    Batches of windows are the outer loop: each batch's clean log-probabilities are
    computed once and compared with every replacement's before the next batch, so memory
    holds one batch's logits (a few (batch · C, V) float32 tensors), not all windows'."""

    def __init__(self, lm: torch.nn.Module, site: str, windows: torch.Tensor, skip: int, batch: int) -> None:
        self.lm, self.site, self.windows, self.skip, self.batch = lm, site, windows, skip, batch
        self.mask = torch.zeros(windows.shape, dtype=torch.bool, device=windows.device)
        self.mask[:, skip:] = True

    def logits(self, start: int, replace: Replacement) -> torch.Tensor:
        """Logits of windows[start : start + batch], float32 on the LM's device."""
        return spliced_logits(self.lm, self.site, self.windows[start : start + self.batch], self.skip, replace)

    @torch.no_grad()
    def losses(self, replacements: dict[str, Replacement]) -> dict[str, tuple[float, float]]:
        """Per named replacement, (mean next-token CE, mean KL(clean ‖ replaced)) over the
        kept positions; sums over batches, then divided."""
        sums = {name: [0.0, 0, 0.0, 0] for name in replacements}  # Σ CE, count, Σ KL, count
        for start in range(0, len(self.windows), self.batch):
            ids, mask = self.windows[start : start + self.batch], self.mask[start : start + self.batch]
            clean = masked_log_probs(self.logits(start, None), mask)
            for name, replace in replacements.items():
                log_probs = clean if replace is None else masked_log_probs(self.logits(start, replace), mask)
                total, n = next_token_ce_sum_of_log_probs(log_probs, ids, mask)
                kl_total, kl_n = kl_sum_of_log_probs(clean, log_probs)
                sums[name] = [a + b for a, b in zip(sums[name], (total, n, kl_total, kl_n))]
        return {name: (ce / count, kl / kl_count) for name, (ce, count, kl, kl_count) in sums.items()}


def downstream_metrics(sae: SparseAutoencoder, downstream: Downstream, ks: list[int]) -> dict[str, Any]:
    """ΔLM loss, CE recovered, KL score, the error-added check, and ΔLM at every k'."""
    own_k = getattr(sae, "k", None)
    losses = downstream.losses({
        "clean": None, "sae": reconstructor(sae), "zero": torch.zeros_like,
        "error_added": reconstructor(sae, add_error=True),
        **{str(k): reconstructor(sae, k) for k in ks if k != own_k},  # ks is empty unless the architecture has a k to vary
    })
    (ce_clean, _), (ce_sae, kl_sae), (ce_zero, kl_zero) = losses["clean"], losses["sae"], losses["zero"]
    ce_error_added, _ = losses["error_added"]
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero_ablation": ce_zero,
        "delta_lm_loss": ce_sae - ce_clean,
        "delta_lm_loss_error_added": ce_error_added - ce_clean,
        "ce_loss_recovered": ce_loss_recovered(ce_clean, ce_sae, ce_zero),
        "kl_sae": kl_sae,
        "kl_zero_ablation": kl_zero,
        "kl_score": kl_score(kl_sae, kl_zero),
        "k_transfer_delta_lm_loss": {
            str(k): (ce_sae if k == own_k else losses[str(k)][0]) - ce_clean for k in ks
        },
    }


@dataclass(frozen=True)
class EvaluationInputs:
    """What one evaluation reads, every tensor and module on the evaluation's device."""

    sae: SparseAutoencoder
    """The SAE being evaluated."""
    cfg: dict[str, Any]
    """Its ``cfg.json``."""
    store: ActivationStore
    """The held-out shards."""
    activations: torch.Tensor
    """The first ``tokens`` held-out activations (T, d), float32."""
    windows: torch.Tensor
    """Every held-out window's token ids (W, C), int64 (none for synthetic activations)."""
    lm: torch.nn.Module | None
    """The LM, in its configured dtype; None for synthetic activations."""
    tokenizer: Any
    """The LM's tokenizer (None for synthetic activations)."""


def load_inputs(settings: EvalSettings, cell_folder: Path, device: torch.device) -> EvaluationInputs:
    """The SAE of ``cell_folder``, the held-out activations and windows, and the LM, each put
    on ``device`` as it is read (the one place evaluation moves data onto its device); no
    windows and no LM for synthetic activations."""
    sae, cfg = load_sae(cell_folder, device)
    store = ActivationStore(settings.eval_activations)
    activations = store.head(settings.tokens, device)
    if PLANTED_KEY in store.manifest:
        return EvaluationInputs(sae, cfg, store, activations, torch.empty(0, 0, dtype=torch.long, device=device), None, None)
    windows = np.concatenate([store.read_windows(index) for index in range(len(store.shards))])
    lm, tokenizer = load_lm(settings.model, device)
    return EvaluationInputs(sae, cfg, store, activations, torch.from_numpy(windows).to(device).long(), lm, tokenizer)


def evaluate_cell(settings: EvalSettings, cell_folder: Path, output: Path) -> dict[str, Any]:
    """Compute every metric of a trained cell (or an imported external SAE) and write
    ``metrics.json``. The device is resolved once from the settings and everything is read
    onto it (``load_inputs``), so every metric's tensors live there."""
    started = time.perf_counter()
    device = resolve_device(settings.device, DEVICE_KEY)
    torch.manual_seed(settings.seed)
    inputs = load_inputs(settings, cell_folder, device)
    sae, cfg, store, activations = inputs.sae, inputs.cfg, inputs.store, inputs.activations
    not_applicable: dict[str, str] = {}
    if sae.k_override:
        ks = k_transfer_values(sae.k, sae.n, settings.k_transfer_factors)
    else:
        ks = []
        not_applicable["k_transfer"] = f"{sae.name} cannot be evaluated with another number of active latents"
    metrics: dict[str, Any] = reconstruction_metrics(sae, activations, settings.batch_size, ks, settings.refine_tokens)
    # validation / test parts of the same tokens, for the architecture comparison
    metrics.update(split_metrics(sae, activations, tokens_per_window(store.manifest), settings.batch_size))
    if inputs.lm is None:
        lm_metrics, reasons = lm_metrics_not_applicable(ks)
        metrics.update({**recovery_metrics(sae, store, activations, settings.batch_size), **lm_metrics})
        not_applicable.update(reasons)
        downstream_tokens = 0
    else:
        downstream_tokens = language_model_metrics(settings, inputs, ks, metrics, device)

    metrics.update({
        # an external SAE's arch says where it came from (saelens-jumprelu), see interop.stages
        "site": cfg["site"], "arch": cfg["external"]["arch"] if "external" in cfg else cfg["arch"],
        "n_latents": sae.n, **cfg["params"], "seed": cfg["seed"],
        "setting": settings.setting, "sparsity_parameter": sae.knob().name,
        "not_applicable": not_applicable, "k_transfer": ks, "eval_tokens": len(activations), "downstream_tokens": downstream_tokens,
        "eval_wall_time_s": time.perf_counter() - started,
        "provenance": {**provenance(to_json(settings), device), "protocol_hash": protocol_hash(settings, store.manifest)},
    })
    write_json(output, metrics)
    return metrics


def language_model_metrics(
    settings: EvalSettings, inputs: EvaluationInputs, ks: list[int], metrics: dict[str, Any], device: torch.device
) -> int:
    """The metrics that need the LM (downstream, probes, explanations, ablation) into
    ``metrics``; returns the downstream tokens."""
    sae, cfg, store, all_windows = inputs.sae, inputs.cfg, inputs.store, inputs.windows
    assert inputs.lm is not None, "language_model_metrics needs the LM"
    skip = store.manifest["skip_positions"]
    downstream = Downstream(inputs.lm, cfg["site"], all_windows[: settings.downstream_windows], skip, settings.lm_batch_size)
    metrics.update(downstream_metrics(sae, downstream, ks))

    windows = all_windows[: settings.analysis_windows, skip:]
    kept = store.head(windows.numel(), device)
    windows = windows[: len(kept) // windows.shape[1]]
    kept = kept[: windows.numel()]
    strings = [inputs.tokenizer.convert_ids_to_tokens(row.tolist()) for row in windows]
    metrics.update(analysis_metrics(
        sae, inputs.lm, cfg["site"], activations=kept, windows=windows, token_strings=strings,
        ablated=all_windows[: min(settings.ablation_windows, len(windows))], skip=skip,
        chunk=settings.batch_size, probe_candidates=settings.probe_candidates,
        explain_latents=settings.explain_latents, ablation_tokens=settings.ablation_tokens,
        ablation_latents=settings.ablation_latents,
        lm_batch=settings.lm_batch_size, pad=n2g_pad(inputs.tokenizer), seed=settings.seed,
    ))
    return int(downstream.mask.sum())
