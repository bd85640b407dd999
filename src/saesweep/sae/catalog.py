"""Each architecture's name, sweepable parameters and AuxK flag, without torch.

The sweep's cells, their folder names and every job's settings are built from these when
the workflow starts, and again in each of its cluster jobs, so reading them must not import
torch (seconds per start). The architectures (``saesweep.sae.<arch>``) take their
parameters from here and add the equations; ``saesweep.sae.registry`` maps the same names
to those classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from saesweep.core.errors import UserError


@dataclass(frozen=True)
class Parameter:
    """One parameter of an architecture, settable per cell in ``sweep.archs.{arch}``."""

    name: str
    """The config key, e.g. ``k`` or ``l1_coef``."""
    tag: str
    """Its short name in a cell's folder name, e.g. ``k`` in ``topk-n4096-k32-s0``: lower-case letters."""
    default: int | float | None
    """The value a cell takes when the sweep does not set it; ``None``: the sweep must set it."""
    doc: str
    """What it means and where its default comes from."""
    integer: bool = False
    """Whole numbers only (e.g. k)."""
    minimum: float = 0.0
    """The lower bound of valid values …"""
    minimum_allowed: bool = False
    """… which is itself valid when True (else values must exceed it)."""
    maximum: float | None = None
    """The largest valid value (inclusive), if any."""

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this parameter, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if self.integer and not float(value).is_integer():
            return f"{value!r} is not a whole number"
        below = value < self.minimum if self.minimum_allowed else value <= self.minimum
        if not math.isfinite(value) or below:
            return f"{value!r} must be {'at least' if self.minimum_allowed else 'larger than'} {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return f"{value!r} must be at most {self.maximum:g}"
        return None


LR_FACTOR = Parameter(
    "lr_factor", "lr", 1.0,
    "multiplies the learning-rate rule train.lr for this architecture (to tune each recipe's lr "
    "on the same budget)",
)
TIED_INIT = Parameter(
    "tied_init", "ti", 1,
    "1: the encoder starts as the decoder's transpose (Gao et al. 2024, §2.4); 0: an independent "
    "random encoder, U(−1/√d, 1/√d) as torch.nn.Linear's default (the paper's ablation)",
    integer=True, minimum_allowed=True, maximum=1,
)
# AuxK (Gao et al. 2024, §2.4), parameters of the architectures that use it (``uses_auxk``).
AUX_COEF = Parameter(
    "aux_coef", "ax", 1 / 32,
    "α, the weight of the AuxK loss (paper: 1/32); 0 turns AuxK off, as the default sweep does: at "
    "its budgets AuxK raised the dead fraction (config/README.md, 'Dead latents: when AuxK helps')",
    minimum_allowed=True,
)
K_AUX = Parameter(
    "k_aux", "ka", 512,
    "latents of the auxiliary reconstruction, capped by the number of dead latents (paper: 512; "
    "'a power of two close to d_model / 2')",
    integer=True,
)
AUX_ERROR_NORM = Parameter(
    "aux_error_norm", "ae", 0,
    "what L_aux is divided by: 0, the inputs' batch variance V (as the main loss, SAELens); 1, the "
    "variance of the error it reconstructs (openai/sparse_autoencoder's code)",
    integer=True, minimum_allowed=True, maximum=1,
)
AUXK_PARAMETERS = (AUX_COEF, K_AUX, AUX_ERROR_NORM)


@dataclass(frozen=True)
class Declaration:
    """What the sweep needs to know of an architecture before any SAE exists."""

    name: str
    """Registry name, used in configs and folder names (lower-case letters and digits)."""
    parameters: tuple[Parameter, ...]
    """The architecture's own parameters, sparsity knob first (AuxK's and the shared ones come on top)."""
    uses_auxk: bool = False
    """Whether the AuxK loss applies to this architecture (its parameters ``AUXK_PARAMETERS``)."""
    shardable: bool = False
    """Whether its training step runs across processes (``train.distributed``)."""

    def all_parameters(self) -> tuple[Parameter, ...]:
        """The architecture's parameters, AuxK's where it uses AuxK, and the shared ones, knob first."""
        return (*self.parameters, *(AUXK_PARAMETERS if self.uses_auxk else ()), TIED_INIT, LR_FACTOR)


K = Parameter("k", "k", None, "active latents per token", integer=True)

