"""The TopK / Multi-TopK training step with gather and scatter-add products: the form that
is fast on CUDA (``topk_kernels.sparse_step`` chooses it there), where cuSPARSE's CSR
products are slow for k non-zeros per row. Same loss and gradients as
``topk_kernels.dense_reference_step`` (the formulas are ``sparse_step``'s); what differs:

- Products. With G (B, d) a selection's reconstruction gradient, I (B, k) its indices,
  v its values and c = x − b_pre:
      δ_bj      = 1[v_bj > 0] · G_b · W_dec[I_bj]         (a gather of W_dec rows, one bmm)
      ∂W_dec   += index_add over I of ReLU(v_bj) G_b
      ∂W_enc   += index_add over I of δ_bj c_b,   ∂b_enc += index_add over I of δ_bj
  and the decode Σ_j ReLU(v_bj) W_dec[I_bj] is an embedding bag. Each selection adds into
  the same gradient tensors; nothing is sorted.
- AuxK without host synchronisation: instead of listing the dead latents (``nonzero``, whose
  size the host must read), the AuxK selection is TopK_{k_a} of pre with the live latents
  set to −∞, k_a = min(k_aux, n). Where fewer than k_a latents are dead, the surplus entries
  are −∞, so ReLU makes them 0 and they add nothing: the selection is the reference's
  TopK_{min(k_aux, dead)}. Whether any latent is dead is a 0-dim tensor (summed over
  latent shards) that gates the AuxK loss and its gradient with ``torch.where``, so the
  step never reads a value back to the host.

Index additions on CUDA use atomic adds, so the summation order (and the last bits of the
gradients) can differ from run to run there.
"""

from __future__ import annotations

import torch

from saesweep.sae.base import auxk_normaliser
from saesweep.sae.collectives import Collectives
from saesweep.sae.selection import SelectionStep, Wide, selection_step, sparse_decode, write_gradients

_BLOCK_ROWS = 4096
"""Rows of the batch encoded at once. At B = 4096, n = 131,072 the (rows, n) fp32 block is
2 GiB (and as much again for AuxK's masked copy): small beside a GPU's memory, and one
product of that size keeps every multiprocessor busy."""

_CHUNK_ELEMENTS = 2**26
"""Elements of each (rows, k, d) temporary of the gradients (256 MiB in fp32): AuxK's
selection at B = 4096, k_aux = 384, d = 768 would otherwise make 4.8 GB ones."""


def gather_step(
    sae: torch.nn.Module,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    aux_coef: float,
    wide: Wide | None,
    encoder_dtype: torch.dtype | None,
    aux_normaliser: str,
    comm: Collectives,
) -> SelectionStep:
    """``sparse_step`` with gather / index_add products (module docstring); called by it
    under ``torch.no_grad`` with autocast off and ``encoder_dtype`` the autocast dtype."""
    W_enc, b_enc, W_dec, b_pre = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre
    auxk = dead_mask is not None and k_aux > 0 and aux_coef > 0
    n_local = W_enc.shape[0]
    k_a = min(k_aux, sae.n) if auxk else 0
    centred = x - b_pre
    k_local = min(sae.k if wide is None else wide.k, n_local)
    encoder = (centred, W_enc, b_enc)
    if encoder_dtype is not None and encoder_dtype != x.dtype:
        encoder = tuple(t.to(encoder_dtype) for t in encoder)
    values, indices, aux_values, aux_indices = _select(*encoder, k_local, dead_mask if auxk else None, min(k_a, n_local))
    values, aux_values = values.to(x.dtype), aux_values.to(x.dtype)
    if wide is not None:
        wide_values, wide_indices = values, indices
        values, positions = wide_values.topk(min(sae.k, k_local), dim=1, sorted=False)
        indices = wide_indices.gather(1, positions)
        wide_values, wide_indices = comm.merge(wide_values, wide_indices, wide.k)
    values, indices = comm.merge(values, indices, sae.k)

    variance = comm.batch_variance(x)
    latents = values.relu()
    error = centred - comm.shard_sum(sparse_decode(W_dec, indices, latents))
    mse_loss = comm.data_sum(error.pow(2).sum()) / variance
    grad_main = error * (-2 / variance)
    grads = tuple(_zeroed_grad(p) for p in (W_dec, W_enc, b_enc))
    _add_selection_grads(grads, W_dec, centred, indices, values, grad_main)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    wide_loss = zero
    if wide is not None:
        wide_error = centred - comm.shard_sum(sparse_decode(W_dec, wide_indices, wide_values.relu()))
        wide_loss = comm.data_sum(wide_error.pow(2).sum()) / variance
        grad_wide = wide_error * (-2 * wide.weight / variance)
        _add_selection_grads(grads, W_dec, centred, wide_indices, wide_values, grad_wide)
        grad_main = grad_main + grad_wide
    aux_loss = zero
    if auxk:
        aux_values, aux_indices = comm.merge(aux_values, aux_indices, k_a)
        any_dead = comm.shard_sum(dead_mask.sum()) > 0
        aux_residual = comm.shard_sum(sparse_decode(W_dec, aux_indices, aux_values.relu())) - error
        normaliser = auxk_normaliser(variance, error, aux_normaliser, comm.batch_variance)
        aux_loss = torch.where(any_dead, comm.data_sum(aux_residual.pow(2).sum()) / normaliser, zero)
        grad_aux = torch.where(any_dead, aux_residual * (2 * aux_coef / normaliser), zero)
        _add_selection_grads(grads, W_dec, centred, aux_indices, aux_values, grad_aux)

    write_gradients(sae, grads, grad_main, comm)
    return selection_step(mse_loss, aux_loss, aux_coef, wide, wide_loss, indices, latents)


