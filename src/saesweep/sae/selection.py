"""What a TopK-family training step reports, Multi-TopK's second selection and the sparse
decode: shared by the step's two product paths (``topk_kernels`` on the CPU, ``topk_gather`` on CUDA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saesweep.sae.collectives import Collectives


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


def selection_step(
    mse_loss: torch.Tensor, aux_loss: torch.Tensor, aux_coef: float, wide: Wide | None, wide_loss: torch.Tensor,
    indices: torch.Tensor, latents: torch.Tensor,
) -> SelectionStep:
    """The step's report with its total loss L = L_mse + α · L_aux (+ w · L_mse(k_w) with Multi-TopK's ``wide``)."""
    loss = mse_loss + aux_coef * aux_loss + (wide.weight * wide_loss if wide is not None else 0)
    return SelectionStep(loss, mse_loss, aux_loss, wide_loss, indices, latents)


def sparse_decode(W_dec: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_j values[b, j] · W_dec[indices[b, j]] for each row b: shape (B, d), without b_pre."""
    return nn.functional.embedding_bag(
        indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )


def write_gradients(
    sae: nn.Module, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], grad_main: torch.Tensor, comm: Collectives
) -> None:
    """Set the step's gradients: ``grads`` = (∂W_dec, ∂W_enc, ∂b_enc) as computed, and
    ∂b_pre = Σ_b G_main,b − Σ_shards ∂b_enc W_enc (the decoder path plus the encoder path,
    summed over latent shards so every shard's b_pre gets the same gradient)."""
    sae.W_dec.grad, sae.W_enc.grad, sae.b_enc.grad = grads
    sae.b_pre.grad = grad_main.sum(dim=0) - comm.shard_sum(grads[2] @ sae.W_enc)
