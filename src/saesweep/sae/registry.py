"""The architectures by name: one module each, registered here.

Adding an architecture is its declaration in ``saesweep.sae.catalog`` (name, parameters,
AuxK; no torch, so the workflow starts fast), one module with a ``SparseAutoencoder``
subclass that takes them from there, and one line in ``ARCHITECTURES``; the config schema,
the cell names, training, evaluation, export and the standard tests
(tests/test_architectures.py) pick it up from here.
"""

from __future__ import annotations

from typing import Any

from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.catalog import declaration, resolve_params
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.gated import GatedSAE
from saesweep.sae.jumprelu import JumpReLUSAE
from saesweep.sae.matryoshka import MatryoshkaBatchTopKSAE, MatryoshkaTopKSAE
from saesweep.sae.relu import ReLUSAE
from saesweep.sae.topk import MultiTopKSAE, TopKSAE

__all__ = ["ARCHITECTURES", "architecture", "build_sae", "resolve_params"]

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.name: cls
    for cls in (TopKSAE, MultiTopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE, GatedSAE, MatryoshkaBatchTopKSAE, MatryoshkaTopKSAE)
}
"""Registry name → class: the names of ``saesweep.sae.catalog.DECLARATIONS``, in its order."""


def architecture(name: str, key: str = "arch") -> type[SparseAutoencoder]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    return ARCHITECTURES[declaration(name, key).name]


def build_sae(name: str, d: int, n: int, params: dict[str, Any]) -> SparseAutoencoder:
    """A new (uninitialised) SAE of architecture ``name`` with resolved ``params``."""
    return architecture(name)(d, n, params)
