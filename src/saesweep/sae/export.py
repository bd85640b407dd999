"""Saving and loading a trained SAE: ``sae.safetensors`` (weights and normalisation
buffers) and ``cfg.json`` (architecture, parameters, sizes, recipe, provenance). The
architecture is found by its name in ``cfg.json``, so any registered one loads. An SAE
imported from another tool (``interop.stages``) has an ``external`` block in ``cfg.json``
and only the parameters that tool reported (its training coefficients are unknown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, write_json
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.registry import architecture, resolve_params


def save_sae(sae: SparseAutoencoder, folder: Path, cfg: dict[str, Any]) -> None:
    """Write weights, then the config (each atomically)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in sae.state_dict().items()}
    with atomic_path(Path(folder) / "sae.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_json(Path(folder) / "cfg.json", cfg)


def load_sae(folder: Path, device: torch.device) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE of a cell folder, on ``device`` and for inference (no gradients), and its config."""
    path = Path(folder) / "cfg.json"
    cfg = read_json(path, "SAE config")
    try:
        arch, d, n, given = cfg["arch"], cfg["d"], cfg["n_latents"], cfg["params"]
    except KeyError as missing:
        raise UserError(f"SAE config {path} has no key {missing}") from None
    params = resolve_params(arch, given, f"SAE config {path}: params", complete="external" not in cfg)
    with torch.device("meta"):  # shapes only: the tensors are the file's, moved to the device once
        sae = architecture(arch, f"SAE config {path}")(d, n, params).requires_grad_(False).eval()
    try:
        tensors = load_file(str(Path(folder) / "sae.safetensors"))
        sae.load_state_dict({name: tensor.to(device) for name, tensor in tensors.items()}, assign=True)
    except (OSError, RuntimeError) as error:
        raise UserError(f"SAE weights {Path(folder) / 'sae.safetensors'} cannot be read ({error})") from None
    return sae, cfg
