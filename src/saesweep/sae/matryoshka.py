"""Matryoshka SAEs (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders", arXiv 2503.17547; Nabeshima 2024).

The dictionary's first m_1 < m_2 < … < m_P = n latents form nested prefixes, and each
prefix reconstructs the input on its own from the same codes z (its own latents' entries):

    x̂_j = z[:, :m_j] W_dec[:m_j] + b_pre,       m_j = ⌊n / 2^(P−j)⌋      (catalog.prefix_widths)
    L   = Σ_j w_j ‖x − x̂_j‖²_F / V + α · L_aux,  w_j = ρ^(P−j) / Σ_i ρ^(P−i)

so the first latents must explain the input alone: they learn the frequent, general
features, and the later ones refine them (less feature absorption). ρ = 1 (the default)
averages the prefixes' losses as bartbussmann/matryoshka_sae does (its mean also counts a
bias-only term, left out here); SAELens sums them (w_j = 1, the same up to a factor P that
Adam ignores, but which scales AuxK's weight α relative to the rest). AuxK reconstructs the
full width's error (SAELens' default, ``use_matryoshka_aux_loss`` off). The full prefix
x̂_P is the SAE's reconstruction, and its L_mse is the reported ``mse``.

``MatryoshkaBatchTopKSAE`` selects z as BatchTopK does (``batchtopk``: the k·B largest
entries of the batch in training, one threshold θ at inference, so SAELens loads it as a
JumpReLU SAE, as it saves its own); ``MatryoshkaTopKSAE`` as TopK does (k per token). Both
train by plain autograd of ``training_loss`` (no faster step), on one process.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saesweep.sae.base import Parameter, SparseAutoencoder, StepContext, StepOutput, auxk_loss, batch_variance
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.catalog import INNER_WEIGHT, MATRYOSHKA, MATRYOSHKATOPK, PREFIXES, prefix_widths
from saesweep.sae.topk import TopKSAE

REFERENCE = "Bussmann et al. 2025, Learning Multi-Level Features with Matryoshka Sparse Autoencoders (bartbussmann/matryoshka_sae)"


def prefix_weights(prefixes: int, ratio: float) -> tuple[float, ...]:
    """w_j = ρ^(P−j) / Σ_i ρ^(P−i), j = 1 … P (0⁰ = 1: ρ = 0 weighs the full width only)."""
    raw = [ratio ** (prefixes - j) for j in range(1, prefixes + 1)]
    return tuple(weight / sum(raw) for weight in raw)


class MatryoshkaLoss(SparseAutoencoder):
    """The nested-prefix loss, shared by the Matryoshka architectures (mixed in first)."""

    def prefix_widths(self) -> tuple[int, ...]:
        """m_1 < … < m_P = n (``catalog.prefix_widths``)."""
        return prefix_widths(self.n, int(self.params[PREFIXES.name]))

    def prefix_weights(self) -> tuple[float, ...]:
        """w_1 … w_P (``prefix_weights``)."""
        return prefix_weights(int(self.params[PREFIXES.name]), float(self.params[INNER_WEIGHT.name]))

    def nested_losses(self, x: torch.Tensor, codes: torch.Tensor, variance: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([‖x − x̂_j‖²_F / V for j = 1 … P], x − x̂_P) for dense codes z (B, n): each prefix
        adds its new latents' products to the previous prefix's reconstruction."""
        reconstruction = self.b_pre.expand_as(x)
        losses, start = [], 0
        for width in self.prefix_widths():
            reconstruction = reconstruction + codes[:, start:width] @ self.W_dec[start:width]
            losses.append((x - reconstruction).pow(2).sum() / variance)
            start = width
        return losses, x - reconstruction

    def matryoshka_loss(self, x: torch.Tensor, pre: torch.Tensor, codes: torch.Tensor, context: StepContext):
        """(L, its parts, codes) of the module docstring for training codes z of pre-activations pre."""
        variance = batch_variance(x)
        losses, error = self.nested_losses(x, codes, variance)
        nested = sum(weight * loss for weight, loss in zip(self.prefix_weights(), losses))
        aux = auxk_loss(self.W_dec, pre, error, variance, context)
        parts = {"mse": losses[-1], "prefix_mse": losses[0], "nested_mse": nested, "aux_loss": aux}
        return nested + context.aux_coef * aux, parts, codes

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """Plain autograd of ``training_loss``."""
        return SparseAutoencoder.reference_step(self, x, context)


class MatryoshkaBatchTopKSAE(MatryoshkaLoss, BatchTopKSAE):
    """BatchTopK's selection and threshold, trained on every nested prefix."""

    name: ClassVar[str] = MATRYOSHKA.name
    reference: ClassVar[str] = REFERENCE
    arch_parameters: ClassVar[tuple[Parameter, ...]] = MATRYOSHKA.parameters
    uses_auxk: ClassVar[bool] = MATRYOSHKA.uses_auxk
    example: ClassVar[dict[str, Any]] = {"k": 3, "k_aux": 16}

    def training_loss(self, x: torch.Tensor, context: StepContext):
        """The module docstring's loss on the batch selection; moves θ as BatchTopK does."""
        pre = self.pre_activations(x)
        codes = self.batch_select(pre)
        self.update_threshold(codes.detach())
        return self.matryoshka_loss(x, pre, codes, context)


class MatryoshkaTopKSAE(MatryoshkaLoss, TopKSAE):
    """TopK's selection (k per token), trained on every nested prefix."""

    name: ClassVar[str] = MATRYOSHKATOPK.name
    reference: ClassVar[str] = REFERENCE
    arch_parameters: ClassVar[tuple[Parameter, ...]] = MATRYOSHKATOPK.parameters
    uses_auxk: ClassVar[bool] = MATRYOSHKATOPK.uses_auxk
    shardable: ClassVar[bool] = MATRYOSHKATOPK.shardable
    example: ClassVar[dict[str, Any]] = {"k": 3, "k_aux": 16}

    def training_loss(self, x: torch.Tensor, context: StepContext):
        """The module docstring's loss on the k largest pre-activations of each token."""
        pre = self.pre_activations(x)
        return self.matryoshka_loss(x, pre, self.activate(pre), context)

    def reference_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """Plain autograd of ``training_loss`` (not TopK's dense kernel, which has no prefixes)."""
        return SparseAutoencoder.reference_step(self, x, context)
