"""Refinement and shrinkage (Gao et al. 2024, §5.1): how much better an SAE's code could
reconstruct its input if only its values, not its support, were chosen optimally.

For one token with normalised input x, code z with support S = {j : z_j ≠ 0} (|S| = L) and
decoder rows D_j, the refined code keeps S and refits the values by non-negative least
squares,

    z' = argmin_{c ≥ 0} ‖x − b_pre − Σ_{j∈S} c_j D_j‖²,

solved from the L × L Gram matrix G = D_S D_Sᵀ and b = D_S (x − b_pre) by accelerated
projected gradient (FISTA on ½ cᵀGc − bᵀc, c ≥ 0, step 1/λ with λ ≥ λ_max(G) the largest
Gershgorin row sum, ``REFINE_ITERATIONS`` steps from c = z_S). The solution is the exact
NNLS optimum in the limit; ``refine_kkt`` reports how far the last iterate is from it.

Reported per cell, on the first ``evaluate.refine_tokens`` of the held-out tokens the other
reconstruction metrics use (``nmse`` there is theirs, on all of them; the gain compares it
with the refined NMSE, both normalised by the variance of their own tokens):

    refined_nmse       normalised MSE of x̂' = Σ_{j∈S} z'_j D_j + b_pre (``metrics``' definition)
    refine_nmse_gain   (nmse_R − refined_nmse) / nmse_R, nmse_R the SAE's own NMSE on those
                       tokens: the share of the error its values (not its support) cause
    shrinkage_ratio    Σ z' / Σ z over every stored entry: > 1 when the encoder's values are
                       too small (shrunk, as an L1 penalty makes them), < 1 when too large
    refine_kkt         max over tokens of max_j |min(c_j, (Gc − b)_j)| / max(1, ‖b‖_∞): the
                       KKT residual of the NNLS problem at the last iterate (0 at the optimum)

Arithmetic is float32 (the SAE's). Memory: tokens are refined in groups of at most ``GATHER_ELEMENTS`` // (L · d) rows, so the
gathered rows D_S (rows, L, d) stay under GATHER_ELEMENTS floats; then (rows, L, L) for G.
"""

from __future__ import annotations

import torch

from saesweep.evaluation.metrics import NAN, ReconstructionAccumulator
from saesweep.sae.base import SparseAutoencoder

REFINE_ITERATIONS = 100
"""FISTA steps per token."""
GATHER_ELEMENTS = 1 << 23
"""At most this many decoder-row (or Gram) entries (float32) are gathered at once."""
FULL_GRAM_ELEMENTS = 1 << 24
"""Up to this many entries (n ≤ 4096), the decoder's whole Gram matrix W_dec W_decᵀ is formed
once and each token's G is gathered from it, instead of multiplying gathered rows."""


def decoder_gram(sae: SparseAutoencoder) -> torch.Tensor | None:
    """W_dec W_decᵀ (n, n) when n² ≤ ``FULL_GRAM_ELEMENTS``, else None."""
    return sae.W_dec @ sae.W_dec.T if sae.n * sae.n <= FULL_GRAM_ELEMENTS else None


def padded_support(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices (B, L), values (B, L), mask (B, L)) of a sparse CSR code tensor (B, n), each
    row's stored entries first and padded to the longest row L with index 0, value 0, mask
    False."""
    crow = codes.crow_indices()
    lengths = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=crow.device), lengths)
    slot = torch.arange(len(rows), device=crow.device) - crow[:-1].index_select(0, rows)
    width = int(lengths.max().item()) if len(lengths) else 0
    indices = torch.zeros(len(lengths), width, dtype=torch.int64, device=crow.device)
    values = torch.zeros(len(lengths), width, dtype=codes.values().dtype, device=crow.device)
    indices[rows, slot] = codes.col_indices()
    values[rows, slot] = codes.values()
    mask = torch.zeros_like(indices, dtype=torch.bool)
    mask[rows, slot] = True
    return indices, values, mask


def nnls_gram(gram: torch.Tensor, b: torch.Tensor, start: torch.Tensor, iterations: int = REFINE_ITERATIONS) -> torch.Tensor:
    """argmin_{c ≥ 0} ½ cᵀ G c − bᵀ c for a batch: G (B, L, L) positive semi-definite, b and
    start (B, L); FISTA with step 1/λ, λ = max row Σ_i |G_ji| ≥ λ_max(G) (module docstring)."""
    step = 1.0 / gram.abs().sum(dim=2).amax(dim=1).clamp_min(1e-12)[:, None]
    c = start.clamp_min(0)
    y, t = c, 1.0
    for _ in range(iterations):
        gradient = torch.bmm(gram, y.unsqueeze(2)).squeeze(2) - b
        c_next = (y - step * gradient).clamp_min(0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = c_next + ((t - 1.0) / t_next) * (c_next - c)
        c, t = c_next, t_next
    return c


def kkt_residual(gram: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, max_j |min(c_j, (Gc − b)_j)| / max(1, ‖b‖_∞): 0 exactly at the NNLS optimum."""
    gradient = torch.bmm(gram, c.unsqueeze(2)).squeeze(2) - b
    return torch.minimum(c, gradient).abs().amax(dim=1) / b.abs().amax(dim=1).clamp_min(1.0)


