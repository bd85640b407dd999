"""The architectures by name: one module each, registered here.

Adding an architecture is one module with a ``SparseAutoencoder`` subclass and one line in
``ARCHITECTURES``; the config schema, the cell names, training, evaluation, export and the
standard tests (tests/test_architectures.py) pick it up from here.
"""

from __future__ import annotations

from typing import Any

from saesweep.core.errors import UserError
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.gated import GatedSAE
from saesweep.sae.jumprelu import JumpReLUSAE
from saesweep.sae.relu import ReLUSAE
from saesweep.sae.topk import MultiTopKSAE, TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.name: cls for cls in (TopKSAE, MultiTopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE, GatedSAE)
}


def architecture(name: str, key: str = "arch") -> type[SparseAutoencoder]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UserError(f"{key}: unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}") from None


def resolve_params(name: str, given: dict[str, Any], key: str, complete: bool = True) -> dict[str, Any]:
    """Every parameter of architecture ``name``: ``given`` checked (unknown names and bad
    values name ``key`` and list the valid parameters), the rest from the defaults. With
    ``complete=False`` (an SAE trained elsewhere, see ``interop.raw_form``) a parameter that has no
    default and is not given is None: unknown, as a training coefficient of another tool is."""
    cls = architecture(name, key)
    declared = {parameter.name: parameter for parameter in cls.all_arch_parameters()}
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


def build_sae(name: str, d: int, n: int, params: dict[str, Any]) -> SparseAutoencoder:
    """A new (uninitialised) SAE of architecture ``name`` with resolved ``params``."""
    return architecture(name)(d, n, params)
