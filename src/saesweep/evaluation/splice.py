"""The LM with a site's output replaced: logits of spliced forwards and the replacements
an SAE gives (its reconstruction, with or without its error added back)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from saesweep.data.lm import spliced
from saesweep.sae.base import SparseAutoencoder


@torch.no_grad()
def spliced_logits(
    lm: torch.nn.Module, site: str, windows: torch.Tensor, skip: int,
    replace: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Logits (float32, on the LM's device) of token ``windows`` (W, C), on that device, with
    the site's output at positions ≥ ``skip`` replaced by ``replace`` of it (float32
    (W, C − skip, d)); unchanged for None."""
    if replace is None:
        return lm(input_ids=windows, use_cache=False).logits.float()

    def replace_kept(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, skip:] = replace(output[:, skip:].float()).to(output.dtype)
        return output

    with spliced(lm, site, replace_kept):
        return lm(input_ids=windows, use_cache=False).logits.float()


def reconstructor(sae: SparseAutoencoder, k: int | None = None, add_error: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """a ↦ â (the SAE's reconstruction in raw units: per-token normalisation is inverted with
    each token's own mean and norm), or a ↦ â + (a − â) with ``add_error``."""

    def replace(a: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        flat = a.reshape(-1, shape[-1])
        recon = sae.denormalise(sae(sae.normalise(flat), k), flat)
        if add_error:
            recon = recon + (flat - recon)
        return recon.reshape(shape)

    return replace
