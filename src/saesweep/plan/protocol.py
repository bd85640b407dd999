"""Config key ``protocol``: a preset of the settings where saesweep's own recipe and the paper's
(Gao et al. 2024, and its code openai/sparse_autoencoder) differ. A preset only chooses
defaults: each of its settings is a config key of its own, whose null (the schema default)
means "as the protocol says", and a value given in the config wins.

    setting                          saesweep      gao2024       config key
    input normalisation              global        per_token     train.input_normalisation
    weight average (EMA) evaluated   none (0)      0.999         train.ema_decay
    dead window                      scaled        fixed         train.dead.window (+ window_tokens)
    L_aux divided by                 V (0)         V_e (1)       aux_error_norm of AuxK architectures' grids
    LM dtype at evaluation           model.dtype   float32       evaluate.lm_dtype

config/README.md says why saesweep's defaults differ. The AuxK normaliser is a parameter of
each cell (``sae.catalog.AUX_ERROR_NORM``), so the preset adds it to the grid of every
architecture that uses AuxK and does not set it (the cells' names then carry ``ae1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saesweep.sae.catalog import AUX_ERROR_NORM, declaration


@dataclass(frozen=True)
class Protocol:
    """The choices of one protocol."""

    input_normalisation: str
    """``core.normalisation`` kind."""
    ema_decay: float
    """β of the evaluated weight average; 0: the raw weights."""
    dead_window: str
    """``scaled`` (max(min_tokens, factor · n / k)) or ``fixed`` (``train.dead.window_tokens``)."""
    aux_error_norm: int
    """AuxK's normaliser: 0, the inputs' batch variance; 1, the error's."""
    eval_lm_dtype: str | None
    """The LM's dtype at evaluation; None: ``model.dtype``."""


PROTOCOLS: dict[str, Protocol] = {
    "saesweep": Protocol(
        input_normalisation="global", ema_decay=0.0, dead_window="scaled", aux_error_norm=0, eval_lm_dtype=None,
    ),
    # §2.1 (per-token inputs), appendix A.3 (EMA 0.999), train.py (L_aux / V_e, 10M-token dead window),
    # the LM in float32 when losses are measured
    "gao2024": Protocol(
        input_normalisation="per_token", ema_decay=0.999, dead_window="fixed", aux_error_norm=1, eval_lm_dtype="float32",
    ),
}


def apply_protocol(config: dict[str, Any]) -> None:
    """Fill, in place, every setting the config leaves null with its protocol's choice (the
    config is validated and has its schema defaults)."""
    protocol = PROTOCOLS[config["protocol"]]
    train, evaluate = config["train"], config["evaluate"]
    if train["input_normalisation"] is None:
        train["input_normalisation"] = protocol.input_normalisation
    if train["ema_decay"] is None:
        train["ema_decay"] = protocol.ema_decay
    if train["dead"]["window"] is None:
        train["dead"]["window"] = protocol.dead_window
    if evaluate["lm_dtype"] is None:
        evaluate["lm_dtype"] = protocol.eval_lm_dtype or config["model"]["dtype"]


def grid_defaults(config: dict[str, Any], arch: str, key: str) -> dict[str, list[Any]]:
    """What the protocol adds to a grid of ``arch`` (given at config key ``key``, named when
    the architecture is unknown) that does not set it: AuxK's normaliser where the
    architecture uses AuxK and the protocol's differs from the parameter's default."""
    chosen = PROTOCOLS[config["protocol"]].aux_error_norm
    if declaration(arch, key).uses_auxk and chosen != AUX_ERROR_NORM.default:
        return {AUX_ERROR_NORM.name: [chosen]}
    return {}
