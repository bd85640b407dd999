"""The floating-point operations of one training step, per architecture: the one place the
sweep counts training compute (the trainer's cumulative ``flops`` column, and from it the
compute frontier of ``analysis.compute``).

What is counted: the step's matrix products, 2 FLOPs per multiply-add, as the step runs
them (``training_step``: the sparse kernels of ``topk_kernels`` and ``support_kernels``, plain
autograd for Matryoshka). Left out: elementwise work, selections (top-k, masks), and the
optimizer's per-parameter work (decoder gradient projection, Adam, renormalisation: O(n·d)
per step, a few % of E at B = 1024). With B tokens, d inputs, n latents:

    encoder      pre = c W_encᵀ + b_enc, dense                      E = 2·B·d·n
    b_pre        ∂b_pre's encoder path −∂b_enc W_enc (sparse-kernel steps)      P = 2·n·d
    a selection of R (token, latent) entries:
                 decode Σ z W_dec[i], ∂z = G·W_dec[i], ∂W_dec, ∂W_enc           8·R·d
    a frozen-decoder selection (no ∂W_dec; its ∂W_enc joins the main one's)    4·R·d

    topk            E + P + 8·d·(B·k + B·k_a)
    multitopk       E + P + 8·d·(B·k + B·k_w + B·k_a),  k_w = min(n − 1, m·k)
    batchtopk       E + P + 8·d·(R + B·k_a)          (R = k·B, the batch selection)
    relu, jumprelu  E + P + 8·d·R                    (support pre > 0, resp. pre > θ − ε/2)
    gated           E + P + 8·d·R + 4·d·R            (support π_gate > 0; the magnitude path
                                                      shares the encoder product; the gate's
                                                      auxiliary reconstruction decodes through
                                                      stopgrad(W_dec))
    matryoshka,     12·B·d·n + 6·B·d·n·1[k_a > 0]     (dense autograd: encoder forward, ∂W_enc
    matryoshkatopk                                    and ∂c, the prefix decodes (their blocks
                                                      sum to one (B, n)·(n, d) product), ∂z,
                                                      ∂W_dec; dense AuxK: decode, ∂z, ∂W_dec)

k_a = min(k_aux, dead latents) while AuxK is on (α > 0), else 0. R is what the step reports
(``StepOutput.entries``): its support's entries, or all B·n where ``support_kernels`` ran it
as dense products (over 1/8 of the entries, e.g. ReLU early in training), so the count
follows the codes' actual sparsity and the form the products took. AuxK is counted on its
k_a entries per token even where its products run over all dead latents' (B, dead) codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Count = Any
"""An integer, or a 0-dim integer tensor (AuxK's k_a on an accelerator, read without a host
synchronisation): the formulas use arithmetic only, so either works."""

# multiply-add products per entry of a sparse selection: decode, ∂z, ∂W_dec, ∂W_enc
SELECTION = 8
# a selection decoded through stopgrad(W_dec): decode and ∂z
FROZEN_SELECTION = 4
# dense autograd step: encoder forward, ∂W_enc, ∂c, decode, ∂z, ∂W_dec (2 FLOPs each)
DENSE_STEP = 12
# dense AuxK in autograd: decode, ∂z, ∂W_dec
DENSE_AUXK = 6


def encoder(batch: int, d: int, n: int) -> int:
    """E + P = 2·B·d·n + 2·n·d: the dense encoder product every sparse-kernel step runs, and
    ∂b_pre's encoder path."""
    return 2 * batch * d * n + 2 * n * d


def topk(batch: int, d: int, n: int, params: dict[str, Any], support: int | None, aux: Count) -> Count:
    """E + P + 8·d·(B·k + B·k_a)."""
    return encoder(batch, d, n) + SELECTION * d * batch * (int(params["k"]) + aux)


def multitopk(batch: int, d: int, n: int, params: dict[str, Any], support: int | None, aux: Count) -> Count:
    """topk's count + 8·d·B·k_w for the wide selection, k_w = min(n − 1, m·k)."""
    wide = min(n - 1, int(params["multiple"]) * int(params["k"]))
    return topk(batch, d, n, params, support, aux) + SELECTION * d * batch * wide


def batchtopk(batch: int, d: int, n: int, params: dict[str, Any], support: int | None, aux: Count) -> Count:
    """E + P + 8·d·(R + B·k_a), R the batch selection (k·B entries)."""
    return encoder(batch, d, n) + SELECTION * d * (_entries(support) + batch * aux)


def support_only(batch: int, d: int, n: int, params: dict[str, Any], support: int | None, aux: Count) -> Count:
    """E + P + 8·d·R (ReLU, JumpReLU: no AuxK)."""
    return encoder(batch, d, n) + SELECTION * d * _entries(support)


def gated(batch: int, d: int, n: int, params: dict[str, Any], support: int | None, aux: Count) -> Count:
    """E + P + 8·d·R + 4·d·R: the magnitude path's selection and the gate's frozen-decoder one."""
    return encoder(batch, d, n) + (SELECTION + FROZEN_SELECTION) * d * _entries(support)


def matryoshka(batch: int, d: int, n: int, params: dict[str, Any], support: int | None, aux: Count) -> Count:
    """12·B·d·n + 6·B·d·n·1[k_a > 0] (plain dense autograd)."""
    return batch * d * n * (DENSE_STEP + DENSE_AUXK * (aux > 0))


def _entries(support: int | None) -> int:
    """R, which a support-kernel step always reports."""
    if support is None:
        raise ValueError("this architecture's step count needs the support size the step reports")
    return support


RULES: dict[str, Callable[..., Count]] = {
    "topk": topk,
    "multitopk": multitopk,
    "batchtopk": batchtopk,
    "relu": support_only,
    "jumprelu": support_only,
    "gated": gated,
    "matryoshka": matryoshka,
    "matryoshkatopk": matryoshka,
}
"""Registry name → its step's count (see the module docstring); every registered architecture has one."""


def step_flops(arch: str, batch: int, d: int, n: int, params: dict[str, Any], support: int | None = None,
               aux: Count = 0) -> Count:
    """FLOPs of one training step of architecture ``arch`` on ``batch`` tokens with ``support``
    entries R in its main selection (support-kernel steps) and AuxK's k_a = ``aux``."""
    return RULES[arch](batch, d, n, params, support, aux)
