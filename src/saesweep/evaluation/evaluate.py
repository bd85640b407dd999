"""Evaluating one trained cell of any architecture on held-out tokens only, through the
architecture interface; the definitions live in ``metrics``.

- reconstruction (normalised MSE, cosine, measured L0, dead fraction, firing histogram) on
  the first ``tokens`` held-out activations, and the k-transfer sweep: the same SAE
  evaluated with k' = f·k active latents (architectures with ``k_override`` only: TopK and
  Multi-TopK; for the others the metrics say why it does not apply);
- downstream, on ``downstream_windows`` held-out windows: the site's output a at every
  kept position (from ``skip_positions`` on) replaced by the SAE reconstruction â
  (ΔLM loss, CE recovered against zero ablation, KL score), and by â + (a − â) as a
  built-in check that must give ΔLM ≈ 0;
- probe loss of the best single latent on automatically labelled token tasks;
- n-gram explanations (precision, recall) and ablation sparsity on seeded samples of live
  latents.

Each of the last three is a mean over sampled units (tasks, latents) and comes with its
standard error over them (``{metric}_se``) and the number of units (``{metric}_count``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saesweep.data.activations import ActivationStore
from saesweep.core.devices import resolve_device
from saesweep.core.job_settings import EvalSettings, to_json
from saesweep.evaluation.explain import explainability
from saesweep.sae.export import load_sae
from saesweep.core.files import write_json
from saesweep.data.lm import load_lm, spliced
from saesweep.evaluation.metrics import (
    ReconstructionAccumulator,
    ablation_sparsity,
    best_latent_probe_loss,
    ce_loss_recovered,
    kl_score,
    kl_sum_of_log_probs,
    label_entropy,
    masked_log_probs,
    mean_and_standard_error,
    next_token_ce_sum_of_log_probs,
)
from saesweep.core.provenance import provenance
from saesweep.sae.base import SparseAutoencoder
from saesweep.evaluation.token_tasks import label_tokens


# Where an evaluation job's device setting comes from (``plan.settings.eval_settings``).
DEVICE_KEY = "config key evaluate.device (train.device when it is null)"


def k_transfer_values(k: int, n: int, factors: list[float]) -> list[int]:
    """Distinct k' = round(f·k), clipped to 1 … n − 1, in increasing order."""
    return sorted({min(n - 1, max(1, round(f * k))) for f in factors})


@torch.no_grad()
def reconstruction_metrics(
    sae: SparseAutoencoder, activations: torch.Tensor, batch_size: int, ks: list[int]
) -> dict[str, Any]:
    """Reconstruction metrics of the SAE as trained, and normalised MSE at every k' in ``ks``."""
    own = ReconstructionAccumulator(n_latents=sae.n)
    others = {k: ReconstructionAccumulator() for k in ks}
    for start in range(0, len(activations), batch_size):
        x = sae.normalise(activations[start : start + batch_size])
        pre = sae.pre_activations(x)
        codes = sae.sparse_codes(pre)
        own.update(x, sae.decode(codes), codes.col_indices(), codes.values())
        for k, accumulator in others.items():
            accumulator.update(x, sae.decode(sae.sparse_codes(pre, k)))
    result = own.result()
    histogram = own.histogram()
    return {
        "nmse": result["normalised_mse"],
        "mse": result["mse"],
        "cosine_similarity": result["cosine_similarity"],
        "l0": result["l0"],
        "dead_fraction": result["dead_fraction"],
        "firing_histogram": {
            "log10_frequency_edges": histogram.edges.tolist(),
            "counts": histogram.counts.tolist(),
            "dead": int(histogram.n_dead),
        },
        "k_transfer_nmse": {str(k): accumulator.result()["normalised_mse"] for k, accumulator in others.items()},
    }


Replace = Callable[[torch.Tensor], torch.Tensor]
"""A replacement of a site's output: float32 activations (W, C − skip, d) → the same shape."""


