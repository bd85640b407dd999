"""N2G-style explainability of latents by n-gram explanations (no model re-runs).

Data: token windows ``tokens`` (W, C) int and one latent's activations ``acts`` (W, C);
the latent *fires* at a position when act > threshold. An n-gram at position (w, c) is
the tuple tokens[w, c−n+1 .. c] (it ends at the token itself and never crosses windows;
it exists only for c ≥ n−1).

Algorithm (``explain_latent``), on the training windows:
 1. Take the ``top`` firing positions with the largest activations (ties: first in
    row-major order).
 2. Training precision of an n-gram g: #{positions where g occurs and the latent fires}
    / #{positions where g occurs}.
 3. For each top position, pick among its n-grams (n = 1..max_ngram) the shortest whose
    training precision is ≥ ``min_precision``; if none is, the most precise one (the
    shorter on ties).
 4. The explanation is the set of picked n-grams.
Prediction (``score_explanation``), on held-out windows: the latent is predicted to fire
at (w, c) iff some pattern of the explanation occurs ending at (w, c). Then
    precision = #(predicted ∧ fires) / #predicted,   recall = #(predicted ∧ fires) / #fires,
each nan when its denominator is 0 (e.g. a latent that never fires in training has an
empty explanation: precision nan; recall 0, or nan if it never fires held-out either).
Everything is computed on the CPU (inputs are moved there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NAN = float("nan")


@dataclass(frozen=True)
class Explanation:
    """The n-gram patterns (token ids, last = the activating token) explaining a latent,
    each with its training precision, and the firing threshold they were built for."""

    patterns: tuple[tuple[int, ...], ...]
    train_precision: tuple[float, ...]
    threshold: float


class _NgramIndex:
    """Integer keys of every n-gram (n ≤ max_ngram) of a (W, C) token tensor.

    key(t_{c−n+1}, …, t_c) = Σ_i (t_{c−n+1+i} + 1) · base^(n−1−i), base > max token + 1,
    so keys of all lengths are distinct; positions with c < n−1 get key −1."""

    def __init__(self, tokens: torch.Tensor, max_ngram: int, base: int) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (W, C), got shape {tuple(tokens.shape)}")
        if max_ngram < 1 or base ** max_ngram >= 2**63:
            raise ValueError(f"max_ngram={max_ngram} too large for a vocabulary of {base - 2}")
        tokens = tokens.cpu()
        t = tokens.long() + 1
        c = t.shape[1]
        self.tokens, self.base, self.keys = tokens.long(), base, []
        key = torch.zeros_like(t)
        for n in range(1, max_ngram + 1):
            lead = torch.zeros_like(t)
            lead[:, n - 1 :] = t[:, : c - n + 1]
            key = key + lead * base ** (n - 1)
            valid = key.clone()
            valid[:, : n - 1] = -1
            self.keys.append(valid.reshape(-1))
        self._unique: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def key_of(self, pattern: tuple[int, ...]) -> int:
        return sum((tok + 1) * self.base ** (len(pattern) - 1 - i) for i, tok in enumerate(pattern))

    def occurrences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted unique keys, inverse over the concatenated valid keys, counts, and the
        flat position of each concatenated key)."""
        if self._unique is None:
            flat = torch.cat(self.keys)
            keep = flat >= 0
            positions = torch.arange(flat.numel()) % self.keys[0].numel()
            unique, inverse, counts = torch.unique(flat[keep], return_inverse=True, return_counts=True)
            self._unique = (unique, inverse, counts, positions[keep])
        return self._unique

    def predict(self, patterns: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """Flat bool (W·C,): some pattern ends at the position."""
        hit = torch.zeros(self.keys[0].numel(), dtype=torch.bool)
        for n, keys in enumerate(self.keys, start=1):
            wanted = torch.tensor([self.key_of(p) for p in patterns if len(p) == n], dtype=torch.long)
            if wanted.numel():
                hit |= torch.isin(keys, wanted)
        return hit


def _base(*tensors: torch.Tensor) -> int:
    return max((int(t.max().item()) for t in tensors if t.numel()), default=0) + 2


def _explain(index: _NgramIndex, acts: torch.Tensor, top: int, threshold: float, min_precision: float) -> Explanation:
    acts = acts.cpu()
    fires = acts.reshape(-1) > threshold
    unique, inverse, counts, positions = index.occurrences()
    fire_counts = torch.bincount(inverse, weights=fires[positions].double(), minlength=unique.numel())
    precision = fire_counts / counts
    flat_acts = acts.reshape(-1).double().masked_fill(~fires, -torch.inf)
    order = torch.sort(flat_acts, descending=True, stable=True).indices[: min(top, int(fires.sum()))]
    width = index.tokens.shape[1]
    chosen: dict[tuple[int, ...], float] = {}
    for flat in order.tolist():
        w, c = divmod(flat, width)
        best: tuple[float, tuple[int, ...]] | None = None
        for n, keys in enumerate(index.keys, start=1):
            if c < n - 1:
                break
            slot = int(torch.searchsorted(unique, keys[flat]).item())
            prec = precision[slot].item()
            gram = tuple(index.tokens[w, c - n + 1 : c + 1].tolist())
            if prec >= min_precision:
                best = (prec, gram)
                break
            if best is None or prec > best[0]:
                best = (prec, gram)
        if best is not None:
            chosen[best[1]] = best[0]
    patterns = tuple(sorted(chosen, key=lambda g: (len(g), g)))
    return Explanation(patterns, tuple(chosen[p] for p in patterns), threshold)


def _score(index: _NgramIndex, expl: Explanation, acts: torch.Tensor) -> tuple[float, float]:
    fires = acts.cpu().reshape(-1) > expl.threshold
    predicted = index.predict(expl.patterns)
    both = int((predicted & fires).sum())
    n_pred, n_fire = int(predicted.sum()), int(fires.sum())
    return (both / n_pred if n_pred else NAN), (both / n_fire if n_fire else NAN)


def explain_latent(
    train_tokens: torch.Tensor,
    train_acts: torch.Tensor,
    max_ngram: int = 3,
    top: int = 20,
    threshold: float = 0.0,
    min_precision: float = 0.5,
) -> Explanation:
    """The n-gram explanation of one latent from training windows (W, C) of token ids and
    its activations (W, C); the algorithm is in the module docstring."""
    index = _NgramIndex(train_tokens, max_ngram, _base(train_tokens))
    return _explain(index, train_acts, top, threshold, min_precision)


def score_explanation(expl: Explanation, test_tokens: torch.Tensor, test_acts: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) of the explanation's predictions vs the latent firing
    (act > expl.threshold) on held-out windows (W, C)."""
    max_n = max((len(p) for p in expl.patterns), default=1)
    pattern_max = max((max(p) for p in expl.patterns), default=0)
    base = max(_base(test_tokens), pattern_max + 2)
    return _score(_NgramIndex(test_tokens, max_n, base), expl, test_acts)


def explainability(
    tokens_train: torch.Tensor,
    acts_train: torch.Tensor,
    tokens_test: torch.Tensor,
    acts_test: torch.Tensor,
    max_ngram: int = 3,
    top: int = 20,
    threshold: float = 0.0,
    min_precision: float = 0.5,
) -> dict[str, object]:
    """Explain and score each of m sampled latents: acts_* are (W, C, m).

    Returns mean_precision and mean_recall (means over the latents whose value is not
    nan), precision and recall (m,) float64 tensors, n_scored (latents with a finite
    precision) and the explanations."""
    base = _base(tokens_train, tokens_test)
    train_index = _NgramIndex(tokens_train, max_ngram, base)
    test_index = _NgramIndex(tokens_test, max_ngram, base)
    m = acts_train.shape[-1]
    precision = torch.empty(m, dtype=torch.float64)
    recall = torch.empty(m, dtype=torch.float64)
    explanations = []
    for j in range(m):
        expl = _explain(train_index, acts_train[..., j], top, threshold, min_precision)
        precision[j], recall[j] = _score(test_index, expl, acts_test[..., j])
        explanations.append(expl)
    return {
        "mean_precision": precision.nanmean().item(),
        "mean_recall": recall.nanmean().item(),
        "precision": precision,
        "recall": recall,
        "n_scored": int((~precision.isnan()).sum()),
        "explanations": explanations,
    }
