"""The loss of one TopK (or Multi-TopK) SAE training step and its gradients, fast.

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
    L_aux  = ‖stopgrad(e) − ê‖²_F / N,   N = V, or V_e = ‖e − mean_batch(e)‖²_F with
             ``aux_normaliser="error"`` (``base.auxk_normaliser``; N is a constant of the step)
    L      = L_mse + α · L_aux

Multi-TopK (Gao et al. 2024, §5.3) adds a wide selection of k_w > k latents with weight w:
    x̂_w    = b_pre + Σ_j ReLU(v_w,j) W_dec[I_w,j],  (I_w, v_w) = TopK_{k_w}(pre)
    L      = L_mse + w · ‖x − x̂_w‖²_F / V + α · L_aux

``dense_reference_step`` computes these with plain autograd on dense tensors; it is the
reference every faster implementation is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from saesweep.sae.base import StepContext, auxk_loss, auxk_normaliser, batch_variance
from saesweep.sae.collectives import LOCAL, Collectives
from saesweep.sae.selection import SelectionStep, Wide, selection_step, sparse_decode, write_gradients
from saesweep.sae.topk_gather import gather_step

__all__ = ["PRODUCTS", "SelectionStep", "Wide", "dense_reference_step", "sparse_decode", "sparse_step"]


def dense_reference_step(
    sae: nn.Module,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    aux_coef: float,
    wide: Wide | None = None,
    aux_normaliser: str = "input",
) -> SelectionStep:
    """Loss and gradients (written to each parameter's ``.grad``) by dense autograd, for an
    SAE with ``k``, ``pre_activations``, ``W_dec`` and ``b_pre`` (TopK and Multi-TopK)."""
    sae.zero_grad(set_to_none=True)
    pre = sae.pre_activations(x)
    values, indices = pre.topk(sae.k, dim=1, sorted=False)
    latents = torch.zeros_like(pre).scatter(1, indices, values.relu())
    reconstruction = latents @ sae.W_dec + sae.b_pre
    error = x - reconstruction
    variance = batch_variance(x)
    mse_loss = error.pow(2).sum() / variance
    wide_loss = torch.zeros((), dtype=x.dtype, device=x.device)
    if wide is not None:
        wide_values, wide_indices = pre.topk(wide.k, dim=1, sorted=False)
        wide_latents = torch.zeros_like(pre).scatter(1, wide_indices, wide_values.relu())
        wide_loss = (x - wide_latents @ sae.W_dec - sae.b_pre).pow(2).sum() / variance
    context = StepContext(dead_mask, k_aux, aux_coef, 0.0, 0.0, aux_normaliser)
    aux_loss = auxk_loss(sae.W_dec, pre, error, variance, context)
    loss = mse_loss + aux_coef * aux_loss + (wide.weight * wide_loss if wide is not None else 0)
    loss.backward()
    return SelectionStep(
        loss.detach(), mse_loss.detach(), aux_loss.detach(), wide_loss.detach(), indices, values.detach().relu()
    )


PRODUCTS = ("csr", "gather")
"""The step's two ways of forming its sparse products (``sparse_step``'s ``products``)."""

# When the AuxK selection holds at least this fraction of the dead latents, its decode and
# gradients run as dense products over the (B, dead) codes: on 2 CPU cores a GEMM does about
# 4× more multiply-adds per second than the gather/scatter products of a sparse selection.
_DENSE_AUX_FRACTION = 0.25

# Rows of the batch encoded at once: the (rows, n) pre-activation block is the step's largest
# temporary (64 MiB in fp32 at n = 16384). On 2 CPU cores 512–1024-row products written into
# one reused block were faster than one (B, n) product into fresh memory (page faults).
_BLOCK_ROWS = 1024


@torch.no_grad()
def sparse_step(
    sae: nn.Module,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    aux_coef: float,
    wide: Wide | None = None,
    aux_normaliser: str = "input",
    collectives: Collectives = LOCAL,
    products: str | None = None,
) -> SelectionStep:
    """The loss and gradients of ``dense_reference_step``, written by hand: only the encoder
    product is dense; no autograd graph, no gradient w.r.t. x, no dense (B, n) gradient.

    Two ways of forming the sparse products (``products``, one of ``PRODUCTS``; None: chosen
    by the device of x): ``gather`` on CUDA, the gather / index_add / embedding-bag form of
    ``topk_gather`` (no sorting, no CSR product, no host synchronisation), and ``csr`` on
    every other device, the CSR / sampled_addmm form below, tuned for a few CPU cores. Both
    compute the formulas below; either runs on any device (the tests run both on the CPU).

    With c = x − b_pre and, for each selection s (the top-k, and the AuxK top-k_a over dead
    latents) its indices I, pre-activations v and reconstruction gradient
    G = ∂L/∂(Σ_j ReLU(v_j) W_dec[I_j]) of shape (B, d):

        G_main = −2 e / V,   G_aux = 2α (ê − e) / N
        δ_bj   = 1[v_bj > 0] · G_b · W_dec[I_bj]           (∂L/∂pre at the selected entries)
        ∂W_dec[i] = Σ_s Σ_{I_bj = i} ReLU(v_bj) G_b
        ∂W_enc[i] = Σ_s Σ_{I_bj = i} δ_bj c_b,   ∂b_enc[i] = Σ_s Σ_{I_bj = i} δ_bj
        ∂b_pre    = Σ_b G_main,b − ∂b_enc W_enc              (decoder path + encoder path)

    The ``csr`` path: the encoder runs in row blocks (``_BLOCK_ROWS``), so pre is never (B, n)
    at once. AuxK works on the dead latents' decoder rows W_dec[dead], gathered once; when its selection
    covers at least ``_DENSE_AUX_FRACTION`` of them, it runs as dense products (the codes are
    then small: at most 1/_DENSE_AUX_FRACTION times the selection). Both paths: existing ``.grad``
    tensors of W_enc, b_enc and W_dec are overwritten in place (not accumulated into), new ones
    are created otherwise; b_pre gets a new one, as every parameter does in the reference.
    Inside ``torch.autocast`` the encoder product, the step's one dense matmul, runs in the
    autocast dtype (e.g. bf16), as autocast would run it, and the selected pre-activations
    are cast back; everything else runs in the parameters' dtype. Multi-TopK's wide selection
    (``wide``) is taken in the same pass (the top-k are the k largest of its top-k_w) and adds
    its own G_wide = −2w e_w / V selection to the gradients.

    Distributed (``collectives``, see ``sae.collectives``): this process holds a block of
    the latents (``dead_mask`` is its block's) and a slice of the global batch. Each
    selection is merged from every shard's local top-k; a reconstruction is the shard sum
    of the partial ones Σ_{i in shard} z_i W_dec[i]; V and the loss numerators are sums
    over the global batch, so the gradients written are this process's share of the
    single-process ones (data-parallel replicas then sum them); ∂b_pre's encoder path is
    summed over shards, so b_pre, held by every shard, gets the same gradient on each.
    The reported ``indices`` are local latent indices.
    """
    device = x.device.type
    encoder_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    products = products or ("gather" if device == "cuda" else "csr")
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, not {products!r}")
    step = gather_step if products == "gather" else _sparse_step
    with torch.autocast(device, enabled=False):
        return step(sae, x, dead_mask, k_aux, aux_coef, wide, encoder_dtype, aux_normaliser, collectives)


def _sparse_step(
    sae: nn.Module,
    x: torch.Tensor,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    aux_coef: float,
    wide: Wide | None,
    encoder_dtype: torch.dtype | None,
    aux_normaliser: str,
    comm: Collectives,
) -> SelectionStep:
    W_enc, b_enc, W_dec, b_pre = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre
    dead = (
        dead_mask.nonzero().squeeze(1)
        if dead_mask is not None and k_aux > 0 and aux_coef > 0
        else x.new_empty(0, dtype=torch.long)
    )
    k_a = min(k_aux, comm.shard_count(dead.numel()))
    centred = x - b_pre
    k_selected = sae.k if wide is None else wide.k
    # this shard's candidates: its top-k of its own latents (all of them when it has fewer)
    k_local, k_a_local = min(k_selected, W_enc.shape[0]), min(k_a, dead.numel())
    if encoder_dtype is None or encoder_dtype == x.dtype:
        values, indices, aux_values, aux_positions = _select(centred, W_enc, b_enc, k_local, dead, k_a_local)
    else:
        low = (t.to(encoder_dtype) for t in (centred, W_enc, b_enc))
        values, indices, aux_values, aux_positions = _select(*low, k_local, dead, k_a_local)
        values, aux_values = values.to(x.dtype), aux_values.to(x.dtype)
    if wide is not None:
        wide_values, wide_indices = values, indices
        values, positions = wide_values.topk(min(sae.k, k_local), dim=1, sorted=False)
        indices = wide_indices.gather(1, positions)
        wide_values, wide_indices = comm.merge(wide_values, wide_indices, wide.k)
    values, indices = comm.merge(values, indices, sae.k)
    if k_a > 0:
        aux_values, aux_positions = comm.merge(aux_values, aux_positions, k_a, dead)

    variance = comm.batch_variance(x)
    latents = values.relu()
    error = centred - comm.shard_sum(sparse_decode(W_dec, indices, latents))
    mse_loss = comm.data_sum(error.pow(2).sum()) / variance
    grad_main = error * (-2 / variance)
    grads = tuple(_grad_target(p) for p in (W_dec, W_enc, b_enc))
    _selection_grads(W_dec, centred, indices, values, grad_main, out=grads)
    wide_loss = torch.zeros((), dtype=x.dtype, device=x.device)
    if wide is not None:
        wide_error = centred - comm.shard_sum(sparse_decode(W_dec, wide_indices, wide_values.relu()))
        wide_loss = comm.data_sum(wide_error.pow(2).sum()) / variance
        grad_wide = wide_error * (-2 * wide.weight / variance)
        for grad, wide_grad in zip(grads, _selection_grads(W_dec, centred, wide_indices, wide_values, grad_wide)):
            grad += wide_grad
        grad_main = grad_main + grad_wide
    aux_loss = torch.zeros((), dtype=x.dtype, device=x.device)
    if k_a > 0 and dead.numel() == 0:  # latent shards only: every dead latent is elsewhere
        aux_residual = comm.shard_sum(torch.zeros_like(error)) - error
        normaliser = auxk_normaliser(variance, error, aux_normaliser, comm.batch_variance)
        aux_loss = comm.data_sum(aux_residual.pow(2).sum()) / normaliser
    elif k_a > 0:
        dead_W_dec = W_dec[dead]
        aux_latents = aux_values.relu()
        dense_aux = k_a >= _DENSE_AUX_FRACTION * dead.numel()
        if dense_aux:
            # scatter_add_: entries of other shards all sit at position 0 with value 0
            aux_codes = x.new_zeros(x.shape[0], dead.numel()).scatter_add_(1, aux_positions, aux_latents)
            if comm.shards == 1:
                aux_residual = torch.addmm(error, aux_codes, dead_W_dec, beta=-1)
            else:
                aux_residual = comm.shard_sum(aux_codes @ dead_W_dec) - error
        else:
            aux_residual = comm.shard_sum(sparse_decode(dead_W_dec, aux_positions, aux_latents)) - error
        normaliser = auxk_normaliser(variance, error, aux_normaliser, comm.batch_variance)
        aux_loss = comm.data_sum(aux_residual.pow(2).sum()) / normaliser
        grad_aux = aux_residual * (2 * aux_coef / normaliser)
        if dense_aux:
            aux_grads = _dense_selection_grads(dead_W_dec, centred, aux_codes, grad_aux)
        else:
            aux_grads = _selection_grads(dead_W_dec, centred, aux_positions, aux_values, grad_aux)
        for grad, dead_grad in zip(grads, aux_grads):
            grad.index_add_(0, dead, dead_grad)

    write_gradients(sae, grads, grad_main, comm)
    return selection_step(mse_loss, aux_loss, aux_coef, wide, wide_loss, indices, latents)


def _select(
    centred: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead: torch.Tensor,
    k_aux: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row block by row block, pre = c W_encᵀ + b_enc, (I, v) = TopK_k(pre) and, when
    k_aux > 0, (P_a, v_a) = TopK_{k_aux}(pre[:, dead]), P_a being positions in ``dead``.

    Returns (v, I, v_a, P_a); the AuxK pair has k_aux = 0 columns when unused."""
    batch, n = centred.shape[0], W_enc.shape[0]
    block_buffer = centred.new_empty(min(batch, _BLOCK_ROWS), n)
    values = centred.new_empty(batch, k)
    indices = torch.empty(batch, k, dtype=torch.long, device=centred.device)
    aux_values = centred.new_empty(batch, k_aux)
    aux_positions = torch.empty(batch, k_aux, dtype=torch.long, device=centred.device)
    for start in range(0, batch, _BLOCK_ROWS):
        block = slice(start, start + _BLOCK_ROWS)
        rows = centred[block]
        pre = torch.addmm(b_enc, rows, W_enc.t(), out=block_buffer[: rows.shape[0]])
        torch.topk(pre, k, dim=1, sorted=False, out=(values[block], indices[block]))
        if k_aux > 0:
            aux_out = (aux_values[block], aux_positions[block])
            torch.topk(pre.index_select(1, dead), k_aux, dim=1, sorted=False, out=aux_out)
    return values, indices, aux_values, aux_positions


def _grad_target(parameter: torch.Tensor) -> torch.Tensor:
    """Where to write ``parameter``'s gradient: its current ``.grad`` (overwritten in place)
    when it has one, else a new tensor."""
    grad = parameter.grad
    return (
        grad if grad is not None and grad.layout == torch.strided else torch.empty_like(parameter)
    )


def _dense_selection_grads(
    W_rows: torch.Tensor, centred: torch.Tensor, codes: torch.Tensor, grad_reconstruction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_selection_grads`` for a selection held densely: codes Z (B, m) with Z_bi = ReLU(v_bi)
    at the selected entries and 0 elsewhere. Z_bi > 0 exactly where δ may be non-zero, so

        ∂W_dec = Zᵀ G,   Δ = (G W_rowsᵀ) ⊙ 1[Z > 0],   ∂W_enc = Δᵀ c,   ∂b_enc = Σ_b Δ_b."""
    delta = (grad_reconstruction @ W_rows.t()).mul_(codes > 0)
    return codes.t() @ grad_reconstruction, delta.t() @ centred, delta.sum(dim=0)


def _selection_grads(
    W_rows: torch.Tensor,
    centred: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    grad_reconstruction: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One selection's (∂W_dec, ∂W_enc, ∂b_enc) (see ``sparse_step``) on the m decoder rows
    ``W_rows`` (m, d) that ``indices`` (B, k) point into: shapes (m, d), (m, d), (m,).

    The entries are sorted by latent, i.e. held as the transposed selection Sᵀ (m, B) in CSR
    form, one row per latent listing the tokens that selected it; δ = (W_rows Gᵀ) sampled on
    that pattern. ∂W_dec = ReLU(S)ᵀ G and ∂W_enc = Δᵀ c are written into ``out`` by CSR × dense
    products when it is given (no new memory: on CPU, fresh memory for an (n, d) gradient costs
    page faults at every step), else computed as one weighted bag of token rows per latent
    (embedding_bag: about twice as fast on CPU, into new memory)."""
    batch, k = indices.shape
    m = W_rows.shape[0]
    flat = indices.flatten()
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.long  # int32 sorts faster
    row_ids, order = flat.to(index_dtype).sort(stable=True)
    crow = torch.zeros(m + 1, dtype=index_dtype, device=flat.device)
    crow[1:] = torch.bincount(flat, minlength=m).cumsum(0)
    tokens = order.div(k, rounding_mode="floor").to(index_dtype)
    sorted_values = values.flatten()[order]
    latents = sorted_values.relu()

    def transposed(entries: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(crow, tokens, entries, (m, batch))

    def bags(table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding_bag(
            tokens, table, crow, mode="sum", per_sample_weights=weights, include_last_offset=True
        )

    pattern = transposed(latents)
    delta = torch.sparse.sampled_addmm(pattern, W_rows, grad_reconstruction.t(), beta=0.0).values()
    delta *= sorted_values > 0
    if out is None:
        grad_W_dec, grad_W_enc = bags(grad_reconstruction, latents), bags(centred, delta)
        grad_b_enc = delta.new_zeros(m)
    else:
        grad_W_dec, grad_W_enc, grad_b_enc = out
        grad_W_dec.addmm_(pattern, grad_reconstruction, beta=0.0)  # beta = 0: contents ignored
        grad_W_enc.addmm_(transposed(delta), centred, beta=0.0)
        grad_b_enc.zero_()
    grad_b_enc.index_add_(0, row_ids, delta)
    return grad_W_dec, grad_W_enc, grad_b_enc