def _select(
    centred: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead_mask: torch.Tensor | None,
    k_aux: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row block by row block, pre = c W_encᵀ + b_enc, (I, v) = TopK_k(pre) and, with a
    ``dead_mask``, (I_a, v_a) = TopK_{k_aux}(pre with live latents at −∞), I_a being latent
    indices. Returns (v, I, v_a, I_a); the AuxK pair has 0 columns without a mask."""
    batch = centred.shape[0]
    k_aux = k_aux if dead_mask is not None else 0
    values = centred.new_empty(batch, k)
    indices = torch.empty(batch, k, dtype=torch.long, device=centred.device)
    aux_values = centred.new_empty(batch, k_aux)
    aux_indices = torch.empty(batch, k_aux, dtype=torch.long, device=centred.device)
    for start in range(0, batch, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, batch - start)

        def block(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.narrow(0, start, rows)

        pre = torch.addmm(b_enc, block(centred), W_enc.t())
        torch.topk(pre, k, dim=1, sorted=False, out=(block(values), block(indices)))
        if k_aux > 0:
            dead_pre = pre.masked_fill_(dead_mask.logical_not(), float("-inf"))  # pre is not needed again
            torch.topk(dead_pre, k_aux, dim=1, sorted=False, out=(block(aux_values), block(aux_indices)))
    return values, indices, aux_values, aux_indices


def _zeroed_grad(parameter: torch.Tensor) -> torch.Tensor:
    """``parameter.grad`` zeroed in place when it has one (no new memory), else zeros."""
    grad = parameter.grad
    return grad.zero_() if grad is not None and grad.layout == torch.strided else torch.zeros_like(parameter)


def _add_selection_grads(
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    W_dec: torch.Tensor,
    centred: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    grad_reconstruction: torch.Tensor,
) -> None:
    """Add one selection's (∂W_dec, ∂W_enc, ∂b_enc) (module docstring) into ``grads``, in
    chunks of rows whose (rows, k, d) temporaries (the gathered decoder rows, the per-entry
    gradient rows) hold at most ``_CHUNK_ELEMENTS`` elements each."""
    batch, k = indices.shape
    rows = max(1, _CHUNK_ELEMENTS // (k * W_dec.shape[1]))
    for start in range(0, batch, rows):
        size = min(rows, batch - start)
        _add_chunk_grads(grads, W_dec, *(t.narrow(0, start, size) for t in (centred, indices, values, grad_reconstruction)))


def _add_chunk_grads(
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    W_dec: torch.Tensor,
    centred: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    grad_reconstruction: torch.Tensor,
) -> None:
    """``_add_selection_grads`` on one chunk of rows."""
    grad_W_dec, grad_W_enc, grad_b_enc = grads
    flat = indices.flatten()
    rows = W_dec.index_select(0, flat).view(*indices.shape, -1)
    delta = torch.bmm(rows, grad_reconstruction.unsqueeze(2)).squeeze(2)
    delta *= values > 0
    grad_W_dec.index_add_(0, flat, (values.relu().unsqueeze(2) * grad_reconstruction.unsqueeze(1)).flatten(0, 1))
    grad_W_enc.index_add_(0, flat, (delta.unsqueeze(2) * centred.unsqueeze(1)).flatten(0, 1))
    grad_b_enc.index_add_(0, flat, delta.flatten())
