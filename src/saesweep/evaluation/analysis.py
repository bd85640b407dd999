"""The metrics of a cell on its analysis tokens: probe loss on labelled token tasks, n-gram
explanations and ablation sparsity (``evaluation.ablation``), streamed over chunks of tokens.

The analysis tokens are the T = W · (C − skip) kept positions of W held-out windows. No
(T, n) code matrix is ever formed: the codes are computed ``chunk`` rows at a time, twice.

1. First pass: per latent j, its firing count over all T rows, and the probe screen's sums
   (``probes.CorrelationScreen``) of the pre-activations over the probes' training half.
2. Choice: per task, the ``probe_candidates`` latents best correlated with it; a seeded
   sample of ``explain_latents`` live latents.
3. Second pass: the code values of the explained latents over all T rows, and
   the pre-activations of the probe candidates (the probes read pre-activations, Gao et al.
   2024 §4.4: for TopK the encoder's output before the top-k selection, for ReLU before the
   ReLU, for JumpReLU and BatchTopK before the threshold, for Gated the gate's
   pre-activation, of which the magnitude path is an affine map per latent, which a 1-D
   probe does not see), (T, U) float32 in all; the metrics read only these columns.

Memory (bytes), besides the LM and the SAE, with c = chunk, t = tasks (``TASKS``), p =
``probe_candidates``, m = ``explain_latents``, U ≤ t·p + m:

    3·c·n·4 + c·n·8         one chunk's pre-activations and codes (as in reconstruction),
                            and the chunk in float64 for the screen
  + (3 + 3·t)·n·8 + 2·n·8   the screen's sums and correlations, the firing counts, the slot map
  + T·(U + 1)·4 + T·t       the chosen columns and the labels
  + 12·T·p·8                one task's probe fits (float64 working arrays of ``probe_losses``)

which does not grow with T · n.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from saesweep.evaluation.ablation import ablation_metrics
from saesweep.data.lm import capture_sites
from saesweep.evaluation.explain import explainability
from saesweep.evaluation.n2g import N2G_RANDOM, N2G_TOP, Activation, n2g_explainability
from saesweep.evaluation.metrics import mean_and_standard_error
from saesweep.evaluation.probes import CorrelationScreen, best_latent_probe_loss, label_entropy
from saesweep.evaluation.token_tasks import label_tokens
from saesweep.sae.base import SparseAutoencoder


class CodeChunk(NamedTuple):
    """The stored entries of some rows' codes: (row i, latent j, value z_ij), (E,) each, rows
    counted from the first analysis token. Stored zeros do not fire."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor


@torch.no_grad()
def encoded_chunks(sae: SparseAutoencoder, activations: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor, CodeChunk]]:
    """(first row, pre-activations (c, n), codes) of raw ``activations`` (T, d), ``chunk``
    rows at a time, on the SAE's device: the SAE never encodes more than ``chunk`` rows at
    once."""
    device = sae.W_enc.device
    for start in range(0, len(activations), chunk):
        pre = sae.pre_activations(sae.normalise(activations[start : start + chunk].to(device)))
        codes = sae.sparse_codes(pre).to_sparse_coo()
        rows, cols = codes.indices()
        yield start, pre, CodeChunk(rows + start, cols, codes.values())


def code_chunks(sae: SparseAutoencoder, activations: torch.Tensor, chunk: int) -> Iterator[CodeChunk]:
    """The codes of ``encoded_chunks``."""
    return (codes for _, _, codes in encoded_chunks(sae, activations, chunk))


def count_firing(counts: torch.Tensor, chunk: CodeChunk, rows: int) -> None:
    """counts[j] += #{entries of ``chunk`` with row < ``rows`` and z_ij > 0}, in place."""
    counts.index_add_(0, chunk.cols, ((chunk.values > 0) & (chunk.rows < rows)).long())


