"""The interface every SAE architecture implements (Benchopt's "solver").

Every architecture shares the affine maps and the input normalisation:

    x     = (a − μ) / s                              (raw site activations a → inputs x)
    pre   = W_enc (x − b_pre) + b_enc                (n pre-activations)
    z     = f(pre)                                   (the architecture's activation; sparse)
    x̂     = W_dec z + b_pre = Σ_i z_i W_dec[i] + b_pre

μ is the mean activation and s² = E‖a − μ‖² / d, so that E‖x‖² = d; both are stored with
the SAE so raw activations can be encoded. With ``input_normalisation`` ``per_token`` each
token is instead centred over its coordinates and scaled to ‖x‖² = d on its own
(``core.normalisation``; μ and s unused). ``W_enc`` and ``W_dec`` have shape (n, d): row
i of ``W_dec`` is latent i's decoder direction. Every training loss starts from the
batch's normalised MSE

    L_mse = ‖x − x̂‖²_F / V,   V = ‖x − mean_batch(x)‖²_F,

and adds the architecture's own terms. An architecture declares its parameters (one of
them its sparsity knob), defines ``activate`` (and optionally a faster ``encode`` or
``training_step``), and says which constraints the recipe keeps (unit-norm decoder rows,
AuxK). Training, evaluation and export only ever call this interface.

Codes are a sparse CSR tensor of shape (B, n): the non-zero z_i of each row. Entries
that are stored but zero (a TopK value clipped by ReLU) do not count as firing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from saesweep.core import normalisation
from saesweep.sae.catalog import AUXK_PARAMETERS, LR_FACTOR, TIED_INIT, Parameter, problem
from saesweep.sae.collectives import Collectives, batch_variance

# Codes are sparse CSR tensors built with valid (sorted, unique) indices; torch's notice that
# CSR support is in beta and that invariant checks are off is not actionable.
warnings.filterwarnings(
    "ignore", "Sparse (CSR tensor support is in beta|invariant checks are implicitly)", UserWarning
)


@dataclass
class StepContext:
    """What the trainer tells a training step besides the batch."""

    dead_mask: torch.Tensor | None
    """(n,) bool: latents that have not fired within the dead window; None when AuxK is off."""
    k_aux: int
    """AuxK: latents of the auxiliary reconstruction (capped by the number of dead latents)."""
    aux_coef: float
    """AuxK: α, the weight of the auxiliary loss."""
    progress: float
    """Tokens seen / the cell's budget, in [0, 1] (for penalty warm-ups)."""
    fire_threshold: float
    """A latent fires on a token when its value exceeds this."""
    aux_normaliser: str = "input"
    """AuxK: what L_aux is divided by (``auxk_normaliser``): ``input`` (V, as the main loss)
    or ``error`` (the error's own variance, as openai/sparse_autoencoder's code)."""
    collectives: Collectives | None = None
    """The other processes of a distributed cell (``sae.collectives``); None: one process.
    With latent shards, ``dead_mask`` covers this process's latents only."""


