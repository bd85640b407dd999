"""Config key ``protocol``: what ``gao2024`` sets and that each setting does what it says —
per-token normalisation (NMSE blind to each token's scale, inverted per token when spliced),
the weight average that is exported and evaluated, L_aux / V_e, a dead window counted in
tokens, the LM in float32 at evaluation — and that the default keeps saesweep's choices."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU, tiny_config
from saesweep.core.errors import UserError
from saesweep.core.job_settings import to_json
from saesweep.core.normalisation import GLOBAL, PER_TOKEN, denormalise, normalise
from saesweep.core.provenance import provenance
from saesweep.data.activations import ActivationStore, extract
from saesweep.data.corpus import prepare_corpus
from saesweep.data.lm import load_lm
from saesweep.evaluation.evaluate import evaluate_cell, reconstruction_metrics
from saesweep.evaluation.splice import reconstructor
from saesweep.interop.raw_form import raw_form
from saesweep.plan.cells import sweep_cells
from saesweep.plan.config import validate_config
from saesweep.plan.settings import activation_dir, corpus_dir, eval_settings, extraction_settings, train_settings
from saesweep.sae.base import StepContext, batch_variance
from saesweep.sae.export import load_sae
from saesweep.sae.registry import build_sae
from saesweep.sae.topk import TopKSAE
from saesweep.sae.topk_kernels import PRODUCTS, sparse_step
from saesweep.train.ema import WeightAverage
from saesweep.train.launch import train_cell
from saesweep.train.trainer import CHECKPOINT, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
GAO = {"protocol": "gao2024"}


def config_of(**overrides) -> dict:
    """A validated tiny config (nothing read from disk)."""
    return validate_config(tiny_config(Path("/nonexistent/model"), Path("/nonexistent/corpus"), **overrides))


# --- the preset ----------------------------------------------------------------------------


def test_the_default_keeps_saesweeps_choices() -> None:
    config = config_of(**{"model.dtype": "bfloat16", "train.dead.factor": 100})
    assert config["protocol"] == "saesweep"
    assert (config["train"]["input_normalisation"], config["train"]["ema_decay"]) == (GLOBAL, 0.0)
    assert config["train"]["dead"]["window"] == "scaled" and config["evaluate"]["lm_dtype"] == "bfloat16"
    cells = sweep_cells(config)
    assert [cell.name for cell in cells] == ["topk-n64-k4-s0", "topk-n256-k4-s0", "topk-n64-k16-s0", "topk-n256-k16-s0"]
    assert all(cell.parameters["aux_error_norm"] == 0 for cell in cells)
    windows = {train_settings(config, "resid2", cell.name).dead.window_tokens for cell in cells}
    assert len(windows) > 1  # scaled with n / k


def test_gao2024_sets_each_setting_and_the_hash() -> None:
    config = config_of(**GAO, **{"model.dtype": "bfloat16", "sweep.archs": {"relu": {"l1_coef": [1.0]}}})
    assert (config["train"]["input_normalisation"], config["train"]["ema_decay"]) == (PER_TOKEN, 0.999)
    names = {cell.name for cell in sweep_cells(config)}
    assert {"topk-n64-k4-ae1-s0", "topk-n256-k16-ae1-s0", "relu-n64-l1-s0"} <= names
    cells = {cell.arch: cell for cell in sweep_cells(config)}
    assert cells["topk"].parameters["aux_error_norm"] == 1
    assert "aux_error_norm" not in cells["relu"].parameters  # no AuxK, nothing added
    assert build_sae("topk", 32, 64, cells["topk"].parameters).auxk_settings()[2] == "error"
    settings = [train_settings(config, "resid2", cell.name) for cell in sweep_cells(config)]
    assert {s.dead.window_tokens for s in settings} == {10_000_000}
    assert {(s.input_normalisation, s.ema_decay) for s in settings} == {(PER_TOKEN, 0.999)}
    assert eval_settings(config, "resid2", "topk-n64-k4-ae1-s0").model.dtype == "float32"
    default = train_settings(config_of(), "resid2", "topk-n64-k4-s0")
    gao = train_settings(config_of(**GAO), "resid2", "topk-n64-k4-ae1-s0")
    assert provenance(to_json(replace(default, params=gao.params)))["settings_hash"] != provenance(to_json(gao))["settings_hash"]


def test_a_setting_given_in_the_config_wins_over_the_preset() -> None:
    config = config_of(**GAO, **{
        "train.input_normalisation": GLOBAL, "train.ema_decay": 0, "train.dead.window": "scaled",
        "evaluate.lm_dtype": "float16", "sweep.k": None, "sweep.archs": {"topk": {"k": [4], "aux_error_norm": [0]}},
    })
    settings = train_settings(config, "resid2", "topk-n64-k4-s0")
    assert (settings.input_normalisation, settings.ema_decay, settings.params["aux_error_norm"]) == (GLOBAL, 0, 0)
    assert settings.dead.window_tokens == 2000  # max(min_tokens, 10 · 64 / 4)
    assert eval_settings(config, "resid2", "topk-n64-k4-s0").model.dtype == "float16"
    fixed = config_of(**{"train.dead.window": "fixed", "train.dead.window_tokens": 777})
    assert train_settings(fixed, "resid2", "topk-n256-k4-s0").dead.window_tokens == 777


def test_the_lm_is_float32_at_evaluation_under_gao2024(tmp_path, tiny_model, tiny_corpus) -> None:
    config = validate_config(tiny_config(tiny_model, tiny_corpus, **GAO, **{"model.dtype": "bfloat16"}))
    lm, _ = load_lm(eval_settings(config, "resid2", "topk-n64-k4-ae1-s0").model, CPU)
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    default = validate_config(tiny_config(tiny_model, tiny_corpus, **{"model.dtype": "bfloat16"}))
    lm, _ = load_lm(eval_settings(default, "resid2", "topk-n64-k4-s0").model, CPU)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}


# --- per-token normalisation ---------------------------------------------------------------


def planted_sae(kind: str, activations: torch.Tensor) -> TopKSAE:
    """A TopK SAE (d = 32, n = 64, k = 4) with the global statistics of ``activations``."""
    sae = TopKSAE(32, 64, {"k": 4})
    mean = activations.mean(dim=0)
    sae.set_normalisation(mean, float((activations - mean).pow(2).sum(dim=1).mean().div(32).sqrt()))
    sae.input_normalisation = kind
    sae.initialise(sae.normalise(activations), torch.Generator().manual_seed(0))
    return sae.requires_grad_(False)


@pytest.fixture
def activations() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return 3 * torch.randn(600, 32, generator=generator) + torch.randn(32, generator=generator)


def test_per_token_inputs_are_centred_with_norm_sqrt_d_and_invert_exactly(activations) -> None:
    x = normalise(activations, PER_TOKEN, torch.zeros(32), 1.0)
    torch.testing.assert_close(x.mean(dim=1), torch.zeros(600), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.pow(2).sum(dim=1), torch.full((600,), 32.0))
    torch.testing.assert_close(denormalise(x, activations, PER_TOKEN, torch.zeros(32), 1.0), activations)


def test_nmse_is_blind_to_each_tokens_scale_per_token_but_not_under_the_global_map() -> None:
    """NMSE on per-token inputs is the same when each token is rescaled by its own positive
    factor; under the one global map it is not: large tokens dominate the error. Planted: an
    SAE with k = 1, tied unit rows, no biases and μ = 0, s = 1; half the tokens are multiples
    of one decoder row (reconstructed exactly under the global map), half are noise."""
    generator = torch.Generator().manual_seed(4)
    sae = TopKSAE(32, 64, {"k": 1}).requires_grad_(False)
    rows = torch.randn(64, 32, generator=generator)
    sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
    sae.W_enc.copy_(sae.W_dec)
    atoms = sae.W_dec[torch.randint(64, (300,), generator=generator)] * (1 + torch.rand(300, 1, generator=generator))
    activations = torch.cat([atoms, torch.randn(300, 32, generator=generator)])
    factors = {"random": torch.logspace(-1, 1, 600)[torch.randperm(600, generator=generator)][:, None],
               "atoms large": torch.cat([torch.full((300, 1), 10.0), torch.full((300, 1), 0.1)])}
    nmse = {}
    for kind in (PER_TOKEN, GLOBAL):
        sae.input_normalisation = kind
        nmse[kind] = {name: reconstruction_metrics(sae, activations * f, 128, [], refine_tokens=0)["nmse"] for name, f in factors.items()}
        nmse[kind]["as is"] = reconstruction_metrics(sae, activations, 128, [], refine_tokens=0)["nmse"]
    assert 0.05 < nmse[PER_TOKEN]["as is"] < 1.5
    for name in factors:
        assert nmse[PER_TOKEN][name] == pytest.approx(nmse[PER_TOKEN]["as is"], rel=1e-5)
    assert nmse[GLOBAL]["atoms large"] < 0.01 * nmse[GLOBAL]["as is"], nmse[GLOBAL]


def test_the_spliced_reconstruction_is_inverted_with_each_tokens_mean_and_norm(activations) -> None:
    """â of a token rescaled by c is c · â under per-token normalisation (the token's own m(a)
    and r(a) take it back to raw units), and adding the error back gives a exactly."""
    sae = planted_sae(PER_TOKEN, activations)
    factors = torch.logspace(-1, 1, 600)[:, None]
    replace_ = reconstructor(sae)
    torch.testing.assert_close(replace_(activations * factors), replace_(activations) * factors, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reconstructor(sae, add_error=True)(activations), activations)
    global_replace = reconstructor(planted_sae(GLOBAL, activations))
    assert not torch.allclose(global_replace(activations * factors), global_replace(activations) * factors, rtol=1e-2)


def test_a_per_token_sae_is_not_exported_to_raw_weights(activations) -> None:
    """No weights on raw activations express per-token normalisation: the export says so."""
    raw_form(planted_sae(GLOBAL, activations), "cell x")
    with pytest.raises(UserError, match="cell x: the SAE normalises each token on its own"):
        raw_form(planted_sae(PER_TOKEN, activations), "cell x")


# --- L_aux / V_e ---------------------------------------------------------------------------


@pytest.mark.parametrize("products", PRODUCTS)
def test_auxk_loss_is_divided_by_the_errors_variance_on_a_planted_batch(products) -> None:
    """With aux_error_norm 1, L_aux = ‖e − ê‖² / ‖e − ē‖² written out by hand on a planted batch:
    dead latents 0 … 31, k_aux 4; both product paths (CPU csr and the gather path of CUDA)."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, {"k": 4}).double()
    sae.initialise(torch.randn(256, 16, dtype=torch.float64), torch.Generator().manual_seed(2))
    x = torch.randn(48, 16, dtype=torch.float64)
    dead = torch.arange(64) < 32
    out = sparse_step(sae, x, dead, 4, 0.5, None, aux_normaliser="error", products=products)
    with torch.no_grad():
        pre = sae.pre_activations(x)
        error = x - sae.decode(sae.activate(pre))
        values, indices = pre.masked_fill(~dead, float("-inf")).topk(4, dim=1)
        aux = torch.zeros_like(pre).scatter(1, indices, values.relu()) @ sae.W_dec
    expected = (error - aux).pow(2).sum() / (error - error.mean(dim=0)).pow(2).sum()
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-10, atol=0)
    assert abs(batch_variance(error) / batch_variance(x) - 1) > 0.1  # V_e is not V here
    context = StepContext(dead, 4, 0.5, 0.0, 1e-3, aux_normaliser="error")
    torch.testing.assert_close(sae.reference_step(x, context).parts["aux_loss"], expected, rtol=1e-10, atol=0)