@torch.no_grad()
def spliced_logits(lm: torch.nn.Module, site: str, windows: torch.Tensor, skip: int, replace: Replace | None) -> torch.Tensor:
    """Logits (float32, on the LM's device) of token ``windows`` (W, C), on that device, with the
    site's output at positions ≥ ``skip`` replaced by ``replace`` of it; unchanged for None."""
    if replace is None:
        return lm(input_ids=windows, use_cache=False).logits.float()

    def replace_kept(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, skip:] = replace(output[:, skip:].float()).to(output.dtype)
        return output

    with spliced(lm, site, replace_kept):
        return lm(input_ids=windows, use_cache=False).logits.float()


class Downstream:
    """Next-token losses of the LM on held-out windows (W, C), on the LM's device, with a
    site's output replaced, one batch of B windows at a time: memory is two batches' logits,
    2 · B · C · vocab floats (clean and replaced), whatever W."""

    def __init__(self, lm: torch.nn.Module, site: str, windows: torch.Tensor, skip: int, batch: int) -> None:
        self.lm, self.site, self.windows, self.skip, self.batch = lm, site, windows, skip, batch
        self.mask = torch.zeros(windows.shape, dtype=torch.bool, device=windows.device)
        self.mask[:, skip:] = True

    @torch.no_grad()
    def losses(self, replacements: dict[str, Replace | None]) -> dict[str, tuple[float, float]]:
        """Per named replacement (None: the clean LM), (mean next-token CE, mean KL(clean ‖
        replaced)) over the kept positions; the clean logits of a batch are computed once."""
        sums = {name: [0.0, 0, 0.0, 0] for name in replacements}
        for start in range(0, len(self.windows), self.batch):
            ids, mask = self.windows[start : start + self.batch], self.mask[start : start + self.batch]
            clean = masked_log_probs(spliced_logits(self.lm, self.site, ids, self.skip, None), mask)
            for name, replace in replacements.items():
                log_probs = clean if replace is None else masked_log_probs(
                    spliced_logits(self.lm, self.site, ids, self.skip, replace), mask
                )
                ce, count = next_token_ce_sum_of_log_probs(log_probs, ids, mask)
                kl, kl_count = kl_sum_of_log_probs(clean, log_probs)
                total = sums[name]
                total[0], total[1], total[2], total[3] = total[0] + ce, total[1] + count, total[2] + kl, total[3] + kl_count
        return {name: (ce / count, kl / kl_count) for name, (ce, count, kl, kl_count) in sums.items()}


def reconstructor(sae: SparseAutoencoder, k: int | None = None, add_error: bool = False) -> Replace:
    """a ↦ â (the SAE's reconstruction in raw units), or a ↦ â + (a − â) with ``add_error``."""

    def replace(a: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        flat = a.reshape(-1, shape[-1])
        recon = sae.denormalise(sae(sae.normalise(flat), k))
        if add_error:
            recon = recon + (flat - recon)
        return recon.reshape(shape)

    return replace


def downstream_metrics(sae: SparseAutoencoder, downstream: Downstream, ks: list[int]) -> dict[str, Any]:
    """ΔLM loss, CE recovered, KL score, the error-added check, and ΔLM at every k' (``ks`` is
    empty unless the architecture has a k to vary), from one pass over the windows."""
    replacements: dict[str, Replace | None] = {
        "clean": None, "sae": reconstructor(sae), "zero": torch.zeros_like,
        "error_added": reconstructor(sae, add_error=True),
        **{f"k{k}": reconstructor(sae, k) for k in ks if k != getattr(sae, "k", None)},
    }
    losses = downstream.losses(replacements)
    (ce_clean, _), (ce_sae, kl_sae), (ce_zero, kl_zero) = losses["clean"], losses["sae"], losses["zero"]
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero_ablation": ce_zero,
        "delta_lm_loss": ce_sae - ce_clean,
        "delta_lm_loss_error_added": losses["error_added"][0] - ce_clean,
        "ce_loss_recovered": ce_loss_recovered(ce_clean, ce_sae, ce_zero),
        "kl_sae": kl_sae,
        "kl_zero_ablation": kl_zero,
        "kl_score": kl_score(kl_sae, kl_zero),
        "k_transfer_delta_lm_loss": {str(k): losses.get(f"k{k}", losses["sae"])[0] - ce_clean for k in ks},
    }


