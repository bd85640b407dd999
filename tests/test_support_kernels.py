"""The support kernels' pieces that the standard tests do not reach on their own."""

from __future__ import annotations

import pytest
import torch

from saesweep.sae.registry import build_sae, resolve_params


@pytest.mark.parametrize("theta", [float("nan"), 0.5, 1.0, 5.0])
def test_batch_selection_is_the_exact_top_k_times_batch(theta: float) -> None:
    """Whatever θ is (none yet, below the k·B-th value, near it, far above it), BatchTopK's
    training selection is the k·B largest entries of ReLU(pre): θ is only a hint for where
    to look."""
    sae = build_sae("batchtopk", 8, 256, resolve_params("batchtopk", {"k": 16}, "test"))
    sae.threshold.fill_(theta)
    pre = torch.randn(64, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = pre.flatten().topk(16 * 64).indices.sort().values
    support = sae.batch_selection(pre)
    assert torch.equal(support.rows * 256 + support.cols, expected)