# --- training: the dead window in tokens, the weight average -------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_model, tiny_corpus) -> tuple[Path, Path, Path]:
    """The tiny config's training and held-out activations, extracted once."""
    folder = tmp_path_factory.mktemp("protocol-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        config = validate_config(tiny_config(tiny_model, tiny_corpus))
        prepare_corpus(config["corpus"], Path(corpus_dir(config)))
        for split in ("train", "eval"):
            extract(extraction_settings(config, split, device="cpu"))
    return folder, tiny_model, tiny_corpus


def cell_settings(extracted, cell: str, **overrides):
    folder, model, corpus = extracted
    config = validate_config(tiny_config(model, corpus, **overrides))
    settings = train_settings(config, "resid2", cell)
    heldout = replace(settings.heldout, activations=str(folder / activation_dir(config, "resid2", "eval")))
    return replace(settings, activations=str(folder / activation_dir(config, "resid2", "train")), heldout=heldout)


@pytest.mark.parametrize("batch_size, steps_to_dead", [(128, 8), (512, 2)])
def test_the_dead_window_counts_tokens_not_steps(extracted, tmp_path, batch_size, steps_to_dead) -> None:
    """A latent planted never to fire (b_enc = −10⁶) turns dead at the first step where the
    tokens since it last fired reach the fixed window W = 1000, whatever the batch: after
    8 steps of 128 tokens (1024), 2 of 512; never one step early."""
    settings = cell_settings(extracted, "topk-n64-k4-s0", **{
        "train.dead.window": "fixed", "train.dead.window_tokens": 1000, "train.batch_size": batch_size})
    trainer = Trainer(settings, tmp_path)
    with torch.no_grad():
        trainer.sae.b_enc[0] = -1e6
    x = trainer.sae.normalise(ActivationStore(settings.activations).head(batch_size, CPU))
    for step in range(1, steps_to_dead + 1):
        assert not trainer.dead_mask()[0], f"dead after {step - 1} steps of {batch_size} tokens"
        trainer.step(x)
        with torch.no_grad():
            trainer.sae.b_enc[0] = -1e6  # keep it silent whatever Adam does
    assert trainer.dead_mask()[0] and int(trainer.tokens_since_fired[0]) == steps_to_dead * batch_size
    assert trainer.dead_fraction() < 0.5  # the others fired


def test_the_weight_average_is_the_bias_corrected_mean_of_the_steps() -> None:
    """ŵ_t = Σ_i (1 − β) β^(t−i) w_i / (1 − β^t) over the weights after each step."""
    module = torch.nn.Linear(3, 2)
    average, history = WeightAverage(module, 0.9), []
    for step in range(5):
        with torch.no_grad():
            module.weight.add_(torch.full_like(module.weight, float(step + 1)))
        history.append(module.weight.detach().clone())
        average.update()
    weights = torch.tensor([(1 - 0.9) * 0.9 ** (4 - i) for i in range(5)]) / (1 - 0.9**5)
    expected = sum(w * h for w, h in zip(weights, history))
    torch.testing.assert_close(average.averaged()[average.names.index("weight")], expected)
    with average.installed():
        torch.testing.assert_close(module.weight.detach(), expected)
    torch.testing.assert_close(module.weight.detach(), history[-1])  # the raw weights are back


@pytest.fixture(scope="module")
def raw_and_average(extracted, tmp_path_factory) -> tuple[Path, Path, object]:
    """One cell trained twice from the same seed: raw weights exported (ema_decay 0) and the
    average exported (ema_decay 0.9: a short run's average still differs visibly)."""
    folders = {}
    for decay in (0, 0.9):
        settings = cell_settings(extracted, "topk-n64-k4-s0", **{"train.ema_decay": decay, "train.heldout.points": 2})
        folders[decay] = tmp_path_factory.mktemp(f"ema{decay}") / "cell"
        train_cell(settings, folders[decay], threads=1)
    return folders[0], folders[0.9], settings


def test_the_exported_weights_are_the_average_and_differ_from_the_raw(raw_and_average) -> None:
    raw_folder, ema_folder, _ = raw_and_average
    raw, ema = load_file(str(raw_folder / "sae.safetensors")), load_file(str(ema_folder / "sae.safetensors"))
    for name in ("W_enc", "W_dec", "b_enc", "b_pre"):
        assert (raw[name] - ema[name]).abs().max() > 1e-4, name
    for name in ("act_mean", "act_scale"):
        assert torch.equal(raw[name], ema[name])  # buffers are not averaged
    assert (ema["W_dec"].norm(dim=1) < 1 - 1e-6).any()  # averaged unit rows shrink


def test_evaluation_and_the_heldout_curve_read_the_average(raw_and_average, extracted, tmp_path) -> None:
    """The reported NMSE is the averaged weights' (and not the raw ones'), in the evaluation's
    metrics.json and in the held-out curve's last point."""
    raw_folder, ema_folder, settings = raw_and_average
    heldout = ActivationStore(settings.heldout.activations)
    nmse = {}
    for name, folder in (("raw", raw_folder), ("ema", ema_folder)):
        sae, _ = load_sae(folder, CPU)
        nmse[name] = reconstruction_metrics(sae, heldout.head(settings.heldout.tokens, CPU), 512, [], refine_tokens=0)["nmse"]
    assert abs(nmse["ema"] - nmse["raw"]) > 1e-3
    log = pd.read_parquet(ema_folder / "train_log.parquet")
    assert log["heldout_nmse"].dropna().iloc[-1] == pytest.approx(nmse["ema"], rel=1e-5)
    folder, model, corpus = extracted
    config = validate_config(tiny_config(model, corpus, **{"train.ema_decay": 0.9, "evaluate.tokens": 2000}))
    evaluation = eval_settings(config, "resid2", "topk-n64-k4-s0")
    evaluation = replace(evaluation, eval_activations=settings.heldout.activations, analysis_windows=2,
                         downstream_windows=2, explain_latents=1, ablation_latents=0)
    metrics = evaluate_cell(evaluation, ema_folder, tmp_path / "metrics.json")
    assert metrics["nmse"] == pytest.approx(nmse["ema"], rel=1e-5)


def test_a_resumed_run_ends_with_the_same_average(raw_and_average, extracted, tmp_path) -> None:
    """The average's shadows travel in the checkpoint: a run stopped after its first
    checkpoint and resumed exports the uninterrupted run's averaged weights bit for bit."""
    _, ema_folder, settings = raw_and_average
    folder = tmp_path / "cell"
    folder.mkdir()
    trainer = Trainer(settings, folder)

    class Stop(Exception):
        pass

    def save_and_stop() -> None:
        Trainer.save_checkpoint(trainer)
        raise Stop

    trainer.save_checkpoint = save_and_stop
    with pytest.raises(Stop):
        trainer.run()
    state = torch.load(folder / CHECKPOINT, weights_only=False)
    assert 0 < state["ema"]["steps"] < settings.tokens // settings.batch_size
    train_cell(settings, folder, threads=1)
    resumed, reference = load_file(str(folder / "sae.safetensors")), load_file(str(ema_folder / "sae.safetensors"))
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
