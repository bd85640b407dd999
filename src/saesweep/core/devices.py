"""Where a stage's tensors live: its device setting resolved once into a ``torch.device``.

Every stage resolves its setting here at its start and hands the result to every loader and
tensor factory; nothing falls back to the CPU silently. A CUDA device is resolved with its
index (``cuda:0``), so that moves and comparisons name one device.
"""

from __future__ import annotations

import torch

from saesweep.core.errors import UserError


def resolve_device(name: str, where: str) -> torch.device:
    """``auto`` → the current CUDA device when a GPU is visible, else the CPU; ``cuda`` (or
    ``cuda:i``) → that GPU, refused naming ``where`` (the config key it came from) when none is visible; ``cpu`` → the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{where}: {name} was asked for but no GPU is visible")
        device = torch.device(name)
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)
