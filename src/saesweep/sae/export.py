"""Saving and loading a trained SAE: ``sae.safetensors`` (weights and normalisation
buffers) and ``cfg.json`` (architecture, parameters, sizes, recipe, provenance). The
architecture is found by its name in ``cfg.json``, so any registered one loads. An SAE
imported from another tool (``interop.stages``) has an ``external`` block in ``cfg.json``
and only the parameters that tool reported (its training coefficients are unknown).

A weights file is checked before it is used: one that cannot be read (missing, truncated,
not safetensors) or whose tensors are not those of the SAE ``cfg.json`` describes (names,
shapes, dtypes) is a UserError naming the file and what is wrong."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, write_json
from saesweep.core.normalisation import GLOBAL, KINDS
from saesweep.core.weights import FOREIGN_TENSORS, read_safetensors
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.registry import architecture, resolve_params

WEIGHTS = "sae.safetensors"
"""A cell's weights file."""


def save_sae(sae: SparseAutoencoder, folder: Path, cfg: dict[str, Any]) -> None:
    """Write weights, then the config (each atomically)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in sae.state_dict().items()}
    with atomic_path(Path(folder) / WEIGHTS) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_json(Path(folder) / "cfg.json", cfg)


def load_sae(folder: Path, device: torch.device) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE of a cell folder, for inference (no gradients) on ``device``, and its config: the
    SAE is built without storage (on ``meta``), then takes the file's tensors, moved to ``device``."""
    path = Path(folder) / "cfg.json"
    cfg = read_json(path, "SAE config")
    try:
        arch, d, n, given = cfg["arch"], cfg["d"], cfg["n_latents"], cfg["params"]
    except KeyError as missing:
        raise UserError(f"SAE config {path} has no key {missing}") from None
    params = resolve_params(arch, given, f"SAE config {path}: params", complete="external" not in cfg)
    try:
        with torch.device("meta"):
            sae = architecture(arch, f"SAE config {path}")(d, n, params).requires_grad_(False).eval()
    except (ValueError, TypeError) as error:
        raise UserError(f"SAE config {path}: no {arch} SAE has d {d!r}, n_latents {n!r} ({error})") from None
    weights = Path(folder) / WEIGHTS
    tensors = read_safetensors(weights, "SAE weights")
    problem = state_problem(sae.state_dict(), tensors)
    if problem:
        tool = foreign_tool(set(tensors))
        if tool:
            raise UserError(
                f"SAE weights {weights} hold {tool} tensors ({', '.join(sorted(tensors))}), not a saesweep SAE's: "
                "import it through an entry of the config's external list"
            )
        raise UserError(f"SAE weights {weights}: {problem}; {path} says {arch}, n_latents {n}, d {d}")
    sae.load_state_dict({name: tensor.to(device) for name, tensor in tensors.items()}, assign=True)
    sae.input_normalisation = normalisation_kind(cfg, path)
    return sae, cfg


def normalisation_kind(cfg: dict[str, Any], path: Path) -> str:
    """How the SAE of ``cfg`` maps raw activations to inputs: ``normalisation.kind`` (absent:
    ``global``, as every SAE saved before per-token normalisation existed)."""
    kind = cfg.get("normalisation", {}).get("kind", GLOBAL)
    if kind not in KINDS:
        raise UserError(f"SAE config {path}: normalisation.kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def state_problem(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps the tensors ``found`` from being a module's state ``expected``: names
    missing or extra, else the first tensor of another shape or dtype; None when all agree."""
    missing = [name for name in expected if name not in found]
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has unexpected {', '.join(extra)}"] if extra else [])
        return " and ".join(parts)
    for name, tensor in expected.items():
        if found[name].shape != tensor.shape:
            return f"{name} has shape {tuple(found[name].shape)}, not {tuple(tensor.shape)}"
        if found[name].dtype != tensor.dtype:
            return f"{name} is {dtype_name(found[name].dtype)}, not {dtype_name(tensor.dtype)}"
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for torch.float32."""
    return str(dtype).removeprefix("torch.")


def foreign_tool(names: set[str]) -> str | None:
    """The tool of ``FOREIGN_TENSORS`` whose common tensors are all among ``names``, or None."""
    return next((tool for tool, tensors in FOREIGN_TENSORS.items() if set(tensors) <= names), None)
