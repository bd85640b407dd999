"""The TopK sparse autoencoder (Gao et al. 2024) and its initialisation.

    pre   = W_enc (x − b_pre) + b_enc                      (n pre-activations)
    z     = ReLU(TopK_k(pre))                              (k non-zeros per token)
    x̂     = W_dec z + b_pre

Inputs x are activations already normalised with the extraction's statistics:
x = (a − μ) / s, where μ is the mean activation and s² = E‖a − μ‖² / d, so that
E‖x‖² = d. μ and s are stored with the SAE so raw activations can be encoded.

Parameters are stored row-major per latent: ``W_enc`` and ``W_dec`` both have
shape (n, d); row i of ``W_dec`` is latent i's decoder direction (unit norm).
"""

from __future__ import annotations

import torch
from torch import nn


class TopKSAE(nn.Module):
    """A k-sparse autoencoder with n latents over d-dimensional inputs."""

    def __init__(self, d: int, n: int, k: int) -> None:
        super().__init__()
        if not 0 < k <= n:
            raise ValueError(f"k must be in 1..n, got k={k}, n={n}")
        self.d, self.n, self.k = d, n, k
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.register_buffer("act_mean", torch.zeros(d))
        self.register_buffer("act_scale", torch.ones(()))

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        """Unit-norm random decoder rows, encoder = decoder (the transpose in matrix
        form), b_enc = 0, b_pre = geometric median of ``sample`` (normalised inputs)."""
        directions = torch.randn(self.n, self.d, generator=generator)
        self.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_pre.copy_(geometric_median(sample.float()))

    def set_normalisation(self, mean: torch.Tensor, scale: float) -> None:
        """Store μ and s so that ``normalise`` maps raw activations a to (a − μ) / s."""
        self.act_mean.copy_(mean)
        self.act_scale.fill_(scale)

    def normalise(self, activations: torch.Tensor) -> torch.Tensor:
        """Raw activations a → (a − μ) / s."""
        return (activations - self.act_mean) / self.act_scale

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised x → s·x + μ (the inverse of ``normalise``)."""
        return x * self.act_scale + self.act_mean

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """pre = (x − b_pre) W_encᵀ + b_enc, shape (B, n)."""
        return torch.addmm(self.b_enc, x - self.b_pre, self.W_enc.t())

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latents of each row: (indices (B, k) int64, values (B, k) ≥ 0).

        ``k`` defaults to the SAE's own k; another value evaluates it as Multi-TopK does."""
        return self.select(self.pre_activations(x), k)

    def select(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, ReLU(values)) of the k largest pre-activations of each row."""
        values, indices = pre.topk(k or self.k, dim=1, sorted=False)
        return indices, values.relu()

    def decode(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x̂ = b_pre + Σ_j values_j · W_dec[indices_j], a gather of k rows per token."""
        return sparse_decode(self.W_dec, indices, values) + self.b_pre

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Reconstruction x̂ of normalised inputs x."""
        return self.decode(*self.encode(x, k))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient g its component along the row w:
        g ← g − (g·w) w  (w unit norm), so a step changes directions, not norms."""
        grad = self.W_dec.grad
        if grad is not None:  # one batched dot product per row and an in-place update: no (n, d) temporary
            parallel = torch.bmm(grad.unsqueeze(1), self.W_dec.unsqueeze(2)).view(-1, 1)
            grad.addcmul_(parallel, self.W_dec, value=-1)


def sparse_decode(W_dec: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_j values[b, j] · W_dec[indices[b, j]] for each row b: shape (B, d), without b_pre."""
    return nn.functional.embedding_bag(
        indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point m minimising Σ_i ‖p_i − m‖, by Weiszfeld's iterations
    m ← Σ_i w_i p_i / Σ_i w_i with w_i = 1 / max(‖p_i − m‖, ε), started at the mean."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * median.norm().clamp_min(1.0):
            break
    return median
