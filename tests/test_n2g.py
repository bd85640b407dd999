"""N2G explanations (evaluation.n2g) against plain n-grams (evaluation.explain)."""

from __future__ import annotations

import math

import torch

from saesweep.evaluation.explain import explainability
from saesweep.evaluation.n2g import N2GExplanation, explain_latent_n2g, n2g_explainability, score_n2g, training_examples

A, B, PAD, VOCAB = 1, 2, 0, 60


def a_star_b(sequence: list[int]) -> float:
    """The planted latent: 1 at a B whose token two places back is A, whatever lies between."""
    return 1.0 if len(sequence) >= 3 and sequence[-1] == B and sequence[-3] == A else 0.0


def planted_windows(seed: int, count: int = 200, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (count, width), generator=g)
    for row in range(count):  # plant "A x B" in most windows and a lone B in all
        if row % 4:
            start = int(torch.randint(0, width - 3, (1,), generator=g))
            tokens[row, start], tokens[row, start + 2] = A, B
        tokens[row, int(torch.randint(0, width, (1,), generator=g))] = B
    acts = torch.tensor([[a_star_b(row[: c + 1]) for c in range(width)] for row in tokens.tolist()])
    return tokens, acts


def model(sequences: list[list[int]]) -> list[float]:
    return [a_star_b(s) for s in sequences]


def test_n2g_finds_a_wildcard_pattern_that_plain_ngrams_cannot() -> None:
    train_tokens, train_acts = planted_windows(0)
    test_tokens, test_acts = planted_windows(1)
    explanation = explain_latent_n2g(model, training_examples(train_tokens, train_acts, 10, 10, seed=0), PAD)
    assert {pattern for pattern, _, _ in explanation.patterns} == {(A, None, B)}
    assert score_n2g(explanation, test_tokens, test_acts) == (1.0, 1.0)
    ngrams = explainability(train_tokens, train_acts[..., None], test_tokens, test_acts[..., None], top=20)
    assert ngrams["recall"][0] < 0.6  # the trigrams seen in training name only their own middle tokens
    n2g = n2g_explainability(lambda latent: model, [0], train_tokens, train_acts[..., None], test_tokens,
                             test_acts[..., None], PAD, top=10, random=10, seed=0)
    assert n2g["precision"].tolist() == n2g["recall"].tolist() == [1.0]


def test_an_activation_that_needs_the_start_is_anchored() -> None:
    """A latent that fires on the first token, whatever it is: its pattern is a wildcard
    anchored at the start, so it is predicted at every window's first token and nowhere else
    (the first check of explanations.py's own examples)."""
    def first(sequences: list[list[int]]) -> list[float]:
        return [1.0 if len(s) == 1 else 0.0 for s in sequences]

    explanation = explain_latent_n2g(first, [training_examples(torch.tensor([[5, 6, 7]]), torch.tensor([[1.0, 0, 0]]), 1, 0, 0)[0]], PAD)
    assert explanation.patterns == [((None,), True, 1.0)]
    assert explanation.predict([5, 6, 5]) == [1.0, 0.0, 0.0] == explanation.predict([9, 5, 7])


def test_prediction_prefers_the_token_to_the_wildcard_and_scores_nan_without_predictions() -> None:
    explanation = N2GExplanation()
    explanation.add([A, None, B], False, 2.0)
    explanation.add([7, B], False, 3.0)
    assert explanation.predict([A, 7, B, 9, 9, B]) == [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    assert explanation.predict([A, 8, B]) == [0.0, 0.0, 2.0]
    precision, recall = score_n2g(N2GExplanation(), torch.tensor([[3, 4]]), torch.tensor([[1.0, 0.0]]))
    assert math.isnan(precision) and recall == 0.0