@torch.no_grad()
def refine_codes(
    sae: SparseAutoencoder, x: torch.Tensor, codes: torch.Tensor, full_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(refined reconstruction x̂' (B, d), (Σ z', Σ z) as float64 scalars, KKT residual (B,))
    of normalised inputs x (B, d) and their sparse CSR codes (module docstring); with
    ``full_gram`` (``decoder_gram``) G and b are gathered rather than multiplied."""
    indices, values, mask = padded_support(codes)
    width = indices.shape[1]
    out = sae.b_pre.expand_as(x).clone()
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    kkt = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    if width == 0:
        return out, sums, kkt
    rows = max(1, GATHER_ELEMENTS // (width * (width if full_gram is not None else x.shape[1])))
    target = x - sae.b_pre
    for start in range(0, len(x), rows):
        part = slice(start, start + rows)
        keep = mask[part].to(sae.W_dec.dtype)
        index = indices[part]
        atoms = sae.W_dec[index] * keep.unsqueeze(2)  # (r, L, d); padding rows are 0
        if full_gram is None:
            gram = torch.bmm(atoms, atoms.transpose(1, 2))
            b = torch.bmm(atoms, target[part].unsqueeze(2)).squeeze(2)
        else:
            gram = full_gram[index.unsqueeze(2), index.unsqueeze(1)] * (keep.unsqueeze(2) * keep.unsqueeze(1))
            b = (target[part] @ sae.W_dec.T).gather(1, index) * keep
        original = values[part] * keep
        c = nnls_gram(gram, b, original)
        kkt[part] = kkt_residual(gram, b, c).double()
        out[part] += torch.bmm(c.unsqueeze(1), atoms).squeeze(1)
        sums += torch.stack([c.double().sum(), original.double().sum()])
    return out, sums, kkt


class RefinementAccumulator:
    """Streams the refinement metrics of the module docstring over batches of tokens, up to
    ``tokens`` of them (later batches are left out)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.reconstruction = ReconstructionAccumulator()
        self.original = ReconstructionAccumulator()
        self.sums: torch.Tensor | None = None  # Σ z', Σ z
        self.kkt = 0.0
        self.gram: torch.Tensor | None = None

    def update(self, sae: SparseAutoencoder, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Add a batch: normalised inputs x (B, d) and their sparse CSR codes (B, n)."""
        room = self.tokens - self.reconstruction.n_tokens
        if room <= 0:
            return
        if room < len(x):
            x, codes = x[:room], codes.to_dense()[:room].to_sparse_csr()
        if self.gram is None and self.reconstruction.n_tokens == 0:
            self.gram = decoder_gram(sae)
        refined, sums, kkt = refine_codes(sae, x, codes, self.gram)
        self.reconstruction.update(x, refined)
        self.original.update(x, sae.decode(codes))
        self.sums = sums if self.sums is None else self.sums + sums
        if len(kkt):
            self.kkt = max(self.kkt, kkt.max().item())

    def result(self) -> dict[str, float]:
        """``refined_nmse``, ``refine_nmse_gain``, ``shrinkage_ratio``, ``refine_kkt`` and
        ``refine_tokens`` (the tokens refined)."""
        refined = self.reconstruction.result()["normalised_mse"]
        nmse = self.original.result()["normalised_mse"]
        refined_sum, original_sum = self.sums.tolist() if self.sums is not None else (NAN, NAN)
        return {
            "refined_nmse": refined,
            "refine_nmse_gain": (nmse - refined) / nmse if nmse > 0 else NAN,
            "shrinkage_ratio": refined_sum / original_sum if original_sum > 0 else NAN,
            "refine_kkt": self.kkt,
            "refine_tokens": self.reconstruction.n_tokens,
        }
