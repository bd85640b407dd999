"""ReLU + L1, Anthropic's recipe as updated in April 2024 ("Circuits Updates — April 2024";
the L1 weighted by decoder norms).

    z = ReLU(pre)
    L = L_mse + λ(t) · (1/B) Σ_b Σ_i z_bi ‖W_dec[i]‖₂ / √(V / B)

The penalty is the L1 norm of the codes weighted by the decoder rows' norms, so it cannot
be lowered by shrinking z and growing W_dec (the decoder is not constrained to unit norm);
it is measured in units of the batch's RMS input norm √(V/B), so λ does not depend on the
activations' scale. λ(t) rises linearly from 0 to λ over the first ``l1_warmup`` share of
the budget (Anthropic: 5%). Decoder rows start with norm 0.1, the encoder tied to them.
L0 is an outcome, not a setting: a frontier needs several λ per n. The training step is
``support_kernels.support_step`` on the support pre > 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saesweep.sae.base import Parameter, SparseAutoencoder, StepContext, StepOutput, batch_variance, rms_norm
from saesweep.sae.catalog import RELU
from saesweep.sae.support_kernels import Support, SupportBatch, support_step


class ReLUSAE(SparseAutoencoder):
    """A ReLU SAE with a decoder-norm-weighted L1 penalty."""

    name: ClassVar[str] = RELU.name
    reference: ClassVar[str] = "Anthropic, Circuits Updates April 2024 (ReLU + L1 weighted by decoder norms)"
    arch_parameters: ClassVar[tuple[Parameter, ...]] = RELU.parameters
    uses_auxk: ClassVar[bool] = RELU.uses_auxk
    unit_norm_decoder: ClassVar[bool] = False
    shardable: ClassVar[bool] = RELU.shardable
    decoder_init_norm: ClassVar[float] = 0.1
    inference_family: ClassVar[str] = "relu"
    example: ClassVar[dict[str, Any]] = {"l1_coef": 0.3}

    def activate(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return pre.relu()

    def penalty_weight(self, progress: float) -> float:
        """λ(t) = λ · min(1, t / warm-up)."""
        warmup = float(self.params["l1_warmup"])
        ramp = min(1.0, progress / warmup) if warmup > 0 else 1.0
        return float(self.params["l1_coef"]) * ramp

    def training_loss(self, x: torch.Tensor, context: StepContext):
        codes = self.activate(self.pre_activations(x))
        error = x - (codes @ self.W_dec + self.b_pre)
        variance = batch_variance(x)
        mse = error.pow(2).sum() / variance
        l1 = (codes @ self.W_dec.norm(dim=1)).mean() / rms_norm(variance, len(x))
        return mse + self.penalty_weight(context.progress) * l1, {"mse": mse, "l1": l1}, codes

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The loss on the support pre > 0 (``support_kernels``)."""
        return support_step(self, x, context)

    def support_loss(self, batch: SupportBatch, context: StepContext):
        """``training_loss`` on R = {pre > 0}, where z = pre: the L1 term is
        Σ_i ‖W_dec[i]‖ Σ_{(b,i)∈R} z_bi, one sum per latent."""
        support = Support.from_mask(batch.pre > 0)
        codes = batch.gather(support)
        mse = batch.data_total(batch.error(codes, support).pow(2).sum()) / batch.variance
        per_latent = codes.new_zeros(self.W_dec.shape[0]).index_add(0, support.cols, codes)
        l1 = batch.total(per_latent @ self.W_dec.norm(dim=1)) / batch.rows / rms_norm(batch.variance, batch.rows)
        return mse + self.penalty_weight(context.progress) * l1, {"mse": mse, "l1": l1}, support, codes
