"""BatchTopK (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k·B largest entries of ReLU(pre) over the whole batch (B, n), so tokens
share a budget of k active latents on average:

    z_train = ReLU(pre) ⊙ 1[pre is among the k·B largest entries of the batch]
    L       = L_mse + α · L_aux                          (AuxK as for TopK: base.auxk_loss)

Inference must not depend on the batch: a single threshold θ replaces the batch selection,

    z = ReLU(pre) ⊙ 1[pre > θ],

with θ estimated during training as an exponential moving average of the smallest selected
value of each batch: θ ← (1 − r) θ + r · min(z_train[z_train > 0]), r = 0.01 (SAELens'
rate; bartbussmann/BatchTopK and dictionary_learning use the same estimator with other
rates). The first batch sets θ directly.

The training step is ``support_kernels.support_step`` on the selection itself, found
without sorting the batch: the k·B largest entries are taken among those above 3θ/4 (exact
whenever at least k·B entries lie there, else among all entries). That selection spans the
whole batch and every latent, so this step has no distributed form (not ``shardable``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saesweep.sae.base import Parameter, SparseAutoencoder, StepContext, StepOutput, auxk_loss, batch_variance
from saesweep.sae.catalog import BATCHTOPK
from saesweep.sae.support_kernels import Support, SupportBatch, support_step


class BatchTopKSAE(SparseAutoencoder):
    """Top k·B over the batch in training, a fixed threshold at inference."""

    name: ClassVar[str] = BATCHTOPK.name
    reference: ClassVar[str] = "Bussmann et al. 2024, BatchTopK Sparse Autoencoders"
    arch_parameters: ClassVar[tuple[Parameter, ...]] = BATCHTOPK.parameters
    uses_auxk: ClassVar[bool] = BATCHTOPK.uses_auxk
    inference_family: ClassVar[str] = "jumprelu"
    example: ClassVar[dict[str, Any]] = {"k": 3, "k_aux": 16}

    def __init__(self, d: int, n: int, params: dict[str, Any]) -> None:
        super().__init__(d, n, params)
        self.k = int(params["k"])
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def activate(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """z = ReLU(pre) ⊙ 1[pre > θ] (θ = 0 before any training step)."""
        threshold = self.threshold.nan_to_num(0.0).clamp_min(0.0)
        return pre.relu() * (pre > threshold)

    def inference_extras(self) -> dict[str, torch.Tensor]:
        """JumpReLU's θ: this SAE's one threshold for every latent (NaN before any training
        step, and negative values, act as 0 in ``activate``)."""
        return {"threshold": self.threshold.nan_to_num(0.0).clamp_min(0.0).expand(self.n)}

    def batch_select(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU(pre) with all but the k·B largest entries of the batch set to 0 (dense)."""
        flat = pre.relu().flatten()
        values, indices = flat.topk(min(self.k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)

    def training_loss(self, x: torch.Tensor, context: StepContext):
        """The module docstring's loss; also moves θ towards this batch's smallest selected
        value (a side effect of training, under no_grad)."""
        pre = self.pre_activations(x)
        codes = self.batch_select(pre)
        error = x - (codes @ self.W_dec + self.b_pre)
        variance = batch_variance(x)
        mse = error.pow(2).sum() / variance
        aux = auxk_loss(self.W_dec, pre, error, variance, context)
        self.update_threshold(codes)
        return mse + context.aux_coef * aux, {"mse": mse, "aux_loss": aux}, codes

    @torch.no_grad()
    def update_threshold(self, codes: torch.Tensor) -> None:
        """θ ← (1 − r) θ + r · (the smallest non-zero code of the batch); the first batch sets θ."""
        selected = codes[codes > 0]
        if selected.numel():
            smallest = selected.min()
            rate = float(self.params["threshold_rate"])
            first = torch.isnan(self.threshold)
            self.threshold.copy_(torch.where(first, smallest, (1 - rate) * self.threshold + rate * smallest))

    def batch_selection(self, pre: torch.Tensor) -> Support:
        """The entries of the k·B largest positive values of pre (B, n), looked for among the
        entries above 3θ/4 when at least k·B lie there (then the k·B largest are theirs),
        else among all."""
        count = min(self.k * pre.shape[0], pre.numel())
        hint = 0.75 * float(self.threshold)
        if hint > 0:
            rows, cols = (pre > hint).nonzero(as_tuple=True)
            if rows.numel() >= count:
                values = pre[rows, cols]
                keep = values >= values.topk(count, sorted=False).values.min()
                return Support.from_entries(tuple(pre.shape), rows[keep], cols[keep])
        bound = pre.relu().flatten().topk(count, sorted=False).values.min()
        return Support.from_mask(pre >= bound if bound > 0 else pre > 0)

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The loss on the batch selection (``support_kernels``)."""
        return support_step(self, x, context)

    def support_loss(self, batch: SupportBatch, context: StepContext):
        """``training_loss`` on R, the batch selection (``batch_selection``)."""
        support = self.batch_selection(batch.pre)
        codes = batch.gather(support)
        error = batch.error(codes, support)
        mse = error.pow(2).sum() / batch.variance
        aux = batch.auxk_loss(error, context)
        self.update_threshold(codes.detach())
        return mse + context.aux_coef * aux, {"mse": mse, "aux_loss": aux}, support, codes