class ColumnGather:
    """The dense values (T, m) of m chosen latents over T rows, filled from code chunks; the
    other latents' entries land in one spare column. Memory: T·(m + 1)·4 + n·8 bytes."""

    def __init__(self, latents: torch.Tensor, n_latents: int, tokens: int) -> None:
        device, m = latents.device, len(latents)
        self.slot = torch.full((n_latents,), m, dtype=torch.int64, device=device)
        self.slot.index_copy_(0, latents, torch.arange(m, device=device))
        self.values = torch.zeros(tokens, m + 1, device=device)

    def update(self, chunk: CodeChunk) -> None:
        """Write the chunk's entries of the chosen latents."""
        where = (chunk.rows, self.slot.index_select(0, chunk.cols))
        self.values.index_put_(where, chunk.values.to(self.values.dtype), accumulate=True)

    def columns(self) -> torch.Tensor:
        """(T, m): column i holds latent ``latents[i]``'s values."""
        return self.values.narrow(1, 0, self.values.shape[1] - 1)


def sample_live_latents(counts: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A seeded sample of up to ``count`` latents with counts[j] > 0, in increasing order:
    the first ``count`` of a permutation (CPU generator seeded with ``seed``) of the live
    latents in increasing order. On the device of ``counts``."""
    live = counts.gt(0).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(live), generator=generator)[:count].to(live.device)
    return live[order].sort().values


def task_labels(token_strings: list[list[str]], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The tasks (``token_tasks.TASKS``) that count, and their labels (tasks, T) bool on
    ``device`` with windows flattened row-major: a task counts when both classes occur in
    each half of the T tokens."""
    labels = label_tokens(token_strings)
    tasks, rows = [], []
    for task, label in labels.items():
        flat = label.reshape(-1)
        half = len(flat) // 2
        if all(part.any() and not part.all() for part in (flat[:half], flat[half:])):
            tasks.append(task)
            rows.append(flat)
    tokens = sum(len(window) for window in token_strings)
    stacked = np.stack(rows) if rows else np.zeros((0, tokens), dtype=bool)
    return tasks, torch.from_numpy(stacked).to(device)


def probe_metrics(tasks: list[str], labels: torch.Tensor, columns: torch.Tensor) -> dict[str, Any]:
    """Per task t, the held-out loss of the single-latent probe whose latent has the lowest
    training loss among its candidates, whose pre-activations are ``columns[t]`` (T, p): the latents
    best correlated with the task on the training half (``probes.best_latent_probe_loss``),
    beside the held-out label entropy. ``probe_loss`` is the mean over the tasks, with its
    standard error over them."""
    per_task: dict[str, dict[str, float]] = {}
    for task, target, chosen in zip(tasks, labels, columns):
        loss, _ = best_latent_probe_loss(chosen, target)
        per_task[task] = {"loss": loss, "label_entropy": label_entropy(target[len(target) // 2 :])}
    mean, se = mean_and_standard_error([entry["loss"] for entry in per_task.values()])
    return {"probe_loss": mean, "probe_loss_se": se, "probe_loss_count": len(per_task), "probe_tasks": per_task}


def _means(prefix: str, precision: torch.Tensor, recall: torch.Tensor) -> dict[str, Any]:
    """``{prefix}_precision`` and ``{prefix}_recall``: means over the scored latents, with
    their standard errors (``_se``) and counts (``_count``)."""
    out: dict[str, Any] = {}
    for name, values in ((f"{prefix}_precision", precision), (f"{prefix}_recall", recall)):
        out[name], out[f"{name}_se"] = mean_and_standard_error(values.tolist())
        out[f"{name}_count"] = int(values.isfinite().sum())
    return out


def explain_metrics(codes: torch.Tensor, windows: torch.Tensor) -> dict[str, Any]:
    """Plain n-gram explanations (``explain.explainability``, this package's own, kept as
    ``ngram_precision`` / ``ngram_recall``) of the latents whose values ``codes`` (T, m)
    holds, with T = windows × their length: explained on the first half of the windows,
    scored on the second."""
    if codes.shape[1] == 0 or len(windows) < 2:
        precision = recall = torch.empty(0)
    else:
        codes = codes.reshape(len(windows), windows.shape[1], codes.shape[1])
        half = len(windows) // 2
        result = explainability(windows[:half], codes[:half], windows[half:], codes[half:])
        precision, recall = result["precision"], result["recall"]
    return _means("ngram", precision, recall)


def site_activation(sae: SparseAutoencoder, lm: torch.nn.Module, site: str, chunk: int) -> Callable[[int], Activation]:
    """``n2g``'s view of a latent through the LM: latent → (token-id sequences → the latent's
    code value at each sequence's last token, the LM run on the sequence alone up to the
    site). Site activations are computed once per distinct sequence (sequences of one length
    in one forward) and kept for every latent; they are encoded ``chunk`` rows at a time."""
    device = sae.W_enc.device
    seen: dict[tuple[int, ...], torch.Tensor] = {}

    def of(latent: int) -> Activation:
        def activation(sequences: list[list[int]]) -> list[float]:
            missing = sorted({tuple(s) for s in sequences} - seen.keys(), key=len)
            for length in sorted({len(s) for s in missing}):
                group = [s for s in missing if len(s) == length]
                ids = torch.tensor(group, dtype=torch.long, device=device)
                last = capture_sites(lm, ids, [site])[site][:, -1].float()
                seen.update(zip(group, last))
            x = torch.stack([seen[tuple(s)] for s in sequences])
            return [value for part in x.split(chunk) for value in sae.encode(sae.normalise(part)).to_dense()[:, latent].tolist()]
        return activation

    return of


def n2g_metrics(
    sae: SparseAutoencoder, lm: torch.nn.Module, site: str, latents: torch.Tensor, codes: torch.Tensor,
    windows: torch.Tensor, pad: int, chunk: int, seed: int,
) -> dict[str, Any]:
    """N2G explanations (``n2g``: Gao et al. 2024's, ``explain_precision`` /
    ``explain_recall``) of ``latents`` whose values ``codes`` (T, m) holds, built from the
    first half of the windows (``n2g.N2G_TOP`` top and ``n2g.N2G_RANDOM`` random activations
    each) with the LM re-run on shortened inputs, scored on the second half."""
    if codes.shape[1] == 0 or len(windows) < 2:
        return _means("explain", torch.empty(0), torch.empty(0))
    codes = codes.reshape(len(windows), windows.shape[1], codes.shape[1])
    half = len(windows) // 2
    result = n2g_explainability(
        site_activation(sae, lm, site, chunk), latents.tolist(), windows[:half].cpu(), codes[:half], windows[half:].cpu(),
        codes[half:], pad, N2G_TOP, N2G_RANDOM, seed)
    return _means("explain", result["precision"], result["recall"])


def analysis_metrics(
    sae: SparseAutoencoder, lm: torch.nn.Module, site: str, *, activations: torch.Tensor,
    windows: torch.Tensor, token_strings: list[list[str]], ablated: torch.Tensor, skip: int,
    chunk: int, probe_candidates: int, explain_latents: int, ablation_tokens: int, ablation_latents: int,
    lm_batch: int, pad: int, seed: int,
) -> dict[str, Any]:
    """Probe, explanation and ablation metrics on the analysis tokens, by the two passes of
    the module docstring. ``activations`` (T, d) are the raw activations at the kept
    positions of ``windows`` (W, C − skip) of token ids, whose strings are
    ``token_strings``; ``ablated`` (A, C) are the windows whole that ``ablation_tokens``
    tokens are sampled from, their active latents (at most ``ablation_latents`` of each, 0:
    all) ablated ``lm_batch`` at a time; ``pad``
    is the neutral token of the N2G explanations."""
    device, tokens = sae.W_enc.device, len(activations)
    tasks, labels = task_labels(token_strings, device)
    screen = CorrelationScreen(labels, tokens // 2, sae.n)
    counts = torch.zeros(sae.n, dtype=torch.int64, device=device)
    for start, pre, codes in encoded_chunks(sae, activations, chunk):
        screen.update(start, pre)
        count_firing(counts, codes, tokens)
    candidates = screen.candidates(probe_candidates)
    explained = sample_live_latents(counts, explain_latents, seed)

    probed = candidates.flatten().unique()
    gather = ColumnGather(explained, sae.n, tokens)
    pre_activations = torch.empty(tokens, len(probed), device=device)
    for start, pre, codes in encoded_chunks(sae, activations, chunk):
        gather.update(codes)
        pre_activations[start : start + len(pre)] = pre.index_select(1, probed)

    metrics = probe_metrics(tasks, labels, [pre_activations[:, torch.searchsorted(probed, row)] for row in candidates])
    metrics.update(explain_metrics(gather.columns().cpu(), windows))
    metrics.update(n2g_metrics(sae, lm, site, explained, gather.columns().cpu(), windows, pad, chunk, seed))
    metrics.update(ablation_metrics(sae, lm, site, ablated, skip, ablation_tokens, lm_batch, seed, ablation_latents))
    return metrics
