"""Which evaluations are comparable: the protocol hash of ``evaluation.comparability``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from conftest import tiny_config
from saesweep.evaluation.comparability import protocol_hash
from saesweep.plan.config import validate_config
from saesweep.plan.settings import eval_settings

MANIFEST = {"settings_hash": "0123456789abcdef", "corpus_fingerprint": "corpus-a"}


def test_protocol_hash_ignores_where_a_cell_ran_and_sees_what_it_measured(tmp_path: Path) -> None:
    config = validate_config(tiny_config(tmp_path / "model", tmp_path / "corpus"))
    one = eval_settings(config, "resid2", "topk-n64-k4-s0")
    other = eval_settings(config, "resid2", "topk-n256-k16-s1")
    assert one.cell != other.cell and one.seed != other.seed
    same = protocol_hash(one, MANIFEST)
    assert protocol_hash(other, MANIFEST) == same
    assert protocol_hash(replace(one, device="cuda", batch_size=7, lm_batch_size=1, eval_activations="/elsewhere"), MANIFEST) == same
    # what is measured, and on which held-out tokens, changes it
    assert protocol_hash(replace(one, tokens=one.tokens + 1), MANIFEST) != same
    assert protocol_hash(replace(one, downstream_windows=1), MANIFEST) != same
    assert protocol_hash(one, {**MANIFEST, "corpus_fingerprint": "corpus-b"}) != same
    assert protocol_hash(one, {**MANIFEST, "settings_hash": "fedcba9876543210"}) != same