TOPK = Declaration("topk", (K,), uses_auxk=True, shardable=True)
MULTITOPK = Declaration(
    "multitopk",
    (
        K,
        Parameter("multiple", "m", 4, "the wide selection has multiple · k latents (paper: 4)", integer=True, minimum=1),
        Parameter("wide_weight", "w", 0.125, "weight of the wide selection's loss (paper: 1/8)"),
    ),
    uses_auxk=True,
    shardable=True,
)
BATCHTOPK = Declaration(
    "batchtopk",
    (
        Parameter("k", "k", None, "mean active latents per token in training", integer=True),
        Parameter("threshold_rate", "r", 0.01, "rate r of the threshold's moving average (SAELens: 0.01)"),
    ),
    uses_auxk=True,
)
RELU = Declaration(
    "relu",
    (
        Parameter("l1_coef", "l", None, "λ, the weight of the L1 penalty"),
        Parameter("l1_warmup", "wu", 0.05, "share of the budget over which λ rises linearly from 0 (Anthropic: 5%)", minimum_allowed=True),
    ),
    shardable=True,
)
JUMPRELU = Declaration(
    "jumprelu",
    (
        Parameter("l0_coef", "l", None, "λ, the weight of the L0 penalty"),
        Parameter("bandwidth", "bw", 0.05, "ε, the rectangle kernel's width (SAELens: 0.05)"),
        Parameter("threshold_init", "t", 0.01, "θ₀, every latent's initial threshold (SAELens: 0.01)"),
    ),
    shardable=True,
)
GATED = Declaration("gated", (Parameter("l1_coef", "l", None, "λ, the weight of the gate's L1 penalty"),), shardable=True)
# Matryoshka (Bussmann et al. 2025, arXiv 2503.17547): nested prefixes of the dictionary.
PREFIXES = Parameter(
    "prefixes", "p", 5,
    "P, the number of nested prefixes; prefix j has the first ⌊n / 2^(P−j)⌋ latents (j = 1 … P), "
    "so widths n/16, n/8, n/4, n/2, n by default: bartbussmann/matryoshka_sae's main.py, group "
    "sizes [n/16, n/16, n/8, n/4, n/2]; 1 is the plain architecture",
    integer=True, minimum=1, minimum_allowed=True,
)
INNER_WEIGHT = Parameter(
    "inner_weight", "iw", 1.0,
    "ρ: each prefix's loss weighs ρ times the next wider one's, weights normalised to sum 1 "
    "(1: the mean over prefixes, as bartbussmann/matryoshka_sae; 0: the full width only)",
    minimum_allowed=True,
)
MATRYOSHKA = Declaration(
    "matryoshka", (*BATCHTOPK.parameters, PREFIXES, INNER_WEIGHT), uses_auxk=True,
)
MATRYOSHKATOPK = Declaration("matryoshkatopk", (K, PREFIXES, INNER_WEIGHT), uses_auxk=True)

DECLARATIONS: dict[str, Declaration] = {
    d.name: d for d in (TOPK, MULTITOPK, BATCHTOPK, RELU, JUMPRELU, GATED, MATRYOSHKA, MATRYOSHKATOPK)
}


def declaration(name: str, key: str = "arch") -> Declaration:
    """The architecture called ``name``; an unknown name lists the valid ones."""
    try:
        return DECLARATIONS[name]
    except KeyError:
        raise UserError(f"{key}: unknown architecture {name!r}; valid: {', '.join(DECLARATIONS)}") from None


def problem(n: int, params: dict[str, Any]) -> str | None:
    """Why a cell with n latents and ``params`` cannot exist (k ≥ n, or Matryoshka prefixes
    narrower than one latent), or None."""
    k = params.get("k")
    if k is not None and not 0 < k < n:
        return f"k={k} must be smaller than n_latents (got n_latents={n})"
    prefixes = params.get("prefixes")
    if prefixes is not None and n >> (int(prefixes) - 1) < 1:
        return f"prefixes={prefixes} needs n_latents ≥ 2^(prefixes − 1) = {2 ** (int(prefixes) - 1)} (got n_latents={n})"
    return None


def prefix_widths(n: int, prefixes: int) -> tuple[int, ...]:
    """A Matryoshka SAE's nested prefix widths m_j = ⌊n / 2^(P−j)⌋, j = 1 … P (strictly
    increasing when m_1 ≥ 1, since ⌊n / 2^a⌋ ≥ 2⌊n / 2^(a+1)⌋), the last being n."""
    return tuple(n >> (prefixes - j) for j in range(1, prefixes + 1))


def resolve_params(name: str, given: dict[str, Any], key: str, complete: bool = True) -> dict[str, Any]:
    """Every parameter of architecture ``name``: ``given`` checked (unknown names and bad
    values name ``key`` and list the valid parameters), the rest from the defaults. With
    ``complete=False`` (an SAE trained elsewhere, see ``interop.raw_form``) a parameter that has no
    default and is not given is None: unknown, as a training coefficient of another tool is."""
    declared = {parameter.name: parameter for parameter in declaration(name, key).all_parameters()}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise UserError(
            f"{key}.{unknown[0]}: {name} has no parameter {unknown[0]!r}; valid: {', '.join(declared)}"
        )
    params = {}
    for parameter in declared.values():
        value = given.get(parameter.name, parameter.default)
        if value is None and not complete:
            params[parameter.name] = None
            continue
        if value is None:
            raise UserError(f"{key}.{parameter.name}: required for {name} ({parameter.doc})")
        problem = parameter.check(value)
        if problem:
            raise UserError(f"{key}.{parameter.name}: {problem}")
        params[parameter.name] = int(value) if parameter.integer else float(value)
    return params
