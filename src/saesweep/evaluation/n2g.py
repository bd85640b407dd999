"""Neuron-to-Graph (N2G) explanations of latents, as Gao et al. 2024 (§4.3) build them with
openai/sparse_autoencoder's ``explanations.py``: patterns of tokens ending at the activating
token, with wildcards, found by re-running the model on shortened inputs.

A latent is seen through ``activation``: token-id sequences → the latent's value at each
sequence's last token (the model run on that sequence alone). From each training example
(a window, the position of an activation there and its value a₀; the examples are the top
activations and random positive ones):

1. truncate the window after the activating token;
2. shortest activating suffix: the shortest suffix s of the truncated window (at most
   ``max_length`` tokens) with activation(s) ≥ ½·a₀; if none, the ``max_length`` suffix;
   its activation is a_s;
3. anchored: whether the suffix needs the start of the input, i.e. activation(pad + s) <
   ½·a₀ (``pad`` a neutral token);
4. saliency of each token i of s: 1 − activation(s with token i replaced by pad) / a_s; a
   token with saliency < ½ becomes a wildcard ``*`` (matches any token);
5. the explanation is the set of these patterns (a trie read from the last token backwards,
   as in ``explanations.py``), each carrying its a_s.

Prediction at position c of a window: walk the trie backwards from token c, at each step
taking the child of the token itself if there is one, else the wildcard child; the first
node reached that ends a pattern gives the prediction a_s; an anchored pattern matches only
when its first token is the window's first. No match predicts 0. The latent is predicted to
fire where the prediction is > 0, and (as for the n-gram explanations) precision =
#(predicted ∧ fires) / #predicted and recall = #(predicted ∧ fires) / #fires on held-out
windows, nan for a zero denominator.

Public entry points (the feature browser's too): ``explain_latent_n2g`` (examples →
``N2GExplanation``, whose ``patterns`` are readable and whose ``predict`` scores windows),
and ``n2g_explainability`` for a set of latents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

NAN = float("nan")
WILDCARD = -1
"""The trie's key of a wildcard token."""
START = -2
"""The trie's key marking a pattern anchored at the start of the input."""
VALUE = -3
"""The trie's key of the activation a pattern predicts."""
KEEP = 0.5
"""A shortened input must keep this fraction of the activation; saliency below it is a wildcard."""
N2G_TOP = 4
"""Training examples per latent: its largest activations …"""
N2G_RANDOM = 4
"""… and this many of its other positive activations drawn at random."""
MAX_LENGTH = 6
"""The longest suffix tried (``explain_latent_n2g``)."""

Activation = Callable[[list[list[int]]], list[float]]
"""Token-id sequences → the latent's value at each sequence's last token."""


@dataclass(frozen=True)
class Example:
    """One training activation: the window's token ids, the position of the activating token and its value."""

    tokens: tuple[int, ...]
    position: int
    value: float


@dataclass
class N2GExplanation:
    """A trie of token patterns read backwards from the activating token (module docstring)."""

    trie: dict[int, Any] = field(default_factory=dict)
    patterns: list[tuple[tuple[int | None, ...], bool, float]] = field(default_factory=list)
    """(tokens first to last with None for a wildcard, anchored at the start, predicted value) per pattern."""

    def add(self, tokens: Sequence[int | None], anchored: bool, value: float) -> None:
        node = self.trie
        for token in reversed(tokens):
            node = node.setdefault(WILDCARD if token is None else token, {})
        if anchored:
            node = node.setdefault(START, {})
        node[VALUE] = value
        self.patterns.append((tuple(tokens), anchored, value))

    def predict(self, tokens: Sequence[int]) -> list[float]:
        """The predicted activation at every position of one window of token ids."""
        out = []
        for end in range(len(tokens)):
            node, value = self.trie, 0.0
            for index in range(end, -1, -1):
                node = node.get(tokens[index], node.get(WILDCARD))
                if node is None:
                    break
                if VALUE in node:
                    value = node[VALUE]
                    break
                if index == 0 and START in node:
                    value = node[START][VALUE]
            out.append(value)
        return out


def _last_values(activation: Activation, sequences: list[list[int]], batch: int) -> list[float]:
    out: list[float] = []
    for start in range(0, len(sequences), batch):
        out += activation(sequences[start : start + batch])
    return out


