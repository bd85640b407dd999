"""Reading safetensors files (SAE weights, ours or another tool's) so that a missing,
truncated or foreign file is a UserError naming it, never the reader's traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saesweep.core.errors import UserError

SAELENS_TENSORS = ("W_enc", "W_dec", "b_dec")
"""The tensors of every SAELens weights file, whatever the architecture (``interop.saelens_format``)."""
SPARSIFY_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
"""The tensors of a sparsify weights file (``interop.sparsify_format``)."""
FOREIGN_TENSORS = {"SAELens": SAELENS_TENSORS, "sparsify": SPARSIFY_TENSORS}
"""Another tool → the tensors every one of its weights files holds (none of them a saesweep SAE's
set): named here, below both ``sae.export`` (which recognises them) and ``interop`` (which writes them)."""


@contextlib.contextmanager
def safetensors_errors(path: Path, what: str) -> Iterator[None]:
    """Turn the error of reading a missing, truncated or foreign safetensors file into a
    UserError naming ``what`` (e.g. ``SAE weights``) and ``path``."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{what} {path} do not exist") from None
    except (OSError, SafetensorError) as error:
        raise UserError(f"{what} {path} cannot be read: truncated, damaged or not a safetensors file ({error})") from None


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read into host memory; errors as ``safetensors_errors``."""
    with safetensors_errors(path, what):
        return load_file(str(path))


def check_safetensors(path: Path, what: str) -> None:
    """Read a safetensors file's header only: safetensors refuses a header that cannot be
    parsed (not a safetensors file) or does not cover the file exactly (a truncated one)."""
    with safetensors_errors(path, what), safe_open(str(path), "pt"):
        pass
