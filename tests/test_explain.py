import math

import torch

from saesweep.evaluation.explain import Explanation, explain_latent, explainability, score_explanation

V, A, B = 50, 7, 9  # vocabulary; the bigram (A, B)


def _windows(W, C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (W, C), generator=g), g


def _bigram_acts(tokens, g):
    """Fires (with varying strength) exactly where A is directly followed by B."""
    hit = torch.zeros(tokens.shape, dtype=torch.bool)
    hit[:, 1:] = (tokens[:, :-1] == A) & (tokens[:, 1:] == B)
    return hit.float() * (1.0 + torch.rand(tokens.shape, generator=g))


def _plant(tokens, g, count):
    """Plant `count` A B bigrams and as many B's after other tokens."""
    W, C = tokens.shape
    for _ in range(count):
        w, c = torch.randint(0, W, (1,), generator=g).item(), torch.randint(1, C, (1,), generator=g).item()
        tokens[w, c - 1], tokens[w, c] = A, B
        w, c = torch.randint(0, W, (1,), generator=g).item(), torch.randint(1, C, (1,), generator=g).item()
        if tokens[w, c - 1] != A:
            tokens[w, c] = B
    return tokens


def test_bigram_latent_is_explained_exactly():
    train, g = _windows(200, 32, 0)
    test, _ = _windows(200, 32, 1)
    train, test = _plant(train, g, 60), _plant(test, g, 60)
    expl = explain_latent(train, _bigram_acts(train, g))
    assert expl.patterns == ((A, B),)
    assert expl.train_precision == (1.0,)
    precision, recall = score_explanation(expl, test, _bigram_acts(test, g))
    assert precision == 1.0 and recall == 1.0


def test_random_latent_has_low_precision():
    train, g = _windows(200, 32, 2)
    test, _ = _windows(200, 32, 3)
    rate = 0.02
    train_acts = torch.rand(train.shape, generator=g) * (torch.rand(train.shape, generator=g) < rate)
    test_acts = torch.rand(test.shape, generator=g) * (torch.rand(test.shape, generator=g) < rate)
    expl = explain_latent(train, train_acts)
    assert 0 < len(expl.patterns) <= 20
    precision, recall = score_explanation(expl, test, test_acts)
    assert precision < 0.2 and recall < 0.2


def test_ngrams_do_not_cross_windows_and_unigrams_suffice():
    tokens = torch.tensor([[1, 2, 3], [3, 1, 2]])
    acts = (tokens == 3).float()
    expl = explain_latent(tokens, acts)
    assert expl.patterns == ((3,),)
    assert score_explanation(expl, tokens, acts) == (1.0, 1.0)
    # a trigram pattern cannot match at the first two positions of a window
    tri = Explanation(((1, 2, 3),), (1.0,), 0.0)
    test_tokens = torch.tensor([[2, 3, 0], [1, 2, 3]])
    test_acts = torch.tensor([[0, 1, 0], [0, 0, 1.0]])
    assert score_explanation(tri, test_tokens, test_acts) == (1.0, 0.5)


def test_explainability_over_sampled_latents():
    train, g = _windows(100, 16, 4)
    test, _ = _windows(100, 16, 5)
    train, test = _plant(train, g, 40), _plant(test, g, 40)

    def acts(tokens):
        return torch.stack(
            [_bigram_acts(tokens, g), (tokens == 11).float() * 2, torch.zeros(tokens.shape)], dim=-1
        )

    out = explainability(train, acts(train), test, acts(test))
    assert out["precision"][:2].tolist() == [1.0, 1.0] and out["recall"][:2].tolist() == [1.0, 1.0]
    assert math.isnan(out["precision"][2].item())  # dead latent: empty explanation
    assert out["n_scored"] == 2 and out["mean_precision"] == 1.0 and out["mean_recall"] == 1.0
    assert out["explanations"][1].patterns == ((11,),)
