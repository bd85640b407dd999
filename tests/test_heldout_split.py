"""The validation / test parts of the evaluated held-out tokens: disjoint windows that cover
every evaluated token, and per-part sums that give the accumulator's metrics on each part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CPU, tiny_config
from saesweep.core.split import PARTS, TEST, VALIDATION, WINDOWS_KEY
from saesweep.data.activations import ActivationStore, extract
from saesweep.data.corpus import prepare_corpus
from saesweep.evaluation.evaluate import evaluate_cell
from saesweep.evaluation.metrics import ReconstructionAccumulator
from saesweep.plan.config import validate_config
from saesweep.plan.settings import corpus_dir, eval_settings, extraction_settings
from test_evaluate import saved_topk_cell


def test_parts_are_disjoint_windows_and_their_sums_are_the_metrics_of_their_tokens(
    tmp_path: Path, tiny_model: Path, tiny_corpus: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = validate_config(tiny_config(tiny_model, tiny_corpus, **{"evaluate.tokens": 500, "evaluate.batch_size": 64}))
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    extract(extraction_settings(config, "eval", device="cpu"))
    settings = eval_settings(config, "resid2", "topk-n64-k4-s0")
    store = ActivationStore(settings.eval_activations)
    folder = tmp_path / "cell"
    sae = saved_topk_cell(store, folder)
    metrics = evaluate_cell(settings, folder, tmp_path / "metrics.json")

    block = metrics[WINDOWS_KEY]
    width = block["tokens_per_window"]
    assert width == store.manifest["context"] - store.manifest["skip_positions"]
    windows = {part: block[part]["window"] for part in PARTS}
    assert not set(windows[VALIDATION]) & set(windows[TEST])
    assert sorted(windows[VALIDATION] + windows[TEST]) == list(range(-(-500 // width)))
    assert sum(block[VALIDATION]["tokens"]) + sum(block[TEST]["tokens"]) == metrics["eval_tokens"] == 500
    activations = store.head(500, CPU)
    for part in PARTS:
        tokens = torch.cat([torch.arange(w * width, min((w + 1) * width, 500)) for w in windows[part]])
        x = sae.normalise(activations[tokens])
        codes = sae.encode(x)
        reference = ReconstructionAccumulator(n_latents=64)
        reference.update(x, sae.decode(codes), codes.col_indices(), codes.values())
        expected = reference.result()
        assert metrics[part]["nmse"] == pytest.approx(expected["normalised_mse"], rel=1e-9)
        assert metrics[part]["l0"] == pytest.approx(expected["l0"], rel=1e-12)
        assert metrics[part]["tokens"] == len(tokens)
