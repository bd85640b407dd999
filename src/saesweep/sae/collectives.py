"""How a training step combines its partial results with the other processes of a cell
trained by several of them (``train.distributed``).

A cell's latents may be split over S processes (latent shards: process s holds a
contiguous block of n/S latents, i.e. those rows of W_enc, b_enc, W_dec and of every
per-latent tensor) and its global batch over D processes (data-parallel replicas: each
takes a disjoint slice of the rows). A step then needs four operations, which this base
class defines for the one process that holds every latent and the whole batch, where each
is the identity (so the single-process step is the 1×1 case of the distributed one and
computes exactly what it always did):

- ``shard_sum``: Σ over latent shards of a partial result (a partial reconstruction
  Σ_{i in shard} z_i W_dec[i], a per-shard count);
- ``data_sum``: Σ over data-parallel replicas (a loss numerator over the rows);
- ``merge``: the global top-k of each row from every shard's local top-k candidates
  (the global top-k is the top-k of the union of the local top-k's);
- ``batch_variance``: V = ‖x − mean(x)‖²_F over the global batch.

The torch.distributed implementation is ``saesweep.train.distributed.ProcessGroups``.
"""

from __future__ import annotations

import torch


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """V = ‖x − mean_batch(x)‖²_F, the normaliser of every training loss."""
    return (x - x.mean(dim=0)).pow(2).sum()


class Collectives:
    """One process, every latent, the whole batch: every operation is the identity."""

    shards: int = 1
    """S, the number of latent shards."""

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over latent shards (in place where distributed)."""
        return tensor

    def shard_count(self, count: int) -> int:
        """Σ of an integer over latent shards."""
        return count

    def data_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over data-parallel replicas (in place where distributed)."""
        return tensor

    def data_count(self, count: int) -> int:
        """Σ of an integer over data-parallel replicas (rows of the global batch)."""
        return count

    def batch_variance(self, x: torch.Tensor) -> torch.Tensor:
        """V = ‖x − mean(x)‖²_F of the global batch (``batch_variance`` here)."""
        return batch_variance(x)

    def merge(self, values: torch.Tensor, positions: torch.Tensor, k: int,
              ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top-k of each row, given this shard's candidates: ``values`` (B, m)
        at ``positions`` (B, m) into ``ids`` (local latent indices; None: the positions are
        local latent indices). Returns (values, positions) of shape (B, k) in the same
        terms, where an entry held by another shard has value 0 and position 0 (so it adds
        nothing to a decode or a gradient, and does not fire). Here: the candidates themselves."""
        return values, positions


LOCAL = Collectives()
"""The single-process collectives."""
