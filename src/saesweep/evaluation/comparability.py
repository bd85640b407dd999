"""What makes two evaluations' numbers comparable across runs, machines and users.

Two cells' metrics can be put on one curve when they were measured the same way on the same
held-out tokens. The evaluation settings say how, except for the fields that only say where
or in which order the job ran (``RUN_LOCAL_FIELDS``: the cell it evaluates, its seed, the
shard folder's path, the device and the batch sizes, which change no number beyond rounding);
the held-out extraction's settings hash and corpus fingerprint say which tokens. The
protocol hash covers both, so ``saesweep merge`` can compare one string per row.
"""

from __future__ import annotations

from typing import Any

from saesweep.core.job_settings import EvalSettings, to_json
from saesweep.core.provenance import settings_hash

RUN_LOCAL_FIELDS = frozenset({"cell", "setting", "seed", "eval_activations", "device", "batch_size", "lm_batch_size"})
"""Evaluation settings that differ between cells or machines without changing what is measured."""


def protocol_hash(settings: EvalSettings, held_out_manifest: dict[str, Any]) -> str:
    """settings_hash of the evaluation settings less ``RUN_LOCAL_FIELDS``, together with the
    held-out shards' extraction settings hash and corpus fingerprint (from their manifest)."""
    measured = {key: value for key, value in to_json(settings).items() if key not in RUN_LOCAL_FIELDS}
    held_out = {key: held_out_manifest[key] for key in ("settings_hash", "corpus_fingerprint")}
    return settings_hash({"evaluation": measured, "held_out": held_out})
