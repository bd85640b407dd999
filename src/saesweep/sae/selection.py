"""What a TopK-family training step reports, Multi-TopK's second selection and the sparse
decode: shared by the step's two product paths (``topk_kernels`` on the CPU, ``topk_gather`` on CUDA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SelectionStep:
    """What one step reports: the total loss and its parts (detached scalars; ``wide_loss``
    is Multi-TopK's unweighted L_mse at k_w, 0 without it), and the selected latents
    (indices (B, k), ReLU'd values (B, k)) for dead-latent tracking."""

    loss: torch.Tensor
    mse_loss: torch.Tensor
    aux_loss: torch.Tensor
    wide_loss: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Wide:
    """Multi-TopK's second selection: ``k`` latents, its loss weighted by ``weight``."""

    k: int
    weight: float


def sparse_decode(W_dec: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_j values[b, j] · W_dec[indices[b, j]] for each row b: shape (B, d), without b_pre."""
    return nn.functional.embedding_bag(
        indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )
