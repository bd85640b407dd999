"""Evaluation on the tiny LM: SAEs whose reconstruction is known pin the downstream metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from saesweep.cli import main as cli_main
from saesweep.plan.config import validate_config
from saesweep.plan.settings import eval_settings
from saesweep.sae.export import save_sae
from saesweep.sae.registry import resolve_params
from saesweep.evaluation.evaluate import (
    Downstream,
    ablation_metrics,
    dense_codes,
    downstream_metrics,
    k_transfer_values,
    reconstruction_metrics,
    spliced_logits,
)
from conftest import CPU
from saesweep.core.job_settings import ModelSettings, to_json
from saesweep.data.lm import capture_sites, load_lm
from saesweep.sae.topk import TopKSAE


def exact_sae(d: int) -> TopKSAE:
    """n = 2d latents ±e_i with k = d: for every x exactly one of x_i, −x_i is positive,
    so the top d pre-activations are the positive parts and x̂ = x exactly."""
    sae = TopKSAE(d, 2 * d, {"k": d})
    with torch.no_grad():
        directions = torch.cat([torch.eye(d), -torch.eye(d)])
        sae.W_enc.copy_(directions)
        sae.W_dec.copy_(directions)
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def zero_sae(d: int) -> TopKSAE:
    """x̂ = 0 in raw units: zero decoder, zero b_pre, zero mean, unit scale."""
    sae = exact_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def downstream(tiny_model: Path) -> Downstream:
    lm, _ = load_lm(ModelSettings(str(tiny_model), None, None, "float32", False, None), CPU)
    windows = torch.randint(0, lm.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    return Downstream(lm, "resid1", windows, skip=1, batch=4)


def test_perfect_reconstruction_gives_zero_delta_and_full_recovery(downstream: Downstream) -> None:
    metrics = downstream_metrics(exact_sae(32), downstream, [32])
    assert metrics["delta_lm_loss"] == pytest.approx(0, abs=1e-5)
    assert metrics["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert metrics["ce_loss_recovered"] == pytest.approx(1, abs=1e-4)
    assert metrics["kl_score"] == pytest.approx(1, abs=1e-4)
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"]


def test_zero_reconstruction_recovers_nothing(downstream: Downstream) -> None:
    metrics = downstream_metrics(zero_sae(32), downstream, [32])
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_zero_ablation"], abs=1e-6)
    assert metrics["ce_loss_recovered"] == pytest.approx(0, abs=1e-6)
    assert metrics["kl_score"] == pytest.approx(0, abs=1e-6)
    assert metrics["delta_lm_loss_error_added"] == pytest.approx(0, abs=1e-5)


def test_reconstruction_metrics_of_an_exact_sae() -> None:
    activations = torch.randn(500, 32, generator=torch.Generator().manual_seed(1)) * 3 + 1
    metrics = reconstruction_metrics(exact_sae(32), activations, batch_size=128, ks=[16, 32])
    assert metrics["nmse"] == pytest.approx(0, abs=1e-10)
    assert metrics["cosine_similarity"] == pytest.approx(1, abs=1e-6)
    assert metrics["k_transfer_nmse"]["32"] == pytest.approx(0, abs=1e-10)
    assert 0 < metrics["k_transfer_nmse"]["16"] < 1  # half the coordinates dropped
    assert metrics["l0"] <= 32


def test_k_transfer_values_are_distinct_and_within_bounds() -> None:
    assert k_transfer_values(32, 100, [0.5, 1, 2, 4]) == [16, 32, 64, 99]
    assert k_transfer_values(1, 8, [0.5, 1]) == [1]


def test_ablation_scores_every_sampled_latent_at_one_position(downstream: Downstream) -> None:
    """Every sampled latent fires in the windows, so every one is scored (none dropped); the
    score is in (0, 1]; sampling more latents narrows the interval of the mean."""
    lm, windows, skip = downstream.lm, downstream.windows[:2], downstream.skip
    d = lm.config.hidden_size
    sae = exact_sae(d)
    activations = capture_sites(lm, windows, ["resid1"])["resid1"][:, skip:].float().reshape(-1, d)
    codes = dense_codes(sae, activations)
    few = ablation_metrics(sae, lm, "resid1", windows, skip, codes, count=4, seed=0)
    many = ablation_metrics(sae, lm, "resid1", windows, skip, codes, count=24, seed=0)
    assert few["ablation_sparsity_count"] == 4 and many["ablation_sparsity_count"] == 24
    assert 0 < few["ablation_sparsity"] <= 1 and 0 < many["ablation_sparsity"] <= 1
    assert many["ablation_sparsity_se"] < few["ablation_sparsity_se"]


def test_ablation_of_one_position_changes_nothing_before_it(downstream: Downstream) -> None:
    """The spliced forward is causal: removing a latent at position p of a window leaves the
    logits before p as they are, so only positions from p on carry the ablation's effect."""
    lm, skip = downstream.lm, downstream.skip
    ids = downstream.windows[:1]
    position = 7

    def without_first_latent(a: torch.Tensor) -> torch.Tensor:
        out = a.clone()
        out[0, position, 0] = 0.0
        return out

    base = spliced_logits(lm, "resid1", ids, skip, lambda a: a)
    ablated = spliced_logits(lm, "resid1", ids, skip, without_first_latent)
    assert torch.equal(ablated[0, : skip + position], base[0, : skip + position])
    assert not torch.equal(ablated[0, skip + position :], base[0, skip + position :])


def damage_weights(weights: Path, damage: str) -> str:
    """Damage a cell's weights file (a TopK SAE, n = 64, d = 32) in place; the words the
    error must say."""
    tensors = load_file(str(weights))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        return "cannot be read: truncated"
    if damage == "SAELens file":  # the tensors of a SAELens TopK SAE of the same size
        save_file({"W_enc": tensors["W_enc"].T.contiguous(), "W_dec": tensors["W_dec"], "b_enc": tensors["b_enc"],
                   "b_dec": tensors["b_pre"]}, str(weights))
        return "hold SAELens tensors (W_dec, W_enc, b_dec, b_enc), not a saesweep SAE's"
    if damage == "tensor missing":
        save_file({name: value for name, value in tensors.items() if name != "b_pre"}, str(weights))
        return "lacks b_pre"
    if damage == "float16":
        save_file({name: value.half() for name, value in tensors.items()}, str(weights))
        return "W_enc is float16, not float32"
    cfg = json.loads((weights.parent / "cfg.json").read_text())
    (weights.parent / "cfg.json").write_text(json.dumps({**cfg, "n_latents": 128}))
    return f"W_enc has shape (64, 32), not (128, 32); {weights.parent / 'cfg.json'} says topk, n_latents 128, d 32"


@pytest.mark.parametrize("damage", ["truncated", "SAELens file", "tensor missing", "float16", "cfg.json's n"])
def test_bad_weights_end_in_one_line_naming_the_file(damage, tmp_path, capsys) -> None:
    """``saesweep evaluate`` of a cell whose weights file is damaged, another tool's, or not the
    SAE its cfg.json describes: exit 2, one line naming the file and what is wrong, no metrics."""
    cell = tmp_path / "topk-n64-k4-s0"
    params = resolve_params("topk", {"k": 4}, "test")
    save_sae(TopKSAE(32, 64, params), cell, {"arch": "topk", "d": 32, "n_latents": 64, "params": params, "site": "resid2"})
    expected = damage_weights(cell / "sae.safetensors", damage)
    config = validate_config(tiny_config(Path("/nonexistent/model"), Path("/nonexistent/corpus")))
    (tmp_path / "settings.json").write_text(json.dumps(to_json(eval_settings(config, "resid2", cell.name))))
    code = cli_main(["evaluate", "--settings", str(tmp_path / "settings.json"), "--cell", str(cell),
                     "--out", str(cell / "metrics.json")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"saesweep evaluate: error: SAE weights {cell / 'sae.safetensors'}"), lines
    assert expected in lines[0], lines
    assert not (cell / "metrics.json").exists()
