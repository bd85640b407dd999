"""Evaluation on the tiny LM: SAEs whose reconstruction is known pin the downstream metrics."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CPU, make_text, tiny_config
from saesweep.cli import main as cli_main
from saesweep.core.files import read_json
from saesweep.data.activations import ActivationStore, extract
from saesweep.data.corpus import prepare_corpus
from saesweep.evaluation.ablation import ABLATION_TOKENS, ablation_metrics, sample_tokens, token_ablation_scores
from saesweep.evaluation.analysis import analysis_metrics, explain_metrics
from saesweep.evaluation.evaluate import (
    Downstream,
    downstream_metrics,
    evaluate_cell,
    k_transfer_values,
    reconstruction_metrics,
)
from saesweep.core.job_settings import ModelSettings, to_json
from saesweep.evaluation.probes import best_latent_probe_loss
from saesweep.evaluation.metrics import ablation_sparsity
from saesweep.evaluation.splice import reconstructor, spliced_logits
from saesweep.evaluation.token_tasks import label_tokens
from saesweep.data.lm import capture_sites, load_lm
from saesweep.plan.config import validate_config
from saesweep.plan.settings import corpus_dir, eval_settings, extraction_settings
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.export import save_sae
from saesweep.sae.registry import build_sae, resolve_params
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
    metrics = reconstruction_metrics(exact_sae(32), activations, batch_size=128, ks=[16, 32], refine_tokens=200)
    assert metrics["nmse"] == pytest.approx(0, abs=1e-10)
    assert metrics["refine_tokens"] == 200 and metrics["refined_nmse"] == pytest.approx(0, abs=1e-10)
    assert metrics["shrinkage_ratio"] == pytest.approx(1, abs=1e-5)  # the exact values need no refit
    assert sum(metrics["firing_histogram"]["counts"]) + metrics["firing_histogram"]["dead"] == 64
    assert metrics["cosine_similarity"] == pytest.approx(1, abs=1e-6)
    assert metrics["k_transfer_nmse"]["32"] == pytest.approx(0, abs=1e-10)
    assert 0 < metrics["k_transfer_nmse"]["16"] < 1  # half the coordinates dropped
    assert metrics["l0"] <= 32


def test_k_transfer_values_are_distinct_and_within_bounds() -> None:
    assert k_transfer_values(32, 100, [0.5, 1, 2, 4]) == [16, 32, 64, 99]
    assert k_transfer_values(1, 8, [0.5, 1]) == [1]


def full_forward_scores(sae: SparseAutoencoder, lm: torch.nn.Module, window: torch.Tensor, skip: int, position: int) -> list[float]:
    """The definition of ``evaluation.ablation`` without its cache: per active latent of the
    token at ``position``, whole-window forwards with and without it, Δ at the 16 positions
    from ``position``."""
    reconstruct = reconstructor(sae)
    activation = capture_sites(lm, window[None], ["resid1"])["resid1"][0, position].float()
    codes = sae.encode(sae.normalise(activation[None])).to_dense()[0]
    base = spliced_logits(lm, "resid1", window[None], skip, reconstruct)
    scores = []
    for latent in codes.nonzero().squeeze(1).tolist():
        def without(a: torch.Tensor, latent: int = latent) -> torch.Tensor:
            out = reconstruct(a)
            out[0, position - skip] -= codes[latent] * sae.W_dec[latent] * sae.act_scale
            return out
        ablated = spliced_logits(lm, "resid1", window[None], skip, without)
        scores.append(ablation_sparsity((ablated - base)[0, position : position + ABLATION_TOKENS]))
    return scores


def test_ablation_ablates_every_active_latent_over_sixteen_positions(downstream: Downstream) -> None:
    """Each active latent of the token (k = 6 of a TopK SAE) is ablated, and its score equals
    the definition computed from whole-window forwards (no cache)."""
    lm, window, skip = downstream.lm, downstream.windows[0], downstream.skip
    d = lm.config.hidden_size
    sae = TopKSAE(d, 48, resolve_params("topk", {"k": 6}, "test"))
    sae.initialise(torch.randn(64, d, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    latents, scores = token_ablation_scores(sae, lm, "resid1", window, skip, 5, batch=4)
    assert len(latents) == len(scores) == 6
    assert scores == pytest.approx(full_forward_scores(sae, lm, window, skip, 5), rel=1e-4)


def test_ablation_normalises_by_sixteen_positions_not_the_window(downstream: Downstream) -> None:
    """With every attention output zeroed, an ablation at p changes the logits at p only: the
    score over T = 16 positions is the one-position score / 16 (the paper's fixed T; a score
    taken to the end of the window would divide by the positions left instead)."""
    lm = copy.deepcopy(downstream.lm)
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    window, skip = downstream.windows[1], downstream.skip
    sae = exact_sae(lm.config.hidden_size)
    position = 3
    _, scores = token_ablation_scores(sae, lm, "resid1", window, skip, position, batch=8)
    reconstruct = reconstructor(sae)
    base = spliced_logits(lm, "resid1", window[None], skip, reconstruct)
    activation = capture_sites(lm, window[None], ["resid1"])["resid1"][0, position].float()
    codes = sae.encode(activation[None]).to_dense()[0]
    one_position = []
    for latent in codes.nonzero().squeeze(1).tolist():
        def without(a: torch.Tensor, latent: int = latent) -> torch.Tensor:
            out = reconstruct(a)
            out[0, position - skip] -= codes[latent] * sae.W_dec[latent]
            return out
        delta = (spliced_logits(lm, "resid1", window[None], skip, without) - base)[0]
        assert delta[position + 1 :].abs().max() < 1e-5  # nothing moves after p
        one_position.append(ablation_sparsity(delta[position : position + 1]))
    assert len(scores) == lm.config.hidden_size  # the exact SAE has d active latents
    assert scores == pytest.approx([s / ABLATION_TOKENS for s in one_position], rel=1e-3)


def test_ablation_metrics_average_tokens(downstream: Downstream) -> None:
    """ablation_sparsity is the mean over the sampled tokens of each token's mean over its
    active latents; the tokens are distinct and leave T positions in their window."""
    lm, windows, skip = downstream.lm, downstream.windows[:2], downstream.skip
    sae = exact_sae(lm.config.hidden_size)
    result = ablation_metrics(sae, lm, "resid1", windows, skip, tokens=3, batch=16, seed=0)
    sampled = sample_tokens(2, windows.shape[1], skip, 3, seed=0)
    assert len(set(sampled)) == 3 and all(max(skip, 1) <= p <= windows.shape[1] - ABLATION_TOKENS for _, p in sampled)
    means = []
    for window, position in sampled:
        _, scores = token_ablation_scores(sae, lm, "resid1", windows[window], skip, position, batch=16)
        means.append(sum(scores) / len(scores))
    assert result["ablation_sparsity"] == pytest.approx(sum(means) / 3)
    assert result["ablation_sparsity_count"] == 3 and result["ablation_sparsity_latents"] == 3 * lm.config.hidden_size
    capped = ablation_metrics(sae, lm, "resid1", windows, skip, tokens=3, batch=16, seed=0, cap=5)
    assert capped["ablation_sparsity_count"] == 3 and capped["ablation_sparsity_latents"] == 3 * 5
    assert capped["ablation_sparsity"] == pytest.approx(result["ablation_sparsity"], rel=0.5)  # an estimate of it


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
def dense_analysis(
    sae: SparseAutoencoder, activations: torch.Tensor, windows: torch.Tensor, strings: list[list[str]],
    candidates: int, explained: int,
) -> dict:
    """The analysis metrics as they were computed before streaming: from the dense (T, n)
    codes and pre-activations (the probes'), the screen on centred float64 columns, live
    latents from ``any`` over rows."""
    pre = sae.pre_activations(sae.normalise(activations)).detach()
    codes = sae.encode(sae.normalise(activations)).to_dense()
    per_task = {}
    for task, label in label_tokens(strings).items():
        target = torch.from_numpy(label.reshape(-1))
        half = len(target) // 2
        if not all(part.any() and not part.all() for part in (target[:half], target[half:])):
            continue
        values, y = pre[:half].double(), target[:half].double()
        centred, y = values - values.mean(dim=0), y - y.mean()
        correlation = (centred.T @ y).abs() / (centred.norm(dim=0) * y.norm()).clamp_min(1e-12)
        chosen = pre[:, correlation.topk(min(candidates, pre.shape[1])).indices]
        per_task[task] = best_latent_probe_loss(chosen, target)[0]

    def live_sample(fires: torch.Tensor, count: int) -> torch.Tensor:
        live = fires.any(dim=0).nonzero().squeeze(1)
        return live[torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[:count]].sort().values

    return {"probe_tasks": per_task, **explain_metrics(codes[:, live_sample(codes > 0, explained)], windows)}


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_streamed_analysis_equals_the_dense_computation(tiny_model: Path, arch: str) -> None:
    """Probe losses of every task and explanation metrics streamed in chunks of 7 rows
    (T = 12 · 23 = 276) equal those of the dense (T, n) pre-activations and codes."""
    lm, tokenizer = load_lm(ModelSettings(str(tiny_model), None, None, "float32", False, None), CPU)
    ids = torch.tensor(tokenizer(make_text(3, 80))["input_ids"][: 12 * 24]).reshape(12, 24)
    skip, d = 1, lm.config.hidden_size
    activations = capture_sites(lm, ids, ["resid1"])["resid1"][:, skip:].float().reshape(-1, d)
    sae = build_sae(arch, d, 96, resolve_params(arch, {"k": 6} if arch == "topk" else {"l1_coef": 0.01}, "test"))
    generator = torch.Generator().manual_seed(2)
    sae.initialise(sae.normalise(activations), generator)
    windows = ids[:, skip:]
    strings = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in windows]
    streamed = analysis_metrics(
        sae, lm, "resid1", activations=activations, windows=windows, token_strings=strings, ablated=ids[:3],
        skip=skip, chunk=7, probe_candidates=5, explain_latents=6, ablation_tokens=2, ablation_latents=0, lm_batch=8, pad=0, seed=0)
    dense = dense_analysis(sae, activations, windows, strings, 5, 6)
    assert streamed["probe_loss_count"] >= 3  # several tasks have both classes in each half
    assert {task: entry["loss"] for task, entry in streamed["probe_tasks"].items()} == pytest.approx(dense["probe_tasks"], abs=1e-9)
    assert streamed["ablation_sparsity_count"] == 2 and streamed["explain_precision_count"] > 0
    for name in ("ngram_precision", "ngram_recall"):
        assert streamed[name] == pytest.approx(dense[name], abs=1e-9, nan_ok=True)
        assert streamed[f"{name}_count"] == dense[f"{name}_count"] > 0
    none = analysis_metrics(  # evaluate.ablation_tokens may be 0
        sae, lm, "resid1", activations=activations, windows=windows, token_strings=strings, ablated=ids[:3],
        skip=skip, chunk=7, probe_candidates=5, explain_latents=6, ablation_tokens=0, ablation_latents=0, lm_batch=8, pad=0, seed=0)
    assert none["ablation_sparsity_count"] == 0 and none["probe_tasks"] == streamed["probe_tasks"]



def saved_topk_cell(store: ActivationStore, folder: Path) -> TopKSAE:
    """A TopK SAE (d = 32, n = 64, k = 4) initialised from the first 512 activations of
    ``store``, saved as a cell in ``folder``."""
    params = resolve_params("topk", {"k": 4}, "test")
    sae = TopKSAE(32, 64, params)
    sample = store.head(512, CPU)
    sae.set_normalisation(sample.mean(dim=0), float((sample - sample.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt() / 32**0.5))
    sae.initialise(sae.normalise(sample), torch.Generator().manual_seed(0))
    folder.mkdir()
    save_sae(sae, folder, {"arch": "topk", "d": 32, "n_latents": 64, "params": params, "site": "resid2", "seed": 0})
    return sae

def test_evaluation_never_encodes_more_than_a_chunk(tmp_path: Path, tiny_model: Path, tiny_corpus: Path, monkeypatch) -> None:
    """A whole evaluation of a cell whose SAE refuses to compute pre-activations of more than
    ``evaluate.batch_size`` rows at once (the analysis has T = 32 · 31 = 992 rows): every
    metric is computed from chunks."""
    monkeypatch.chdir(tmp_path)
    chunk = 40
    config = validate_config(tiny_config(tiny_model, tiny_corpus, **{
        "evaluate.batch_size": chunk, "evaluate.lm_batch_size": 1, "evaluate.tokens": 500}))
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    extract(extraction_settings(config, "eval", device="cpu"))
    cell = "topk-n64-k4-s0"
    settings = eval_settings(config, "resid2", cell)
    store = ActivationStore(settings.eval_activations)
    folder = tmp_path / "cell"
    saved_topk_cell(store, folder)
    original = SparseAutoencoder.pre_activations
    largest = []

    def guarded(self: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
        largest.append(len(x))
        if len(x) > chunk:
            raise AssertionError(f"pre-activations of {len(x)} rows at once")
        return original(self, x)

    monkeypatch.setattr(SparseAutoencoder, "pre_activations", guarded)
    metrics = evaluate_cell(settings, folder, tmp_path / "metrics.json")
    assert max(largest) == chunk and sum(largest) > 2 * 32 * 31  # the analysis tokens were encoded in chunks
    assert read_json(tmp_path / "metrics.json", "metrics")["probe_loss_count"] == metrics["probe_loss_count"] > 0
    assert metrics["explain_precision_count"] > 0 and metrics["ngram_precision_count"] > 0
    assert metrics["ablation_sparsity_count"] == 2


def test_probes_read_pre_activations_where_the_code_is_zero() -> None:
    """A TopK SAE (k = 1) whose latent 0 always wins the selection and whose latent 1's
    pre-activation is +1 on tokens with a leading space and −1 elsewhere: latent 1's code is
    0 on every token, so a probe on codes knows nothing (its loss is the label entropy), while
    the probe on pre-activations (Gao et al. 2024) separates the classes."""
    g = torch.Generator().manual_seed(0)
    windows, width = 16, 12
    spaced = torch.rand(windows, width, generator=g) < 0.5
    strings = [["Ġthe" if s else "x" for s in row] for row in spaced.tolist()]
    activations = torch.stack([spaced.flatten().float() * 2 - 1, torch.randn(windows * width, generator=g)], dim=1)
    sae = TopKSAE(2, 3, {"k": 1})
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([10.0, 0.0, 0.0]))
        sae.b_pre.zero_()
    codes = sae.encode(activations).to_dense()
    assert codes[:, 1].eq(0).all() and codes[:, 0].eq(10).all()
    metrics = analysis_metrics(
        sae, None, "resid1", activations=activations, windows=torch.zeros(windows, width, dtype=torch.long),
        token_strings=strings, ablated=torch.zeros(0, width + 1, dtype=torch.long), skip=1, chunk=7,
        probe_candidates=2, explain_latents=0, ablation_tokens=0, ablation_latents=0, lm_batch=1, pad=0, seed=0)
    task = metrics["probe_tasks"]["leading_space"]
    assert task["label_entropy"] > 0.6 and task["loss"] < 0.05