@dataclass
class StepOutput:
    """What one training step reports: the total loss and its named parts (detached
    scalars, ``mse`` always among them), and the latents that fired in the batch."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    fired: torch.Tensor
    """Indices of latents that fired on some token of the batch (repeats allowed)."""
    entries: int | None = None
    """R, the (token, latent) entries the products of the step's main support ran over, where
    the architecture's codes decide it (``support_kernels``: the support, or all B·n entries
    where it ran densely); None where its parameters do (k per token). The step's FLOP count
    (``sae.flops``) uses it."""


class SparseAutoencoder(nn.Module):
    """An SAE with n latents over d-dimensional inputs; subclasses are the architectures."""

    name: ClassVar[str]
    """Registry name, used in configs and folder names (lower-case letters and digits)."""
    reference: ClassVar[str]
    """The paper or implementation the equations and defaults come from."""
    arch_parameters: ClassVar[tuple[Parameter, ...]]
    """The architecture's parameters, sparsity knob first (``LR_FACTOR`` is added to every one)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows kept at unit norm: the gradient's radial part is removed before each step
    and the rows renormalised after it."""
    uses_auxk: ClassVar[bool] = False
    """Whether the AuxK loss applies to this architecture (its parameters ``AUXK_PARAMETERS``)."""
    decoder_init_norm: ClassVar[float] = 1.0
    """Norm of the random decoder rows at initialisation."""
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    """Adam's (β₁, β₂) in this recipe."""
    k_override: ClassVar[bool] = False
    """Whether ``encode(x, k=…)`` can use another number of active latents than trained with."""
    inference_family: ClassVar[str | None] = None
    """The registered architecture whose inference rule this one's is (its own name for most;
    BatchTopK's is JumpReLU's with one θ for every latent): the form other tools' files carry
    (``interop``). None: no such form."""
    shardable: ClassVar[bool] = False
    """Whether the training step runs across processes (``train.distributed``: latent
    shards and data-parallel replicas, see ``sae.collectives``); the config refuses a
    distributed cell of an architecture without it."""
    replicated: ClassVar[tuple[str, ...]] = ("b_pre", "act_mean", "act_scale")
    """Tensors every latent shard holds whole; every other parameter or buffer whose leading
    dimension is n is per-latent (split over shards by rows), the rest (scalars) replicated."""
    example: ClassVar[dict[str, Any]]
    """Parameters for the standard tests' planted dictionary (64 unit directions in d = 32,
    3 active per token with magnitudes in [1, 2]), a setting that reaches L0 ≈ 3 there."""

    def __init__(self, d: int, n: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.d, self.n = d, n
        problem = self.problem(n, params)
        if problem:
            raise ValueError(problem)
        defaults = {p.name: p.default for p in self.all_arch_parameters() if p.default is not None}
        self.params = {**defaults, **params}
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.register_buffer("act_mean", torch.zeros(d))
        self.register_buffer("act_scale", torch.ones(()))
        self.input_normalisation = normalisation.GLOBAL
        """How raw activations become inputs (``core.normalisation.KINDS``); recorded in
        cfg.json (``normalisation.kind``), not in the weights file."""

    @classmethod
    def all_arch_parameters(cls) -> tuple[Parameter, ...]:
        """The architecture's parameters, AuxK's where it uses AuxK, and the shared ones, knob first."""
        return (*cls.arch_parameters, *(AUXK_PARAMETERS if cls.uses_auxk else ()), TIED_INIT, LR_FACTOR)

    def auxk_settings(self) -> tuple[int, float, str]:
        """AuxK's (k_aux, α, normaliser: ``input`` or ``error``) from the parameters; (0, 0,
        ``input``), i.e. off, for an architecture without AuxK."""
        if not self.uses_auxk:
            return 0, 0.0, "input"
        params = self.params
        normaliser = "error" if params["aux_error_norm"] else "input"
        return int(params["k_aux"]), float(params["aux_coef"]), normaliser

    @classmethod
    def problem(cls, n: int, params: dict[str, Any]) -> str | None:
        """Why a cell with n latents and ``params`` cannot exist (e.g. k ≥ n), or None."""
        return problem(n, params)

    @classmethod
    def knob(cls) -> Parameter:
        """The sparsity parameter (the first declared)."""
        return cls.arch_parameters[0]

    # --- initialisation and normalisation -------------------------------------------------

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        """Random decoder rows of norm ``decoder_init_norm``; encoder = decoder (the transpose
        in matrix form: the tied initialisation) or, with ``tied_init`` 0, independent entries
        U(−1/√d, 1/√d); b_enc = 0, b_pre = geometric median of ``sample`` (normalised inputs)."""
        directions = torch.randn(self.n, self.d, generator=generator)
        self.W_dec.copy_(self.decoder_init_norm * directions / directions.norm(dim=1, keepdim=True))
        if self.params[TIED_INIT.name]:
            self.W_enc.copy_(self.W_dec)
        else:
            bound = 1 / math.sqrt(self.d)
            self.W_enc.copy_(torch.rand(self.n, self.d, generator=generator) * 2 * bound - bound)
        self.b_enc.zero_()
        self.b_pre.copy_(geometric_median(sample.float()))

    def set_normalisation(self, mean: torch.Tensor, scale: float) -> None:
        """Store μ and s so that ``normalise`` maps raw activations a to (a − μ) / s."""
        self.act_mean.copy_(mean)
        self.act_scale.fill_(scale)

    def normalise(self, activations: torch.Tensor) -> torch.Tensor:
        """Raw activations a → inputs x: (a − μ) / s, or per token (``input_normalisation``)."""
        return normalisation.normalise(activations, self.input_normalisation, self.act_mean, self.act_scale)

    def denormalise(self, x: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """Inputs-space x → raw units, the inverse of ``normalise`` for the raw ``activations``
        x came from: s·x + μ, or r(a)·x + m(a) with each token's own mean and norm."""
        return normalisation.denormalise(x, activations, self.input_normalisation, self.act_mean, self.act_scale)

    # --- the forward maps -----------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """pre = (x − b_pre) W_encᵀ + b_enc, shape (B, n)."""
        return torch.addmm(self.b_enc, x - self.b_pre, self.W_enc.t())

    def activate(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """z = f(pre) at inference, dense (B, n); ``k`` only where ``k_override``."""
        raise NotImplementedError

    def sparse_codes(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """z = f(pre) as sparse CSR (B, n)."""
        return self.activate(pre, k).to_sparse_csr()

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The codes of normalised inputs x at inference: sparse CSR (B, n)."""
        return self.sparse_codes(self.pre_activations(x), k)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """x̂ = codes W_dec + b_pre, for sparse CSR or dense codes (B, n). CSR codes are decoded
        as one weighted bag of decoder rows per token (``embedding_bag`` over the CSR's column
        indices, row offsets and values): a gather, on every device, rather than a sparse
        product (about 2.5× faster than ``torch.sparse.mm`` on 2 CPU cores at B = 4096,
        n = 16384, k = 32, d = 576)."""
        if codes.layout == torch.strided:
            return codes @ self.W_dec + self.b_pre
        product = nn.functional.embedding_bag(
            codes.col_indices(), self.W_dec, codes.crow_indices(), mode="sum",
            per_sample_weights=codes.values().to(self.W_dec.dtype), include_last_offset=True,
        )
        return product + self.b_pre

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Reconstruction x̂ of normalised inputs x."""
        return self.decode(self.encode(x, k))

    def inference_extras(self) -> dict[str, torch.Tensor]:
        """The (n,) tensors of the inference rule beyond the shared maps and biases, under
        ``inference_family``'s names (e.g. JumpReLU's ``threshold`` θ); none by default."""
        return {}

    @torch.no_grad()
    def set_inference_extras(self, extras: dict[str, torch.Tensor]) -> None:
        """The inverse of ``inference_extras`` for an SAE of the family itself."""

    # --- training ---------------------------------------------------------------------------

    def training_loss(self, x: torch.Tensor, context: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(total loss, its named parts, dense training codes z (B, n)) as an autograd graph:
        the architecture's equations written plainly."""
        raise NotImplementedError

    def reference_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """Loss and gradients (written to each parameter's ``.grad``) of one batch by plain
        autograd of ``training_loss``: the reference every faster step is tested against."""
        self.zero_grad(set_to_none=True)
        loss, parts, codes = self.training_loss(x, context)
        loss.backward()
        fired = codes.detach().gt(context.fire_threshold).any(dim=0).nonzero().squeeze(1)
        return StepOutput(loss.detach(), {name: part.detach() for name, part in parts.items()}, fired)

    def training_step(self, x: torch.Tensor, context: StepContext) -> StepOutput:
        """The step the trainer runs: ``reference_step`` unless the architecture has a faster one."""
        return self.reference_step(x, context)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """With unit-norm decoder rows, remove from each row's gradient g its component
        along the row w: g ← g − (g·w) w, so a step changes directions, not norms."""
        grad = self.W_dec.grad
        if self.unit_norm_decoder and grad is not None:
            # one batched dot product per row and an in-place update: no (n, d) temporary
            parallel = torch.bmm(grad.unsqueeze(1), self.W_dec.unsqueeze(2)).view(-1, 1)
            grad.addcmul_(parallel, self.W_dec, value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """With unit-norm decoder rows, rescale every row to unit norm."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def auxk_loss(
    W_dec: torch.Tensor,
    pre: torch.Tensor,
    error: torch.Tensor,
    variance: torch.Tensor,
    context: StepContext,
) -> torch.Tensor:
    """The AuxK loss of Gao et al. (2024) on dense pre-activations (unweighted): with
    k_a = min(k_aux, number of dead latents),

        z_a    = ReLU(TopK_{k_a}(pre restricted to dead latents))
        L_aux  = ‖stopgrad(e) − z_a W_dec‖²_F / N,    e = x − x̂,

    N from ``auxk_normaliser``, which the loss adds with weight α = ``aux_coef``. Zero when no
    latent is dead, k_aux = 0 or α = 0 (nothing is computed then)."""
    dead_mask, k_aux = context.dead_mask, context.k_aux
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if n_dead == 0 or k_aux <= 0 or context.aux_coef <= 0:
        return torch.zeros((), dtype=pre.dtype, device=pre.device)
    dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
    values, indices = dead_pre.topk(min(k_aux, n_dead), dim=1, sorted=False)
    codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
    normaliser = auxk_normaliser(variance, error, context.aux_normaliser)
    return (error.detach() - codes @ W_dec).pow(2).sum() / normaliser


def auxk_normaliser(variance: torch.Tensor, error: torch.Tensor, kind: str,
                    variance_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """What L_aux is divided by: V, the inputs' batch variance (``input``: L_aux in the main
    loss's unit), or V_e = ‖e − mean_batch(e)‖²_F of the detached error it reconstructs
    (``error``: openai/sparse_autoencoder's code; V_e ≈ NMSE · V, so α weighs the auxiliary
    loss about 1/NMSE times more than with ``input``). ``variance_of`` computes V_e (default
    ``batch_variance``; a distributed step's is over the global batch)."""
    return (variance_of or batch_variance)(error.detach()) if kind == "error" else variance


def rms_norm(variance: torch.Tensor, batch: int) -> torch.Tensor:
    """√(V / B): the root-mean-square norm of the batch's centred inputs, the unit in which
    penalties on code magnitudes are measured (so their coefficients do not depend on d)."""
    return (variance / batch).sqrt()


def rows_csr(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Codes with exactly m entries per row, (indices (B, m), values (B, m)), as a sparse CSR
    (B, n) tensor with each row's columns sorted."""
    batch, m = indices.shape
    order = indices.argsort(dim=1)
    crow = torch.arange(0, batch * m + 1, m, device=indices.device)
    return torch.sparse_csr_tensor(
        crow, indices.gather(1, order).flatten(), values.gather(1, order).flatten(), (batch, n)
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
