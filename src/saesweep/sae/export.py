"""Saving and loading a trained SAE: ``sae.safetensors`` (weights and normalisation
buffers) and ``cfg.json`` (sizes, recipe, provenance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, write_json
from saesweep.sae.topk import TopKSAE


def save_sae(sae: TopKSAE, folder: Path, cfg: dict[str, Any]) -> None:
    """Write weights, then the config (each atomically)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in sae.state_dict().items()}
    with atomic_path(Path(folder) / "sae.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_json(Path(folder) / "cfg.json", cfg)


def load_sae(folder: Path, device: str = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE of a cell folder and its config."""
    cfg = read_json(Path(folder) / "cfg.json", "SAE config")
    sae = TopKSAE(cfg["d"], cfg["n_latents"], cfg["k"])
    try:
        sae.load_state_dict(load_file(str(Path(folder) / "sae.safetensors")))
    except (OSError, RuntimeError) as error:
        raise UserError(f"SAE weights {Path(folder) / 'sae.safetensors'} cannot be read ({error})") from None
    return sae.to(device).eval(), cfg