@torch.no_grad()
def dense_codes(sae: SparseAutoencoder, activations: torch.Tensor) -> torch.Tensor:
    """Every latent's value for every row of ``activations``: (T, n), mostly zeros."""
    return sae.encode(sae.normalise(activations)).to_dense()


def probe_candidates(codes: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` latents whose values correlate most with the labels, |corr(z_j, y)|,
    on the probes' training half only (a linear screen before the logistic fits)."""
    half = len(labels) // 2
    values, target = codes[:half].double(), labels[:half].double()
    centred, target = values - values.mean(dim=0), target - target.mean()
    correlation = (centred.T @ target).abs() / (centred.norm(dim=0) * target.norm()).clamp_min(1e-12)
    return correlation.topk(min(count, codes.shape[1])).indices


def probe_metrics(codes: torch.Tensor, token_strings: list[list[str]], candidates: int) -> dict[str, Any]:
    """Per task, the held-out loss of the single-latent probe whose latent has the lowest
    training loss, among the ``candidates`` latents best correlated with the task on the
    training half (``metrics.best_latent_probe_loss``), beside the held-out label entropy;
    a task counts only when both classes occur in each half. ``probe_loss`` is the mean
    over the counted tasks, with its standard error over them."""
    labels = label_tokens(token_strings)
    per_task: dict[str, dict[str, float]] = {}
    for task, label in labels.items():
        target = torch.from_numpy(label.reshape(-1))
        half = len(target) // 2
        if not all(part.any() and not part.all() for part in (target[:half], target[half:])):
            continue
        chosen = codes[:, probe_candidates(codes, target, candidates)]
        loss, _ = best_latent_probe_loss(chosen, target)
        per_task[task] = {"loss": loss, "label_entropy": label_entropy(target[half:])}
    mean, se = mean_and_standard_error([entry["loss"] for entry in per_task.values()])
    return {"probe_loss": mean, "probe_loss_se": se, "probe_loss_count": len(per_task), "probe_tasks": per_task}


def sample_live_latents(codes: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded sample of up to ``count`` latents that fire somewhere in ``codes`` (T, n)."""
    live = codes.gt(0).any(dim=0).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    return live[torch.randperm(len(live), generator=generator)[:count]].sort().values


def explain_metrics(codes: torch.Tensor, windows: torch.Tensor) -> dict[str, Any]:
    """n-gram explanations (``explain.explainability``) of the latents whose values ``codes``
    (T, m) holds, with T = windows × their length: explained on the first half of the
    windows, scored on the second; means over the scored latents with standard errors."""
    if codes.shape[1] == 0 or len(windows) < 2:
        precision = recall = torch.empty(0)
    else:
        codes = codes.reshape(len(windows), windows.shape[1], codes.shape[1])
        half = len(windows) // 2
        result = explainability(windows[:half], codes[:half], windows[half:], codes[half:])
        precision, recall = result["precision"], result["recall"]
    out: dict[str, Any] = {}
    for name, values in (("explain_precision", precision), ("explain_recall", recall)):
        out[name], out[f"{name}_se"] = mean_and_standard_error(values.tolist())
        out[f"{name}_count"] = int(values.isfinite().sum())
    return out


def ablation_metrics(
    sae: SparseAutoencoder, lm: torch.nn.Module, site: str, windows: torch.Tensor, skip: int,
    codes: torch.Tensor, count: int, seed: int,
) -> dict[str, Any]:
    """Ablation sparsity (``metrics.ablation_sparsity``) of up to ``count`` latents sampled
    (seeded) among those that fire in the held-out token ``windows`` (W, C), whose codes at
    the kept positions are the first W · (C − skip) rows of ``codes``: each is removed from
    the SAE reconstruction at one seeded position where it fires, and the logit change
    against the unablated reconstruction is taken at that position and every later one of
    its window (the ones the ablation can reach). Mean over the latents, with its standard
    error."""
    width = windows.shape[1] - skip
    fires = codes[: len(windows) * width].reshape(-1, width, codes.shape[1]) > 0
    latents = sample_live_latents(fires.flatten(0, 1).float(), count, seed)
    generator = torch.Generator().manual_seed(seed)
    reconstruct = reconstructor(sae)
    unablated: dict[int, torch.Tensor] = {}
    scores = []
    for latent in latents.tolist():
        where = fires[:, :, latent].nonzero()
        window, position = where[torch.randint(len(where), (1,), generator=generator).item()].tolist()
        ids = windows[window : window + 1]
        if window not in unablated:
            unablated[window] = spliced_logits(lm, site, ids, skip, reconstruct)

        def without_latent(a: torch.Tensor, latent: int = latent, position: int = position) -> torch.Tensor:
            out = reconstruct(a)
            value = sae.encode(sae.normalise(a[0, position : position + 1])).to_dense()[0, latent]
            out[0, position] -= value * sae.W_dec[latent] * sae.act_scale
            return out

        ablated = spliced_logits(lm, site, ids, skip, without_latent)
        scores.append(ablation_sparsity((ablated - unablated[window])[0, skip + position :]))
    mean, se = mean_and_standard_error(scores)
    return {"ablation_sparsity": mean, "ablation_sparsity_se": se, "ablation_sparsity_count": sum(map(math.isfinite, scores))}


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
    """Every held-out window's token ids (W, C), int64."""
    lm: torch.nn.Module
    """The LM, in its configured dtype."""
    tokenizer: Any
    """The LM's tokenizer."""


def load_inputs(settings: EvalSettings, cell_folder: Path, device: torch.device) -> EvaluationInputs:
    """The SAE of ``cell_folder``, the held-out activations and windows, and the LM, each put
    on ``device`` as it is read (the one place evaluation moves data onto its device)."""
    sae, cfg = load_sae(cell_folder, device)
    store = ActivationStore(settings.eval_activations)
    activations = store.head(settings.tokens, device)
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
    sae, cfg, store, activations, all_windows = inputs.sae, inputs.cfg, inputs.store, inputs.activations, inputs.windows
    lm, tokenizer = inputs.lm, inputs.tokenizer
    not_applicable: dict[str, str] = {}
    if sae.k_override:
        ks = k_transfer_values(sae.k, sae.n, settings.k_transfer_factors)
    else:
        ks = []
        not_applicable["k_transfer"] = f"{sae.name} cannot be evaluated with another number of active latents"
    metrics: dict[str, Any] = reconstruction_metrics(sae, activations, settings.batch_size, ks)

    skip = store.manifest["skip_positions"]
    downstream = Downstream(lm, cfg["site"], all_windows[: settings.downstream_windows], skip, settings.lm_batch_size)
    metrics.update(downstream_metrics(sae, downstream, ks))

    windows = all_windows[: settings.analysis_windows, skip:]
    kept = store.head(windows.numel(), device)
    windows = windows[: len(kept) // windows.shape[1]]
    kept = kept[: windows.numel()]
    strings = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in windows]
    codes = dense_codes(sae, kept)
    metrics.update(probe_metrics(codes, strings, settings.probe_candidates))
    latents = sample_live_latents(codes, settings.explain_latents, settings.seed)
    metrics.update(explain_metrics(codes[:, latents], windows))
    ablated = all_windows[: min(settings.ablation_windows, len(windows))]
    metrics.update(ablation_metrics(sae, lm, cfg["site"], ablated, skip, codes, settings.ablation_latents, settings.seed))

    metrics.update({
        # an external SAE's arch says where it came from (saelens-jumprelu), see interop.stages
        "site": cfg["site"], "arch": cfg["external"]["arch"] if "external" in cfg else cfg["arch"],
        "n_latents": sae.n, **cfg["params"], "seed": cfg["seed"],
        "setting": settings.setting, "sparsity_parameter": sae.knob().name,
        "not_applicable": not_applicable, "k_transfer": ks, "eval_tokens": len(activations), "downstream_tokens": int(downstream.mask.sum()),
        "eval_wall_time_s": time.perf_counter() - started, "provenance": provenance(to_json(settings)),
    })
    write_json(output, metrics)
    return metrics