def explain_latent_n2g(
    activation: Activation, examples: Sequence[Example], pad: int, max_length: int = MAX_LENGTH, batch: int = 64,
) -> N2GExplanation:
    """The N2G explanation of one latent from its training ``examples`` (module docstring,
    steps 1–5); the model is run on every candidate of one step at once, ``batch`` sequences
    per call of ``activation``."""
    truncated = [list(example.tokens[: example.position + 1]) for example in examples]
    chosen: list[list[int] | None] = [None] * len(examples)
    values = [0.0] * len(examples)
    for length in range(1, max_length + 1):  # step 2, one suffix length for every example at a time
        pending = [i for i, t in enumerate(truncated) if chosen[i] is None and len(t) >= length]
        acts = _last_values(activation, [truncated[i][-length:] for i in pending], batch)
        for i, act in zip(pending, acts):
            if act >= KEEP * examples[i].value or length == min(max_length, len(truncated[i])):
                chosen[i], values[i] = truncated[i][-length:], act
    suffixes = [s for s in chosen if s is not None]
    padded = _last_values(activation, [[pad] + s for s in suffixes], batch)  # step 3
    replaced = [s[:i] + [pad] + s[i + 1 :] for s in suffixes for i in range(len(s))]  # step 4
    saliency_acts = iter(_last_values(activation, replaced, batch))
    explanation = N2GExplanation()
    for example, suffix, value, with_pad in zip(examples, suffixes, values, padded):
        without = [next(saliency_acts) for _ in suffix]
        if value <= 0:
            continue  # the suffix does not activate at all: nothing to explain with
        pattern = [token if 1.0 - act / value >= KEEP else None for token, act in zip(suffix, without)]
        explanation.add(pattern, with_pad < KEEP * example.value, value)
    return explanation


def score_n2g(explanation: N2GExplanation, windows: torch.Tensor, acts: torch.Tensor, threshold: float = 0.0) -> tuple[float, float]:
    """(precision, recall) of "predicted > 0" against "act > threshold" over held-out
    ``windows`` (W, C) of token ids with the latent's ``acts`` (W, C)."""
    predicted = torch.tensor([explanation.predict(row) for row in windows.tolist()]) > 0
    fires = acts.cpu() > threshold
    both = int((predicted & fires).sum())
    n_pred, n_fire = int(predicted.sum()), int(fires.sum())
    return (both / n_pred if n_pred else NAN), (both / n_fire if n_fire else NAN)


def training_examples(windows: torch.Tensor, acts: torch.Tensor, top: int, random: int, seed: int, threshold: float = 0.0) -> list[Example]:
    """The ``top`` largest activations above ``threshold`` of one latent over windows (W, C)
    (ties: first in row-major order) and ``random`` more drawn uniformly (seeded) among its
    other positive activations, as ``Example``s."""
    flat = acts.reshape(-1).double()
    firing = (flat > threshold).nonzero().squeeze(1)
    order = firing[torch.sort(flat[firing], descending=True, stable=True).indices]
    rest = order[top:]
    drawn = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:random]]
    width = windows.shape[1]
    rows = windows.tolist()
    return [Example(tuple(rows[i // width]), i % width, flat[i].item()) for i in torch.cat([order[:top], drawn]).tolist()]


def n2g_explainability(
    activation_of: Callable[[int], Activation], latents: Sequence[int], tokens_train: torch.Tensor, acts_train: torch.Tensor,
    tokens_test: torch.Tensor, acts_test: torch.Tensor, pad: int, top: int, random: int, seed: int,
    max_length: int = MAX_LENGTH,
) -> dict[str, Any]:
    """N2G explanations of ``latents`` from their training windows and scores on held-out
    ones: ``acts_*`` are (W, C, m); ``activation_of(latent)`` runs the model for one latent.
    Returns precision and recall (m,) float64 and the explanations."""
    m = len(latents)
    precision, recall = torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64)
    explanations = []
    for j, latent in enumerate(latents):
        examples = training_examples(tokens_train, acts_train[..., j], top, random, seed + j)
        explanation = explain_latent_n2g(activation_of(latent), examples, pad, max_length)
        precision[j], recall[j] = score_n2g(explanation, tokens_test, acts_test[..., j])
        explanations.append(explanation)
    return {"precision": precision, "recall": recall, "explanations": explanations}


def n2g_pad(tokenizer: Any) -> int:
    """The neutral token that shortened inputs are padded with and salient tokens replaced
    by: the last token of " _" (one token, " _", for GPT-2, as ``explanations.py`` uses)."""
    return int(tokenizer(" _", add_special_tokens=False)["input_ids"][-1])
