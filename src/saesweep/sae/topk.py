"""TopK (Gao et al. 2024) and Multi-TopK (Gao et al. 2024, §5.3).

    z = ReLU(TopK_k(pre))                                  (k non-zeros per token)

TopK is trained on L_mse + α · L_aux (AuxK on dead latents, see ``base.AuxK``) with unit-norm
decoder rows, the tied initialisation and b_pre at the geometric median — the recipe of
openai/sparse_autoencoder. Multi-TopK trains the same SAE on

    L = L_mse(k) + L_mse(m·k) / 8 + α · L_aux,   m = 4,

so that it stays good when evaluated with more active latents than k (a progressive code).
Both may be evaluated at any k′ (``k_override``). Their training step is the sparse one of
``topk_kernels``: only the encoder product is dense; it runs over latent shards and
data-parallel replicas (``shardable``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saesweep.sae.base import Parameter, SparseAutoencoder, StepContext, StepOutput, rows_csr
from saesweep.sae.catalog import MULTITOPK, TOPK
from saesweep.sae.collectives import LOCAL
from saesweep.sae.topk_kernels import SelectionStep, Wide, dense_reference_step, sparse_step

class TopKSAE(SparseAutoencoder):
    """A k-sparse autoencoder."""

    name: ClassVar[str] = TOPK.name
    reference: ClassVar[str] = "Gao et al. 2024, Scaling and evaluating sparse autoencoders (openai/sparse_autoencoder)"
    arch_parameters: ClassVar[tuple[Parameter, ...]] = TOPK.parameters
    uses_auxk: ClassVar[bool] = TOPK.uses_auxk
    shardable: ClassVar[bool] = TOPK.shardable
    k_override: ClassVar[bool] = True
    inference_family: ClassVar[str] = "topk"
    example: ClassVar[dict[str, Any]] = {"k": 3, "k_aux": 16}

    def __init__(self, d: int, n: int, params: dict[str, Any]) -> None:
        super().__init__(d, n, params)
        self.k = int(params["k"])

    def wide(self) -> Wide | None:
        """Multi-TopK's second selection; None for plain TopK."""
        return None

    def select(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, ReLU(values)) of the k largest pre-activations of each row."""
        values, indices = pre.topk(k or self.k, dim=1, sorted=False)
        return indices, values.relu()

    def activate(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        indices, values = self.select(pre, k)
        return torch.zeros_like(pre).scatter_(1, indices, values)

    def sparse_codes(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Top-k codes without a dense (B, n) code tensor."""
        return rows_csr(*self.select(pre, k), self.n)

    def reference_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The loss and gradients by plain dense autograd (``topk_kernels.dense_reference_step``)."""
        return self._report(dense_reference_step(self, x, *self._auxk(context)), context)

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The sparse step (``topk_kernels.sparse_step``), across processes where distributed."""
        step = sparse_step(self, x, *self._auxk(context), context.collectives or LOCAL)
        return self._report(step, context)

    def _auxk(self, context: StepContext) -> tuple[torch.Tensor | None, int, float, Wide | None, str]:
        """The kernels' arguments after the batch: AuxK's, the wide selection, AuxK's normaliser."""
        return context.dead_mask, context.k_aux, context.aux_coef, self.wide(), context.aux_normaliser

    def _report(self, step: SelectionStep, context: StepContext) -> StepOutput:
        parts = {"mse": step.mse_loss, "aux_loss": step.aux_loss}
        if self.wide() is not None:
            parts["wide_mse"] = step.wide_loss
        return StepOutput(step.loss, parts, torch.masked_select(step.indices, step.values > context.fire_threshold))


class MultiTopKSAE(TopKSAE):
    """TopK trained at k and at m·k at once."""

    name: ClassVar[str] = MULTITOPK.name
    reference: ClassVar[str] = "Gao et al. 2024, §5.3 (Multi-TopK: L(k) + L(4k)/8)"
    arch_parameters: ClassVar[tuple[Parameter, ...]] = MULTITOPK.parameters
    uses_auxk: ClassVar[bool] = MULTITOPK.uses_auxk
    shardable: ClassVar[bool] = MULTITOPK.shardable

    def wide(self) -> Wide:
        return Wide(min(self.n - 1, int(self.params["multiple"]) * self.k), float(self.params["wide_weight"]))
