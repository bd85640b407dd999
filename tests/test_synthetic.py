"""Synthetic activations from a planted dictionary (config key ``synthetic``): generated into
the same shards as extraction, deterministic in the seed; and feature recovery scored against
the planted dictionary (``evaluation.recovery``)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from saesweep.core.errors import UserError
from saesweep.data.activations import ActivationStore, extract
from saesweep.data.synthetic import PLANTED, PLANTED_KEY, SUPPORT, load_planted
from saesweep.evaluation.recovery import LM_METRICS, lm_metrics_not_applicable, recovery_metrics, support_rows, true_support
from saesweep.plan import settings as job
from saesweep.plan.config import validate_config
from saesweep.sae.catalog import resolve_params
from saesweep.sae.registry import build_sae

pytest.importorskip("sae_lens")

CPU = torch.device("cpu")


def synthetic_config(**generator: Any) -> dict[str, Any]:
    """A validated synthetic run of 3 training shards and 2 held-out ones."""
    return validate_config({
        "run": "syn",
        "activations": {"sites": ["resid0"], "train_tokens": 2500, "eval_tokens": 1500, "shard_tokens": 1000,
                        "storage_dtype": "float32", "extract_jobs": 2},
        "sweep": {"n_latents": [32], "k": [4]},
        "train": {"geometric_median_sample": 1000},
        "evaluate": {"tokens": 1500, "batch_size": 512},
        "scaling": {"metrics": ["nmse"]},
        "synthetic": {"num_features": 64, "hidden_dim": 16, "hierarchy": {"root_nodes": 2, "max_depth": 2},
                      "correlation": {"rank": 4}, "orthogonalization_steps": 0, **generator},
    })


def generate(config: dict[str, Any], folder: Path) -> dict[str, ActivationStore]:
    """Both splits generated under ``folder``; their stores, checked (sizes and sha256)."""
    stores = {}
    for split in ("train", "eval"):
        settings = job.extraction_settings(config, split, "cpu")
        settings = dataclasses.replace(
            settings,
            output_dirs={site: str(folder / path) for site, path in settings.output_dirs.items()},
            part_files=[str(folder / path) for path in settings.part_files],
        )
        extract(settings)
        stores[split] = ActivationStore(folder / settings.output_dirs["resid0"])
    return stores


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ActivationStore]:
    return generate(synthetic_config(), tmp_path_factory.mktemp("synthetic"))


def rows(store: ActivationStore) -> np.ndarray:
    return np.concatenate([store.read(index) for index in range(len(store.shards))])


def test_shards_validate_like_extracted_ones_and_hold_the_planted_rows(generated: dict[str, ActivationStore]) -> None:
    train, held_out = generated["train"], generated["eval"]
    assert (train.tokens, held_out.tokens, train.d) == (2500, 1500, 16)
    assert [shard.tokens for shard in train.shards] == [1000, 1000, 500]  # two part jobs, one stream
    assert train.manifest[PLANTED_KEY] == PLANTED and train.manifest["model"] == "synthetic"
    a = rows(held_out)
    assert np.allclose(a.mean(axis=0), np.asarray(held_out.manifest["mean"]), atol=1e-5)
    # every held-out row is its true feature activations through the planted dictionary
    planted = load_planted(held_out.folder / PLANTED, CPU)
    dense = support_rows(true_support(held_out, len(a)), 0, len(a), 64, CPU).numpy()
    features, bias = planted.feature_dict.feature_vectors.detach(), planted.feature_dict.bias.detach()
    expected = dense @ features.numpy() + bias.numpy()
    assert np.allclose(a, expected, atol=1e-4)
    assert 1 <= (dense > 0).sum(axis=1).mean() <= 64
    # training shards carry no support (only the held-out rows are scored); both splits share the dictionary
    with h5py.File(train.shards[0].path) as shard:
        assert not any(name in shard for name in SUPPORT) and "windows" not in shard
    assert torch.equal(load_planted(train.folder / PLANTED, CPU).feature_dict.feature_vectors, features)
    # the training and held-out rows are different draws: only rows with no feature (the bias) coincide
    same = np.isclose(rows(train)[:1500], a).all(axis=1)
    assert same.mean() < 0.5 and np.allclose(a[same], bias.numpy())


def test_generation_is_deterministic_in_the_seed(generated: dict[str, ActivationStore], tmp_path: Path) -> None:
    again = generate(synthetic_config(), tmp_path / "again")
    for split in ("train", "eval"):
        assert np.array_equal(rows(again[split]), rows(generated[split]))
    other = generate(synthetic_config(seed=7), tmp_path / "other")
    assert not np.allclose(rows(other["eval"]), rows(generated["eval"]))


def planted_sae(store: ActivationStore) -> Any:
    """A ReLU SAE whose decoder is the planted dictionary F (N ≤ d here) and whose encoder
    is its pseudo-inverse: pre = (a − b) F⁺ − ε = c − ε, so z = ReLU(pre) fires exactly on
    the true support (ε = 10⁻³ absorbs rounding; true magnitudes are about 4)."""
    planted = load_planted(store.folder / PLANTED, CPU)
    features, bias = planted.feature_dict.feature_vectors.detach(), planted.feature_dict.bias.detach()
    sae = build_sae("relu", store.d, len(features), resolve_params("relu", {"l1_coef": 1.0}, "test"))
    with torch.no_grad():
        sae.set_normalisation(torch.zeros(store.d), 1.0)
        sae.W_dec.copy_(features)
        sae.W_enc.copy_(torch.linalg.pinv(features).t())
        sae.b_pre.copy_(bias)
        sae.b_enc.fill_(-1e-3)
    return sae


@pytest.fixture(scope="module")
def easy(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    """Held-out rows of 12 features in 16 dimensions (no superposition): recoverable exactly."""
    config = synthetic_config(num_features=12, hierarchy=None, correlation=None, firing={"max_prob": 0.5, "min_prob": 0.05})
    return generate(config, tmp_path_factory.mktemp("easy"))["eval"]


def test_the_planted_sae_recovers_every_feature_and_a_random_one_does_not(easy: ActivationStore) -> None:
    activations = torch.from_numpy(rows(easy))
    planted = planted_sae(easy)
    assert torch.allclose(planted.decode(planted.encode(planted.normalise(activations))), activations, atol=1e-2)
    perfect = recovery_metrics(planted, easy, activations, batch_size=500)
    assert perfect["mcc"] == pytest.approx(1.0, abs=1e-5) and perfect["feature_uniqueness"] == 1.0
    assert perfect["firing_precision"] == perfect["firing_recall"] == perfect["firing_f1"] == pytest.approx(1.0)
    assert perfect["true_l0"] == pytest.approx((support_rows(true_support(easy, len(activations)), 0, len(activations), 12, CPU) > 0).sum().item() / len(activations))
    random = planted_sae(easy)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        random.W_dec.copy_(torch.nn.functional.normalize(torch.randn(random.W_dec.shape, generator=generator), dim=1))
        random.W_enc.copy_(random.W_dec)
    scored = recovery_metrics(random, easy, activations, batch_size=500)
    assert scored["mcc"] < 0.6 and scored["firing_f1"] < 0.6


def test_lm_metrics_are_nan_with_a_reason_for_each_group() -> None:
    metrics, reasons = lm_metrics_not_applicable([2, 4])
    assert set(reasons) == set(LM_METRICS) and all("no language model" in reason for reason in reasons.values())
    assert all(np.isnan(metrics[name]) for names in LM_METRICS.values() for name in names)
    assert all(np.isnan(value) for value in metrics["k_transfer_delta_lm_loss"].values())


def test_config_of_a_synthetic_run(monkeypatch: pytest.MonkeyPatch) -> None:
    config = synthetic_config()
    assert config["model"]["hidden_size"] == 16 and config["model"]["pypi_gguf"] is None
    settings = job.extraction_settings(config, "eval")
    assert (settings.context, settings.skip_positions, settings.synthetic.num_features) == (1, 0, 64)
    raw = {"run": "x", "activations": {"sites": ["resid0"]}, "sweep": {"k": [4], "n_latents": [32]},
           "evaluate": {"tokens": 1000}, "synthetic": {}}
    with pytest.raises(UserError, match="scaling.metrics: delta_lm_loss"):
        validate_config(raw)
    with pytest.raises(UserError, match="config key model: a synthetic run"):
        validate_config({**raw, "scaling": {"metrics": ["nmse"]}, "model": {"id": "gpt2"}})
    with pytest.raises(UserError, match="required property"):  # an LM run still needs its model and corpus
        validate_config({key: value for key, value in raw.items() if key != "synthetic"})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sae_lens" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"config key synthetic needs the package sae-lens .*\[peers\]"):
        validate_config({**raw, "scaling": {"metrics": ["nmse"]}})
