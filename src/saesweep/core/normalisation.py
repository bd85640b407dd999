"""The maps from raw site activations a (…, d) to an SAE's inputs x, and back.

Two kinds (config key ``train.input_normalisation``, chosen by ``protocol``):

``global``, one affine map for every token, from the training activations' statistics
(μ the mean activation, s² = E‖a − μ‖² / d; ``data.activations`` writes both to the manifest):

    x = (a − μ) / s,                    a = s · x + μ

``per_token``, each token on its own (Gao et al. 2024, §2.1: subtract the mean over d_model,
scale to a fixed norm; openai/sparse_autoencoder's ``LN``): with m(a) = Σ_j a_j / d the
token's mean over its d coordinates and r(a) = ‖a − m(a)‖ / √d its centred RMS norm,

    x = (a − m(a)) / r(a),              â = r(a) · x̂ + m(a)

so ‖x‖² = d for every token, the scale E‖x‖² = d of the global map (the paper says unit
norm and the code divides by the standard deviation with Bessel's correction: factors √d and
√(d/(d−1)) that no normalised error sees; this scale keeps the learning rate, the firing
threshold and the initialisation meaning what they mean under the global map). A token's
reconstruction x̂ goes back to raw units with that token's own m(a) and r(a), so the inverse
needs the raw activations a it came from. x is invariant when a token is rescaled by a
positive factor, so per-token errors weigh every token alike, whatever its norm.
"""

from __future__ import annotations

import math

import torch

GLOBAL = "global"
"""One affine map (a − μ) / s for every token."""
PER_TOKEN = "per_token"
"""Each token centred over its coordinates and scaled to ‖x‖² = d."""
KINDS = (GLOBAL, PER_TOKEN)
"""Every kind, as the config and the settings name them."""
RMS_FLOOR = 1e-8
"""r(a) is at least this (a constant token has no direction to keep)."""


def token_statistics(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m(a), r(a)) of each token, each of shape (…, 1): the mean over the last dimension and
    the centred RMS norm ‖a − m(a)‖ / √d (at least ``RMS_FLOOR``)."""
    mean = activations.mean(dim=-1, keepdim=True)
    rms = (activations - mean).norm(dim=-1, keepdim=True) / math.sqrt(activations.shape[-1])
    return mean, rms.clamp_min(RMS_FLOOR)


def normalise(activations: torch.Tensor, kind: str, mean: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Raw activations a → inputs x of ``kind`` (the module docstring); ``mean`` μ and
    ``scale`` s serve the global map only."""
    if kind == PER_TOKEN:
        token_mean, rms = token_statistics(activations)
        return (activations - token_mean) / rms
    return (activations - mean) / scale


def denormalise(
    x: torch.Tensor, activations: torch.Tensor, kind: str, mean: torch.Tensor, scale: float | torch.Tensor,
) -> torch.Tensor:
    """Inputs-space x (a reconstruction x̂) → raw units, inverting the map that took the raw
    ``activations`` a to inputs: s · x + μ (global), r(a) · x + m(a) per token."""
    if kind == PER_TOKEN:
        token_mean, rms = token_statistics(activations)
        return x * rms + token_mean
    return x * scale + mean


FORMULAS = {GLOBAL: "x = (a - act_mean) / act_scale", PER_TOKEN: "x = (a - mean_d(a)) / (norm(a - mean_d(a)) / sqrt(d))"}
"""Each kind's map, as a cell's cfg.json writes it."""


def normalisation_record(kind: str, mean_squared_norm: float, scale: float) -> dict[str, object]:
    """A cell's ``normalisation`` block of cfg.json: the kind, its formula, and the training
    tokens' global statistics (E‖a − μ‖² and s, read by the global map only)."""
    return {"kind": kind, "formula": FORMULAS[kind], "mean_squared_norm": mean_squared_norm, "scale": scale}
