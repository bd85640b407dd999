"""The loss of one TopK SAE training step and its gradients.

Shared definitions (B tokens, x normalised inputs of shape (B, d)):

    pre    = (x − b_pre) W_encᵀ + b_enc
    (I, v) = TopK_k(pre);  z = ReLU(v)
    x̂      = b_pre + Σ_j z_j W_dec[I_j]
    e      = x − x̂
    V      = ‖x − mean_batch(x)‖²_F                       (the batch's total variance)
    L_mse  = ‖e‖²_F / V                                   (normalised MSE of the batch)

AuxK (only when some latents are dead): with k_a = min(k_aux, number of dead latents),
    (I_a, v_a) = TopK_{k_a}(pre restricted to dead latents);  z_a = ReLU(v_a)
    ê      = Σ_j z_a,j W_dec[I_a,j]                       (no b_pre: e already excludes it)
    L_aux  = ‖stopgrad(e) − ê‖²_F / V
    L      = L_mse + α · L_aux

``dense_reference_step`` computes these with plain autograd on dense tensors; it is the
reference every faster implementation is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saesweep.sae import TopKSAE


@dataclass
class StepOutput:
    """What one step reports: the total loss and its parts (detached scalars), and the
    selected latents (indices (B, k), ReLU'd values (B, k)) for dead-latent tracking."""

    loss: torch.Tensor
    mse_loss: torch.Tensor
    aux_loss: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor


def dense_reference_step(
    sae: TopKSAE,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    aux_coef: float,
) -> StepOutput:
    """Loss and gradients (written to each parameter's ``.grad``) by dense autograd."""
    sae.zero_grad(set_to_none=True)
    pre = sae.pre_activations(x)
    values, indices = pre.topk(sae.k, dim=1, sorted=False)
    latents = torch.zeros_like(pre).scatter(1, indices, values.relu())
    reconstruction = latents @ sae.W_dec + sae.b_pre
    error = x - reconstruction
    variance = (x - x.mean(dim=0)).pow(2).sum()
    mse_loss = error.pow(2).sum() / variance
    aux_loss = torch.zeros((), dtype=x.dtype, device=x.device)
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if n_dead > 0 and k_aux > 0 and aux_coef > 0:
        dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
        aux_values, aux_indices = dead_pre.topk(min(k_aux, n_dead), dim=1, sorted=False)
        aux_latents = torch.zeros_like(pre).scatter(1, aux_indices, aux_values.relu())
        aux_reconstruction = aux_latents @ sae.W_dec
        aux_loss = (error.detach() - aux_reconstruction).pow(2).sum() / variance
    loss = mse_loss + aux_coef * aux_loss
    loss.backward()
    return StepOutput(
        loss.detach(), mse_loss.detach(), aux_loss.detach(), indices, values.detach().relu()
    )
