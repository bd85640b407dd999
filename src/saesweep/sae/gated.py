"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

One encoder matrix W_enc serves a gate and a magnitude path, with c = x − b_pre:

    π_gate = W_enc c + b_gate                          (b_gate is ``b_enc``)
    π_mag  = exp(r_mag) ⊙ W_enc c + b_mag
    z      = 1[π_gate > 0] ⊙ ReLU(π_mag)

    L = L_mse + λ · (1/B) Σ_b ‖ReLU(π_gate,b)‖₁ / √(V / B)
          + ‖x − (ReLU(π_gate) stopgrad(W_dec) + stopgrad(b_pre))‖²_F / V

The gate gets its gradient from the L1 penalty and the auxiliary reconstruction (the step
1[·] passes none); decoder rows are kept at unit norm, so the penalty cannot be dodged by
scale. As for ReLU + L1, the penalty is in units of the batch's RMS input norm. Init:
r_mag = b_mag = 0, the tied encoder. The training step is ``support_kernels.support_step``
on the support π_gate > 0, outside which z, ReLU(π_gate) and their derivatives vanish.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from saesweep.sae.base import Parameter, SparseAutoencoder, StepContext, StepOutput, batch_variance, rms_norm
from saesweep.sae.catalog import GATED
from saesweep.sae.support_kernels import Support, SupportBatch, support_step


class GatedSAE(SparseAutoencoder):
    """Separate gate (which latents) and magnitude (how much) with a shared encoder."""

    name: ClassVar[str] = GATED.name
    reference: ClassVar[str] = "Rajamanoharan et al. 2024, Gated Sparse Autoencoders"
    arch_parameters: ClassVar[tuple[Parameter, ...]] = GATED.parameters
    uses_auxk: ClassVar[bool] = GATED.uses_auxk
    adam_betas: ClassVar[tuple[float, float]] = (0.0, 0.999)
    shardable: ClassVar[bool] = GATED.shardable
    inference_family: ClassVar[str] = "gated"
    example: ClassVar[dict[str, Any]] = {"l1_coef": 1.0}

    def __init__(self, d: int, n: int, params: dict[str, Any]) -> None:
        super().__init__(d, n, params)
        self.r_mag = nn.Parameter(torch.zeros(n))
        self.b_mag = nn.Parameter(torch.zeros(n))

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        super().initialise(sample, generator)
        self.r_mag.zero_()
        self.b_mag.zero_()

    def gate_and_magnitude(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag) from pre = π_gate = W_enc c + b_gate."""
        projection = pre - self.b_enc
        return pre, projection * self.r_mag.exp() + self.b_mag

    def activate(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        gate, magnitude = self.gate_and_magnitude(pre)
        return (gate > 0) * magnitude.relu()

    def inference_extras(self) -> dict[str, torch.Tensor]:
        """r_mag and b_mag (n,) each (b_enc is the gate's bias)."""
        return {"r_mag": self.r_mag.detach(), "b_mag": self.b_mag.detach()}

    @torch.no_grad()
    def set_inference_extras(self, extras: dict[str, torch.Tensor]) -> None:
        self.r_mag.copy_(extras["r_mag"])
        self.b_mag.copy_(extras["b_mag"])

    def training_loss(self, x: torch.Tensor, context: StepContext):
        gate, magnitude = self.gate_and_magnitude(self.pre_activations(x))
        codes = (gate > 0).to(x.dtype) * magnitude.relu()
        variance = batch_variance(x)
        mse = (x - (codes @ self.W_dec + self.b_pre)).pow(2).sum() / variance
        active_gate = gate.relu()
        l1 = active_gate.sum(dim=1).mean() / rms_norm(variance, len(x))
        gate_reconstruction = active_gate @ self.W_dec.detach() + self.b_pre.detach()
        aux = (x - gate_reconstruction).pow(2).sum() / variance
        loss = mse + float(self.params["l1_coef"]) * l1 + aux
        return loss, {"mse": mse, "l1": l1, "aux_loss": aux}, codes

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The loss on the support π_gate > 0 (``support_kernels``)."""
        return support_step(self, x, context)

    def support_loss(self, batch: SupportBatch, context: StepContext):
        """``training_loss`` on R = {π_gate > 0}, where ReLU(π_gate) = π_gate."""
        support = Support.from_mask(batch.pre > 0)
        gate = batch.gather(support)
        cols = support.cols
        codes = ((gate - self.b_enc[cols]) * self.r_mag.exp()[cols] + self.b_mag[cols]).relu()
        mse = batch.data_total(batch.error(codes, support).pow(2).sum()) / batch.variance
        l1 = batch.total(gate.sum()) / batch.rows / rms_norm(batch.variance, batch.rows)
        gate_reconstruction = batch.shard_total(batch.decode(gate, support, frozen=True)) + self.b_pre.detach()
        aux = batch.data_total((batch.x - gate_reconstruction).pow(2).sum()) / batch.variance
        loss = mse + float(self.params["l1_coef"]) * l1 + aux
        return loss, {"mse": mse, "l1": l1, "aux_loss": aux}, support, codes
