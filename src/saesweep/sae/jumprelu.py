"""JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders"; defaults of SAELens 6.x).

    z = pre ⊙ H(pre − θ),   θ_i = exp(log θ_i) > 0 per latent,  H the Heaviside step
    L = L_mse + λ · (1/B) Σ_b Σ_i H(pre_bi − θ_i)                (an L0 penalty)

H has no useful derivative, so θ is trained through straight-through pseudo-derivatives
with a rectangle kernel of bandwidth ε, rect(u) = 1[|u| < 1/2]:

    ∂z/∂θ = −(θ/ε) · rect((pre − θ)/ε),   ∂H/∂θ = −(1/ε) · rect((pre − θ)/ε),

and no gradient reaches pre through H (only through the identity part of z). The training
step is ``support_kernels.support_step`` on the support pre > θ − ε/2, outside which z,
H and their pseudo-derivatives vanish. Defaults:
ε = 0.05 and θ₀ = 0.01 (SAELens; dictionary_learning uses 0.001 for both); the decoder
rows are kept at unit norm (as dictionary_learning does); Adam β₁ = 0 as in the paper.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from saesweep.sae.base import Parameter, SparseAutoencoder, StepContext, StepOutput, batch_variance
from saesweep.sae.catalog import JUMPRELU
from saesweep.sae.support_kernels import Support, SupportBatch, support_step


class _JumpReLU(torch.autograd.Function):
    """z = pre · H(pre − θ) with the rectangle-kernel pseudo-derivative for θ, elementwise
    (θ of pre's shape: expanded over the batch, or gathered on a support)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * window * grad
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre − θ) with ∂H/∂θ = −(1/ε) rect((pre − θ)/ε) and no gradient to pre, elementwise."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, -(1.0 / ctx.bandwidth) * window * grad, None


class JumpReLUSAE(SparseAutoencoder):
    """Per-latent learned thresholds, an L0 penalty."""

    name: ClassVar[str] = JUMPRELU.name
    reference: ClassVar[str] = "Rajamanoharan et al. 2024, JumpReLU SAEs (defaults: SAELens 6.x)"
    arch_parameters: ClassVar[tuple[Parameter, ...]] = JUMPRELU.parameters
    uses_auxk: ClassVar[bool] = JUMPRELU.uses_auxk
    adam_betas: ClassVar[tuple[float, float]] = (0.0, 0.999)
    shardable: ClassVar[bool] = JUMPRELU.shardable
    inference_family: ClassVar[str] = "jumprelu"
    example: ClassVar[dict[str, Any]] = {"l0_coef": 0.1, "threshold_init": 0.3}

    def __init__(self, d: int, n: int, params: dict[str, Any]) -> None:
        super().__init__(d, n, params)
        self.log_threshold = nn.Parameter(torch.full((n,), math.log(float(params["threshold_init"]))))

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        super().initialise(sample, generator)
        self.log_threshold.fill_(math.log(float(self.params["threshold_init"])))

    def activate(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return pre * (pre > self.log_threshold.exp())

    def inference_extras(self) -> dict[str, torch.Tensor]:
        """θ (n,)."""
        return {"threshold": self.log_threshold.detach().exp()}

    @torch.no_grad()
    def set_inference_extras(self, extras: dict[str, torch.Tensor]) -> None:
        """log θ = log max(θ, 0): a threshold at or below 0 gates nothing that ReLU does not
        (other tools' JumpReLU rectifies first), and θ = 0 does the same here."""
        self.log_threshold.copy_(extras["threshold"].double().clamp_min(0.0).log())

    def training_loss(self, x: torch.Tensor, context: StepContext):
        pre = self.pre_activations(x)
        threshold, bandwidth = self.log_threshold.exp().expand_as(pre), float(self.params["bandwidth"])
        codes = _JumpReLU.apply(pre, threshold, bandwidth)
        error = x - (codes @ self.W_dec + self.b_pre)
        mse = error.pow(2).sum() / batch_variance(x)
        l0 = _Step.apply(pre, threshold, bandwidth).sum(dim=1).mean()
        return mse + float(self.params["l0_coef"]) * l0, {"mse": mse, "l0": l0}, codes

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The loss on the support pre > θ − ε/2 (``support_kernels``)."""
        return support_step(self, x, context)

    def support_loss(self, batch: SupportBatch, context: StepContext):
        """``training_loss`` on R = {pre > θ − ε/2}: z and H are 0 below θ, and the
        rectangle kernel 0 below θ − ε/2."""
        bandwidth = float(self.params["bandwidth"])
        support = Support.from_mask(batch.pre > self.log_threshold.detach().exp() - bandwidth / 2)
        pre = batch.gather(support)
        threshold = self.log_threshold.exp()[support.cols]
        codes = _JumpReLU.apply(pre, threshold, bandwidth)
        mse = batch.data_total(batch.error(codes, support).pow(2).sum()) / batch.variance
        l0 = batch.total(_Step.apply(pre, threshold, bandwidth).sum()) / batch.rows
        return mse + float(self.params["l0_coef"]) * l0, {"mse": mse, "l0": l0}, support, codes
