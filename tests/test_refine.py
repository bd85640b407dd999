"""Refinement (least squares on the code's support) and the latent-density histogram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from saesweep.evaluation.density import DENSITY_BINS, density_edges, density_metrics
from saesweep.evaluation.metrics import fvu
from saesweep.evaluation.refine import RefinementAccumulator, decoder_gram, nnls_gram, padded_support, refine_codes
from saesweep.sae.topk import TopKSAE


def planted(shrink: float, seed: int = 0) -> tuple[TopKSAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = Σ true values · D over 3 of 24 unit atoms in d = 16 (b_pre = 0), and CSR codes with
    the true support whose values are the true ones times ``shrink``."""
    g = torch.Generator().manual_seed(seed)
    d, n, b = 16, 24, 64
    sae = TopKSAE(d, n, {"k": 3})
    atoms = torch.randn(n, d, generator=g)
    with torch.no_grad():
        sae.W_dec.copy_(atoms / atoms.norm(dim=1, keepdim=True))
        sae.b_pre.zero_()
    support = torch.stack([torch.randperm(n, generator=g)[:3] for _ in range(b)])
    values = 1 + torch.rand(b, 3, generator=g)
    dense = torch.zeros(b, n).scatter(1, support, values)
    x = (dense @ sae.W_dec).detach()
    return sae, x, dense, (dense * shrink).to_sparse_csr()


@pytest.mark.parametrize("shrink", [0.5, 0.8, 1.3])
def test_refinement_recovers_the_planted_values(shrink: float) -> None:
    sae, x, dense, codes = planted(shrink)
    refined, sums, kkt = refine_codes(sae, x, codes)
    assert refined.numpy() == pytest.approx(x.numpy(), abs=1e-4)  # the true values reconstruct x exactly
    assert (sums[0] / sums[1]).item() == pytest.approx(1 / shrink, rel=1e-4)  # the planted shrinkage
    assert kkt.max().item() < 1e-6
    accumulator = RefinementAccumulator(tokens=40)  # of 64: the rest is left out
    accumulator.update(sae, x[:32], codes.to_dense()[:32].to_sparse_csr())
    accumulator.update(sae, x[32:], codes.to_dense()[32:].to_sparse_csr())
    nmse = fvu(x[:40], sae.decode(codes)[:40])
    result = accumulator.result()
    assert result["refine_tokens"] == 40
    assert nmse > 0.01 and result["refined_nmse"] < 1e-8
    assert result["refine_nmse_gain"] == pytest.approx(1.0, abs=1e-6)
    assert accumulator.original.result()["normalised_mse"] == pytest.approx(nmse, rel=1e-6)
    assert result["shrinkage_ratio"] == pytest.approx(1 / shrink, rel=1e-4)


def test_nnls_matches_an_exact_solver_where_the_bound_is_active() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 20, 6, generator=g, dtype=torch.float64)  # 8 problems, 6 atoms in 20 dimensions
    target = torch.randn(8, 20, generator=g, dtype=torch.float64)
    gram, b = a.transpose(1, 2) @ a, (a.transpose(1, 2) @ target.unsqueeze(2)).squeeze(2)
    c = nnls_gram(gram, b, torch.zeros_like(b), iterations=3000)
    for i in range(8):
        exact, _ = nnls(a[i].numpy(), target[i].numpy())
        assert c[i].numpy() == pytest.approx(exact, abs=1e-6)
    assert (c == 0).any()  # some constraints bind: not plain least squares


def test_padded_support_keeps_ragged_rows() -> None:
    codes = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).to_sparse_csr()
    indices, values, mask = padded_support(codes)
    assert indices.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert values.tolist() == [[2.0, 3.0], [0.0, 0.0], [1.0, 0.0]]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


def test_density_histogram_counts_sum_to_n_and_dense_latents_are_counted() -> None:
    n_tokens = 1000
    counts = torch.tensor([0, 0, 1, 5, 50, 100, 101, 400, 1000, 3])
    result = density_metrics(counts, n_tokens)
    histogram = result["firing_histogram"]
    assert sum(histogram["counts"]) + histogram["dead"] == len(counts)
    assert histogram["dead"] == 2
    assert len(histogram["counts"]) == DENSITY_BINS
    assert histogram["log10_frequency_edges"] == pytest.approx(density_edges().tolist())
    assert result["dense_fraction"] == pytest.approx(3 / 10)  # 101, 400, 1000 of 1000 tokens: > 10 %
    # density 1e-3 (count 1) sits in the bin [−3, −2.75)
    assert histogram["counts"][int(np.searchsorted(density_edges(), -3.0, side="right")) - 1] == 1


def test_the_gathered_gram_gives_the_multiplied_one() -> None:
    sae, x, _, codes = planted(0.7, seed=3)
    multiplied = refine_codes(sae, x, codes)
    gathered = refine_codes(sae, x, codes, decoder_gram(sae))
    for a, b in zip(multiplied, gathered):
        assert torch.allclose(a.double(), b.double(), atol=1e-5)
