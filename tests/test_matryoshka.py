"""Matryoshka SAEs: the loss is the weighted sum of the nested prefixes' losses, and on data
with a frequency hierarchy the first prefix alone reconstructs the input (the standard
architecture tests in test_architectures.py cover them too)."""

from __future__ import annotations

import pytest
import torch

from saesweep.core.errors import UserError
from saesweep.plan.cells import make_cell
from saesweep.sae.base import StepContext, batch_variance
from saesweep.sae.catalog import prefix_widths, problem
from saesweep.sae.registry import build_sae, resolve_params

MATRYOSHKAS = ["matryoshka", "matryoshkatopk"]


def test_prefix_widths_halve_from_the_full_width() -> None:
    assert prefix_widths(128, 5) == (8, 16, 32, 64, 128)  # the reference's n/16, n/8, n/4, n/2, n
    assert prefix_widths(100, 3) == (25, 50, 100)
    assert prefix_widths(64, 1) == (64,)
    assert problem(8, {"prefixes": 4}) is None and "2^(prefixes − 1) = 16" in problem(8, {"prefixes": 5})


def test_prefix_parameters_are_in_cell_names_and_checked() -> None:
    assert make_cell("matryoshka", 512, {"k": 32}, 0).name == "matryoshka-n512-k32-s0"
    assert make_cell("matryoshka", 512, {"k": 32, "prefixes": 3, "inner_weight": 0.5}, 0).name == (
        "matryoshka-n512-k32-p3-iw0.5-s0")
    with pytest.raises(UserError, match="prefixes"):
        resolve_params("matryoshkatopk", {"k": 4, "prefixes": 0}, "sweep.archs.matryoshkatopk")


@pytest.mark.parametrize("name", MATRYOSHKAS)
def test_loss_is_the_weighted_sum_of_the_prefix_losses(name: str) -> None:
    d, n, k = 16, 64, 4
    params = resolve_params(name, {"k": k, "prefixes": 3, "inner_weight": 0.5}, "test")
    sae = build_sae(name, d, n, params).double()
    generator = torch.Generator().manual_seed(0)
    sae.initialise(torch.randn(256, d, generator=generator, dtype=torch.float64), generator)
    with torch.no_grad():
        sae.b_enc.add_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))
    x = torch.randn(32, d, generator=generator, dtype=torch.float64)
    context = StepContext(dead_mask=None, k_aux=0, aux_coef=0.0, progress=0.5, fire_threshold=1e-3)
    loss, parts, _ = sae.training_loss(x, context)

    # by hand: the selection, then each prefix's reconstruction from its own latents only
    with torch.no_grad():
        pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
        if name == "matryoshka":  # the k·B largest of the batch
            bound = pre.flatten().topk(k * x.shape[0]).values.min()
            codes = pre.relu() * (pre >= bound)
        else:  # the k largest of each token
            bound = pre.topk(k, dim=1).values[:, -1:]
            codes = pre.relu() * (pre >= bound)
        variance = ((x - x.mean(dim=0)) ** 2).sum()
        prefix_losses = [((x - codes[:, :m] @ sae.W_dec[:m] - sae.b_pre) ** 2).sum() / variance for m in (16, 32, 64)]
        weights = [0.25 / 1.75, 0.5 / 1.75, 1 / 1.75]
        expected = sum(w * prefix for w, prefix in zip(weights, prefix_losses))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["mse"], prefix_losses[-1], rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["prefix_mse"], prefix_losses[0], rtol=1e-12, atol=0)
    # the test tells the weighted sum from the full width's loss and from the unweighted mean
    assert min(abs(expected - prefix_losses[-1]), abs(expected - sum(prefix_losses) / 3)) > 1e-4
    torch.testing.assert_close(batch_variance(x), variance)


# --- the Matryoshka property on planted data with a frequency hierarchy -------------------------

D, DIRECTIONS, N, TOKENS = 32, 64, 128, 16384


def hierarchical_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, directions): 64 planted unit directions in d = 32; direction i fires with
    probability 0.9 (i + 1)^−0.8 (about 6.7 active per token, the first few on most tokens),
    with magnitudes uniform in [1, 2]."""
    directions = torch.randn(DIRECTIONS, D, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    probability = 0.9 * torch.arange(1, DIRECTIONS + 1, dtype=torch.float32) ** -0.8
    fires = torch.rand(TOKENS, DIRECTIONS, generator=generator) < probability
    magnitudes = 1 + torch.rand(TOKENS, DIRECTIONS, generator=generator)
    return (fires * magnitudes) @ directions, directions


def train(name: str, x: torch.Tensor, params: dict, steps: int = 600, batch: int = 256):
    """An SAE of ``name`` trained with Adam (lr 3e-3) on batches of x."""
    generator = torch.Generator().manual_seed(1)
    sae = build_sae(name, D, N, resolve_params(name, params, "test"))
    sae.initialise(x[:512], generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    context = StepContext(dead_mask=None, k_aux=0, aux_coef=0.0, progress=0.5, fire_threshold=1e-3)
    for step in range(steps):
        start = (step * batch) % TOKENS
        sae.training_step(x[start:start + batch], context)
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return sae


def first_latents_nmse(sae, x: torch.Tensor, width: int) -> float:
    """NMSE of the reconstruction from the inference codes of latents 0 … width − 1 only."""
    with torch.no_grad():
        codes = sae.encode(x).to_dense()
        codes[:, width:] = 0
        error = x - sae.decode(codes)
        return float(error.pow(2).sum() / batch_variance(x))


def test_first_prefix_alone_reconstructs_far_better_than_as_many_batchtopk_latents() -> None:
    x, _ = hierarchical_data(torch.Generator().manual_seed(0))
    params = {"k": 7}
    matryoshka, plain = train("matryoshka", x, params), train("batchtopk", x, params)
    full = first_latents_nmse(matryoshka, x, N), first_latents_nmse(plain, x, N)
    assert max(full) < 0.25, f"both must reconstruct with every latent: NMSE {full}"
    # the first two prefixes (8 and 16 latents; measured NMSE 0.60 vs 0.90 and 0.39 vs 0.85)
    for width, ratio in zip(prefix_widths(N, 5)[:2], (0.8, 0.6)):
        first = first_latents_nmse(matryoshka, x, width), first_latents_nmse(plain, x, width)
        assert first[0] < ratio * first[1], f"first {width} latents: Matryoshka NMSE {first[0]:.3f}, BatchTopK {first[1]:.3f}"
