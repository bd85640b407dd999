"""A fast training step for architectures whose codes are an elementwise function of the
pre-activations on a sparse support (ReLU + L1, JumpReLU, Gated, BatchTopK).

A support R is a set of entries (b, i) of the batch's (B, n) pre-activations outside which
the loss does not depend on them (its derivative there is 0): ReLU's pre > 0, JumpReLU's
pre > θ − ε/2, Gated's π_gate > 0, BatchTopK's batch selection, AuxK's top-k_aux among the
dead latents. The architecture writes its loss with plain autograd on the |R| values
pre_R and reaches the dense parameters only through two functions with hand-written
gradients (c = x − b_pre, δ = ∂L/∂pre_R, G = ∂L/∂y):

    gather:  pre_R = (c W_encᵀ + b_enc)_R
             ∂W_enc[i] = Σ_{(b,i)∈R} δ_bi c_b,   ∂b_enc[i] = Σ_{(b,i)∈R} δ_bi,
             ∂b_pre = −∂b_enc W_enc                        (the bias enters pre through c)
    decode:  y_b = Σ_{(b,i)∈R} z_bi W_dec[i]             (B, d), without b_pre
             ∂z_bi = G_b · W_dec[i],   ∂W_dec[i] = Σ_{(b,i)∈R} z_bi G_b

So the encoder product is the step's one dense product; the rest costs O(|R| · d) as CSR
products. Where R holds more than ``DENSE_FRACTION`` of the B · n entries (ReLU's codes at
initialisation hold half), the same formulas run as dense products over R scattered into a
(B, n) matrix, which are faster there. The dense autograd of the architecture's
``training_loss`` is the reference these gradients are tested against.

Distributed (``sae.collectives``): a process holds a block of latents and a slice of the
rows. Supports that are elementwise in pre (ReLU, JumpReLU, Gated) are then its block's
entries; a reconstruction is the shard sum of the partial decodes, and the loss's sums over
latents or rows (``SupportBatch.total``) are sums over processes in the forward and the
identity in the backward (every process computes the loss from the same totals, so the
gradient reaching its part is the total's); ∂b_pre's encoder path is summed over shards.
Each process then holds its share of the gradients, summed over replicas by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saesweep.sae.base import StepContext, StepOutput, auxk_normaliser
from saesweep.sae.collectives import LOCAL, Collectives

if TYPE_CHECKING:
    from saesweep.sae.base import SparseAutoencoder

# Above this share of the B · n entries a support runs as dense products: on 2 CPU cores the
# CSR products of ``decode`` and ``gather`` reach ~1/4 of a GEMM's multiply-adds per second
# and there are four of them against four GEMMs, so they break even near 1/4; below 1/8 the
# sparse form was faster in benchmarks/bench_architectures.py at every n we tried.
DENSE_FRACTION = 0.125


@dataclass
class Support:
    """Entries (b, i) of a (B, n) matrix, in row-major order, with the column-major order
    that the transposed products need (computed once, on first use)."""

    shape: tuple[int, int]
    rows: torch.Tensor
    """(|R|,) row b of each entry, non-decreasing."""
    cols: torch.Tensor
    """(|R|,) column i of each entry, increasing within a row."""
    dense: bool
    """Whether products run densely (R holds more than ``DENSE_FRACTION`` of the entries)."""
    _by_column: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Support:
        """The True entries of a (B, n) bool mask."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls.from_entries(tuple(mask.shape), rows, cols)

    @classmethod
    def from_entries(cls, shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor) -> Support:
        """Entries given in row-major order."""
        dense = rows.numel() > DENSE_FRACTION * shape[0] * shape[1]
        return cls(shape, rows, cols, dense)

    @classmethod
    def from_row_indices(cls, indices: torch.Tensor, n: int) -> Support:
        """m entries per row, given as (B, m) column indices in any order (distinct within a row)."""
        batch, m = indices.shape
        sorted_cols, _ = indices.sort(dim=1)
        rows = torch.arange(batch, device=indices.device).repeat_interleave(m)
        return cls.from_entries((batch, n), rows, sorted_cols.flatten())

    @cached_property
    def crow(self) -> torch.Tensor:
        """CSR row pointers (B + 1,), computed once (every product of a step uses them)."""
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.long, device=self.rows.device)
        crow[1:] = torch.bincount(self.rows, minlength=self.shape[0]).cumsum(0)
        return crow

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The (B, n) sparse CSR matrix with ``values`` on R."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The dense (B, n) matrix with ``values`` on R and 0 elsewhere."""
        return values.new_zeros(self.shape).index_put_((self.rows, self.cols), values)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """The (n, B) sparse CSR matrix Sᵀ with S having ``values`` on R."""
        if self._by_column is None:
            order = self.cols.argsort(stable=True)
            crow = torch.zeros(self.shape[1] + 1, dtype=torch.long, device=self.cols.device)
            crow[1:] = torch.bincount(self.cols, minlength=self.shape[1]).cumsum(0)
            self._by_column = (order, crow, self.rows[order])
        order, crow, rows = self._by_column
        return torch.sparse_csr_tensor(crow, rows, values[order], (self.shape[1], self.shape[0]))

    def sample(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(left rightᵀ)_R for left (B, d) and right (n, d): one dot product per entry."""
        if self.dense:
            return (left @ right.t())[self.rows, self.cols]
        pattern = self.csr(left.new_ones(self.rows.numel()))
        return torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0).values()

    def left_product(self, values: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """S right for S with ``values`` on R and right (n, d): shape (B, d)."""
        if self.dense:
            return self.scatter(values) @ right
        return nn.functional.embedding_bag(
            self.cols, right, self.crow, mode="sum", per_sample_weights=values, include_last_offset=True
        )

    def add_transposed_product(self, out: torch.Tensor, values: torch.Tensor, right: torch.Tensor,
                               latents: torch.Tensor | None = None) -> None:
        """out += Sᵀ right for S with ``values`` on R and right (B, d), in place; with
        ``latents`` (m,), R's columns are those latents' rows of ``out``."""
        if self.dense:
            product = self.scatter(values).t() @ right
        elif latents is None:
            out.addmm_(self.transposed(values), right)  # into existing memory: no page faults
            return
        else:
            product = torch.sparse.mm(self.transposed(values), right)
        if latents is None:
            out += product
        else:
            out.index_add_(0, latents, product)


def _dense_grad(parameter: torch.Tensor) -> torch.Tensor:
    """``parameter.grad``, zeroed in place (created when missing): the kernels add into it."""
    grad = parameter.grad
    return grad.zero_() if grad is not None and grad.layout == torch.strided else torch.zeros_like(parameter)


class _Gather(torch.autograd.Function):
    """pre_R of the precomputed (B, m) pre-activations ``pre`` of ``latents`` (all n when
    None), with the gradients of the module docstring: b_enc's and b_pre's through autograd,
    W_enc's added in place into ``W_enc.grad`` (on CPU, fresh memory for an (n, d) gradient
    costs page faults at every step)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor, centred: torch.Tensor,
                sae: SparseAutoencoder, support: Support, latents: torch.Tensor | None,
                collectives: Collectives) -> torch.Tensor:
        ctx.save_for_backward(centred)
        ctx.W_enc, ctx.support, ctx.latents, ctx.collectives = sae.W_enc, support, latents, collectives
        return pre[support.rows, support.cols]

    @staticmethod
    def backward(ctx: Any, delta: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (centred,) = ctx.saved_tensors
        support: Support = ctx.support
        W_enc, latents = ctx.W_enc, ctx.latents
        support.add_transposed_product(W_enc.grad, delta, centred, latents)
        grad_b_enc = delta.new_zeros(support.shape[1]).index_add_(0, support.cols, delta)
        rows = W_enc.detach() if latents is None else W_enc.detach()[latents]
        return None, grad_b_enc, ctx.collectives.shard_sum(-(grad_b_enc @ rows)), None, None, None, None, None


class _Decode(torch.autograd.Function):
    """y = S W_dec[latents] for codes S with ``values`` on R (latents: all n when None), with
    the gradients of the module docstring: the codes' through autograd, W_dec's added in
    place into ``W_dec.grad`` unless ``frozen`` (a reconstruction through stopgrad(W_dec))."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, sae: SparseAutoencoder, support: Support,
                latents: torch.Tensor | None, frozen: bool) -> torch.Tensor:
        W_dec = sae.W_dec.detach()
        rows = W_dec if latents is None else W_dec[latents]
        ctx.save_for_backward(values, rows)
        ctx.W_dec, ctx.support, ctx.latents, ctx.frozen = sae.W_dec, support, latents, frozen
        return support.left_product(values, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, rows = ctx.saved_tensors
        support: Support = ctx.support
        if not ctx.frozen:
            support.add_transposed_product(ctx.W_dec.grad, values, grad, ctx.latents)
        return support.sample(grad, rows), None, None, None, None


class _Total(torch.autograd.Function):
    """``reduce(tensor)`` (a sum over processes) in the forward, the identity in the backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, reduce: Any) -> torch.Tensor:
        return reduce(tensor.clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@dataclass
class SupportBatch:
    """One training batch as an architecture's support loss sees it."""

    sae: SparseAutoencoder
    x: torch.Tensor
    """Normalised inputs (B, d)."""
    pre: torch.Tensor
    """The pre-activations (B, n), detached."""
    centred: torch.Tensor
    """c = x − b_pre (B, d), part of the autograd graph through b_pre."""
    variance: torch.Tensor
    """V, the global batch's total variance."""
    collectives: Collectives = LOCAL
    """The other processes of a distributed cell (``sae.collectives``)."""
    rows: int = 0
    """B, the global batch's rows (this process's slice: ``x``)."""

    def shard_total(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over latent shards of a partial result (e.g. a partial decode), differentiable."""
        comm = self.collectives
        return partial if comm.shards == 1 else _Total.apply(partial, comm.shard_sum)

    def data_total(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over data-parallel replicas of a sum over this process's rows, differentiable."""
        comm = self.collectives
        return partial if comm is LOCAL else _Total.apply(partial, comm.data_sum)

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over every process of a sum over its latents and rows, differentiable."""
        comm = self.collectives
        return partial if comm is LOCAL else _Total.apply(partial, lambda t: comm.data_sum(comm.shard_sum(t)))

    def gather(self, support: Support, latents: torch.Tensor | None = None, pre: torch.Tensor | None = None) -> torch.Tensor:
        """pre_R, differentiable w.r.t. W_enc, b_enc and b_pre; with ``latents`` (m,), R is a
        support of those latents' (B, m) pre-activations ``pre`` (by default the batch's)."""
        sae = self.sae
        b_enc = sae.b_enc if latents is None else sae.b_enc[latents]
        source = self.pre if pre is None else pre
        return _Gather.apply(source, b_enc, sae.b_pre, self.centred.detach(), sae, support, latents, self.collectives)

    def decode(self, values: torch.Tensor, support: Support, latents: torch.Tensor | None = None,
               frozen: bool = False) -> torch.Tensor:
        """Σ_{(b,i)∈R} values_bi W_dec[i] per row (B, d), without b_pre; with ``latents``, R's
        columns are those latents; ``frozen``: no gradient for W_dec (stopgrad(W_dec))."""
        return _Decode.apply(values, self.sae, support, latents, frozen)

    def error(self, values: torch.Tensor, support: Support) -> torch.Tensor:
        """e = x − x̂ = c − S W_dec for codes with ``values`` on R (summed over latent shards)."""
        return self.centred - self.shard_total(self.decode(values, support))

    def auxk_loss(self, error: torch.Tensor, context: StepContext) -> torch.Tensor:
        """``base.auxk_loss`` on the support of each row's top-k_a dead pre-activations."""
        dead_mask = context.dead_mask
        n_dead = 0 if dead_mask is None else int(dead_mask.sum())
        if n_dead == 0 or context.k_aux <= 0 or context.aux_coef <= 0:
            return torch.zeros((), dtype=self.x.dtype, device=self.x.device)
        dead = dead_mask.nonzero().squeeze(1)
        dead_pre = self.pre.index_select(1, dead)
        positions = dead_pre.topk(min(context.k_aux, n_dead), dim=1, sorted=False).indices
        # a support among the dead latents only: dense products over (B, dead) when k_a is a
        # large share of them, as it usually is
        support = Support.from_row_indices(positions, n_dead)
        codes = self.gather(support, dead, dead_pre).relu()
        normaliser = auxk_normaliser(self.variance, error, context.aux_normaliser)
        return (error.detach() - self.decode(codes, support, dead)).pow(2).sum() / normaliser


def support_step(sae: SparseAutoencoder, x: torch.Tensor, context: StepContext) -> StepOutput:
    """Loss and gradients (into ``.grad``) of ``sae.support_loss``, the architecture's loss on
    its support, equal to plain autograd of its ``training_loss``. The SAE provides
    ``support_loss(batch, context) → (loss, parts, support, code values on it)``, written
    with ``batch.rows`` for B and ``batch.total`` / ``data_total`` around its sums so that it
    also holds distributed (``shardable``). Inside
    ``torch.autocast`` the encoder product, the step's one dense product, runs in the
    autocast dtype (e.g. bf16) and is cast back; everything else runs in the parameters' dtype."""
    dense = (sae.W_enc, sae.W_dec)
    for parameter in sae.parameters():
        parameter.grad = _dense_grad(parameter) if any(parameter is d for d in dense) else None
    with torch.no_grad():
        pre = sae.pre_activations(x).to(x.dtype)
    comm = context.collectives or LOCAL
    with torch.autocast(x.device.type, enabled=False):
        batch = SupportBatch(sae, x, pre, x - sae.b_pre, comm.batch_variance(x), comm, comm.data_count(len(x)))
        loss, parts, support, codes = sae.support_loss(batch, context)
        loss.backward()
    fired = support.cols[codes.detach() > context.fire_threshold]
    # the entries its products ran over: all B·n where the support ran densely
    entries = support.shape[0] * support.shape[1] if support.dense else support.rows.numel()
    return StepOutput(loss.detach(), {name: part.detach() for name, part in parts.items()}, fired, entries)
