"""The form an SAE takes in other tools (SAELens, sparsify): weights on **raw** site
activations a, with no input normalisation. Both directions of the exchange go through it.

A raw-space SAE, in saesweep's orientation (``W_enc`` and ``W_dec`` both (n, d)):

    pre = W_enc (a − b_dec) + b_enc,   z = f(pre),   â = W_dec z + b_dec

with f one of four families (an architecture's ``inference_family``, whose extra tensors
are its ``inference_extras``): ``topk`` z = ReLU(TopK_k(pre)); ``relu`` z = ReLU(pre);
``jumprelu`` z = ReLU(pre) ⊙ 1[pre > θ] (θ per latent); ``gated`` z = 1[pre > 0] ⊙
ReLU(exp(r_mag) ⊙ (pre − b_enc) + b_mag) (``b_enc`` is the gate's bias).

Export folds saesweep's normalisation x = (a − μ)/s into the weights (``raw_form``). With
pre = W_enc (x − b_pre) + b_enc and x = (a − μ)/s,

    W_enc' = W_enc / s,   b_dec' = μ + s · b_pre,   W_dec' = s · W_dec,   b_enc, θ, r_mag, b_mag unchanged,

so pre, z (saesweep's codes, exactly) and â = s · x̂ + μ are unchanged functions of a.
BatchTopK's inference rule ReLU(pre) ⊙ 1[pre > θ] is the ``jumprelu`` family with θ for
every latent (as SAELens exports BatchTopK); Multi-TopK is a TopK SAE at its k.

Import (``to_saesweep``) is the inverse with μ = 0 and s = 1: saesweep's own architecture of
the family reads the raw activations unchanged. Folding is done in float64; the stored
tensors are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saesweep.core.errors import UserError
from saesweep.core.normalisation import GLOBAL
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params

@dataclass
class RawSAE:
    """An SAE on raw activations (the module docstring's equations), float32 tensors."""

    family: str
    """``topk``, ``relu``, ``jumprelu`` or ``gated``."""
    W_enc: torch.Tensor
    """(n, d)."""
    b_enc: torch.Tensor
    """(n,); the gate's bias for ``gated``."""
    W_dec: torch.Tensor
    """(n, d)."""
    b_dec: torch.Tensor
    """(d,): subtracted from a before encoding, added to the reconstruction."""
    k: int | None = None
    """Active latents per token (``topk`` only)."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """(n,) each: ``threshold`` θ (``jumprelu``); ``r_mag`` and ``b_mag`` (``gated``)."""

    @property
    def d(self) -> int:
        return self.W_dec.shape[1]

    @property
    def n(self) -> int:
        return self.W_dec.shape[0]


@torch.no_grad()
def raw_form(sae: SparseAutoencoder, where: str) -> RawSAE:
    """The raw-space form of a saesweep SAE (normalisation folded, see the module
    docstring); an architecture without a family, or an SAE with per-token normalisation
    (not an affine map, so nothing to fold), is a UserError naming ``where``."""
    family = sae.inference_family
    if family is None:
        known = ", ".join(name for name, cls in ARCHITECTURES.items() if cls.inference_family)
        raise UserError(f"{where}: architecture {sae.name} has no counterpart in other tools (known: {known})")
    if sae.input_normalisation != GLOBAL:
        raise UserError(
            f"{where}: the SAE normalises each token on its own (train.input_normalisation "
            f"{sae.input_normalisation}), which no weights on raw activations can express; only SAEs "
            "trained with the global map are exported"
        )
    s = sae.act_scale.double()
    W_enc, W_dec = sae.W_enc.double(), sae.W_dec.double()
    return RawSAE(
        family=family,
        W_enc=(W_enc / s).float().contiguous(),
        b_enc=sae.b_enc.detach().float().clone(),
        W_dec=(W_dec * s).float().contiguous(),
        b_dec=(sae.act_mean.double() + s * sae.b_pre.double()).float(),
        k=getattr(sae, "k", None) if family == "topk" else None,
        extra={name: value.detach().float().contiguous().clone() for name, value in sae.inference_extras().items()},
    )


@torch.no_grad()
def to_saesweep(raw: RawSAE) -> tuple[SparseAutoencoder, dict[str, int]]:
    """(saesweep SAE with μ = 0, s = 1 computing the same function of raw activations,
    the parameters it reports: k for ``topk``, none otherwise)."""
    reported = {"k": int(raw.k)} if raw.family == "topk" else {}
    params = resolve_params(raw.family, reported, "external SAE", complete=False)
    sae = build_sae(raw.family, raw.d, raw.n, params)
    sae.W_enc.copy_(raw.W_enc)
    sae.b_enc.copy_(raw.b_enc)
    sae.W_dec.copy_(raw.W_dec)
    sae.b_pre.copy_(raw.b_dec)
    sae.set_normalisation(torch.zeros(raw.d), 1.0)
    sae.set_inference_extras(raw.extra)
    return sae.eval(), reported


def without_input_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The b_enc' with W_enc (a − b_dec) + b_enc' = W_enc a + b_enc, for an SAE that does not
    subtract b_dec from its input: b_enc' = b_enc + W_enc b_dec (float64, returned float32)."""
    return (b_enc.double() + W_enc.double() @ b_dec.double()).float()


def finite(raw: RawSAE, where: str) -> RawSAE:
    """``raw`` unchanged if every tensor is finite (θ may be ±∞), else a UserError naming ``where``."""
    tensors = {"W_enc": raw.W_enc, "b_enc": raw.b_enc, "W_dec": raw.W_dec, "b_dec": raw.b_dec, **raw.extra}
    for name, value in tensors.items():
        bad = value.isnan() if name == "threshold" else ~value.isfinite()
        if bad.any():
            raise UserError(f"{where}: {name} has {int(bad.sum())} non-finite value(s)")
    return raw

