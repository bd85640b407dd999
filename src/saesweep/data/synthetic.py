"""Synthetic activations with known features, generated into the same HDF5 shards and manifest
as extraction (``data.activations``), so that every cell can train on them unchanged.

The generator is SAELens' ``sae_lens.synthetic.SyntheticModel`` (SynthSAEBench's), built from
``SyntheticSettings``: N true feature directions f_i ∈ R^d (unit norm, pushed apart by
``orthogonalization_steps``), Zipfian firing probabilities, a hierarchy (a child fires only
when its parent does), low-rank correlated firing, per-feature magnitudes, and a bias b. A row
is a = Σ_i c_i f_i + b + ε with c the sparse feature activations and ε ~ N(0, σ² I) (σ =
``noise_std``; the one part SAELens does not model, added here).

Rows are independent draws: shard i of a split draws from its own torch stream seeded by
``shard_seed(seed, split, i)``, so the training and held-out rows are different draws from
one distribution and a shard's rows do not depend on how the work is split over jobs. The
values are a function of (settings, device kind, torch version): CPU and CUDA streams differ.

Beside each manifest, ``PLANTED`` holds the dictionary (SAELens' ``SyntheticModel.save``:
its config, feature vectors, bias, firing probabilities, hierarchy). The held-out shards also
hold the true feature activations of their rows, in compressed sparse rows (``SUPPORT``):
the ground truth the evaluation scores recovery against (``evaluation.recovery``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from saesweep.core.errors import UserError, require_package
from saesweep.core.job_settings import SyntheticSettings, to_json
from saesweep.core.provenance import provenance

if TYPE_CHECKING:  # sae_lens is imported where it is used: it is slow to import and optional
    from sae_lens.synthetic import SyntheticModel

PLANTED = "planted"
"""The folder beside a synthetic manifest that holds the planted dictionary."""
PLANTED_KEY = "planted"
"""The manifest (and shard) attribute naming that folder: present only for synthetic activations."""
SUPPORT = ("feature_offsets", "feature_indices", "feature_values")
"""Datasets of a held-out synthetic shard: the true feature activations of its rows as CSR
(row r's active features are indices[offsets[r]:offsets[r + 1]], with their values)."""
GENERATE_ROWS = 4096
"""Rows drawn at once: the dense (rows, N) feature activations of one draw are held in memory."""
SPLITS = ("train", "eval")
ORTHOGONALIZATION_LR = 3e-4
"""The learning rate of the orthogonalisation steps (SynthSAEBench-16k's)."""


def require_saelens(what: str) -> None:
    """A UserError naming ``what`` unless sae-lens (the ``peers`` extra) can be imported: the
    generator and the recovery scores are SAELens'."""
    require_package("sae_lens", "sae-lens", "peers", what)


def fingerprint(settings: SyntheticSettings) -> str:
    """What stands for the corpus fingerprint of extracted shards: the hash of the settings."""
    return provenance(to_json(settings))["settings_hash"]


def shard_seed(seed: int, split: str, index: int) -> int:
    """The torch seed of shard ``index`` of ``split``: numpy's SeedSequence of (seed, split, index)."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1)[0])


def planted_model(settings: SyntheticSettings, device: torch.device) -> SyntheticModel:
    """The SAELens SyntheticModel of ``settings`` on ``device`` (its construction seeds itself
    from ``settings.seed``, leaving the global random state as it was)."""
    require_saelens("config key synthetic")
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig, LowRankCorrelationConfig,
        OrthogonalizationConfig, SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig,
    )

    hierarchy, correlation, magnitudes = settings.hierarchy, settings.correlation, settings.magnitudes
    config = SyntheticModelConfig(
        num_features=settings.num_features,
        hidden_dim=settings.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(**settings.firing),
        hierarchy=None if hierarchy is None else HierarchyConfig(
            total_root_nodes=hierarchy["root_nodes"], branching_factor=hierarchy["branching_factor"],
            max_depth=hierarchy["max_depth"], mutually_exclusive_portion=hierarchy["mutually_exclusive_portion"],
            compensate_probabilities=True, scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=settings.orthogonalization_steps, lr=ORTHOGONALIZATION_LR)
        if settings.orthogonalization_steps else None,
        correlation=None if correlation is None else LowRankCorrelationConfig(
            rank=int(correlation["rank"]), correlation_scale=correlation["scale"],
        ),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=magnitudes["mean_start"], end=magnitudes["mean_end"]),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=magnitudes["std_mean"], std=magnitudes["std_std"]),
        bias=settings.bias,
        seed=settings.seed,
    )
    try:
        return SyntheticModel(config, device=str(device))
    except ValueError as error:  # SAELens' own checks of the values (e.g. min_prob < max_prob)
        raise UserError(f"config key synthetic: {error}") from None


@torch.no_grad()
def draw_rows(
    model: SyntheticModel, rows: int, seed: int, noise_std: float, device: torch.device
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``rows`` activations (rows, d) float32 and their true feature activations as CSR
    (offsets, indices, values), drawn ``GENERATE_ROWS`` at a time from the stream ``seed``
    (the global random state is restored afterwards)."""
    hidden, offsets, indices, values = [], [np.zeros(1, dtype=np.int64)], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, rows, GENERATE_ROWS):
            features = model.activation_generator.sample(min(GENERATE_ROWS, rows - start))
            activations = model.feature_dict(features)
            if noise_std:
                activations = activations + noise_std * torch.randn_like(activations)
            hidden.append(activations.float().cpu().numpy())
            row, col = features.nonzero(as_tuple=True)
            counts = torch.bincount(row, minlength=len(features)).cumsum(0).cpu().numpy()
            offsets.append(offsets[-1][-1] + counts)
            indices.append(col.to(torch.int32).cpu().numpy())
            values.append(features[row, col].float().cpu().numpy())
    return np.concatenate(hidden), (np.concatenate(offsets), np.concatenate(indices), np.concatenate(values))


def save_planted(model: SyntheticModel, folder: Path) -> None:
    """The dictionary into ``folder / PLANTED``, written beside it and renamed when complete."""
    target = folder / PLANTED
    staging = Path(tempfile.mkdtemp(prefix=f".{PLANTED}-", dir=folder))
    model.save(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def load_planted(path: Path, device: torch.device) -> SyntheticModel:
    """The planted dictionary saved in ``path`` (beside a manifest), on ``device``."""
    require_saelens(f"planted dictionary {path}")
    from sae_lens.synthetic import SyntheticModel

    if not path.is_dir():
        raise UserError(f"planted dictionary {path} is missing (named by its manifest); generate the activations again")
    return SyntheticModel.load_from_disk(path, device=str(device))
