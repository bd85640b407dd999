"""The standard tests every registered architecture passes, with no test of its own to write:

- its training step (fast or not) gives the loss parts and gradients of plain autograd of
  its equations (``reference_step``), AuxK and dead latents included, with the support
  kernels' sparse and dense products alike;
- trained on activations made from a planted sparse dictionary, its decoder recovers the
  planted directions (mean best cosine ≥ 0.9: the planted directions are 64 random unit
  vectors in d = 32, whose mutual |cos| is ~0.18 on average and rarely above 0.6, so a
  mean of 0.9 is only reached by matching most directions closely);
- save → load gives identical outputs; a run stopped by SIGTERM and resumed ends with the
  same weights and log as an uninterrupted one;
- evaluation of a tiny trained cell on the tiny LM runs and its metrics are in range.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CPU, assert_same_training, tiny_config
from saesweep.core.errors import Interrupted
from saesweep.core.job_settings import TrainSettings, from_json
from saesweep.data.activations import ActivationStore, extract, shard_name, write_manifest, write_shard
from saesweep.data.corpus import prepare_corpus
from saesweep.evaluation.evaluate import evaluate_cell
from saesweep.plan.cells import make_cell
from saesweep.plan.config import load_schema, validate_config
from saesweep.plan.settings import activation_dir, corpus_dir, eval_settings, extraction_settings, train_settings
from saesweep.sae import support_kernels
from saesweep.sae.base import StepContext
from saesweep.sae.export import load_sae, save_sae
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params
from saesweep.train import trainer
from saesweep.train.launch import train_cell

NAMES = sorted(ARCHITECTURES)
pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED_D, PLANTED_DIRECTIONS, PLANTED_ACTIVE, PLANTED_TOKENS = 32, 64, 3, 16384


def example_params(name: str) -> dict:
    return resolve_params(name, ARCHITECTURES[name].example, "example")


@pytest.mark.parametrize("name", NAMES)
def test_tied_initialisation_and_its_ablation(name: str) -> None:
    """tied_init 1 (the default): the encoder starts as the decoder's transpose; 0: an
    independent encoder with entries in [−1/√d, 1/√d] and the same decoder; each the same for
    the same seed."""
    d, n = 16, 64
    sample = torch.randn(256, d, generator=torch.Generator().manual_seed(1))

    def initialised(tied: int) -> torch.nn.Module:
        sae = build_sae(name, d, n, resolve_params(name, {**ARCHITECTURES[name].example, "tied_init": tied}, "example"))
        sae.initialise(sample, torch.Generator().manual_seed(0))
        return sae

    tied, untied = initialised(1), initialised(0)
    assert torch.equal(tied.W_enc, tied.W_dec)
    assert torch.equal(untied.W_dec, tied.W_dec)
    assert untied.W_enc.abs().max() <= 1 / math.sqrt(d)
    cosine = torch.nn.functional.cosine_similarity(untied.W_enc, untied.W_dec, dim=1)
    assert cosine.abs().mean() < 0.5  # independent directions, not the decoder's
    assert torch.equal(initialised(0).W_enc, untied.W_enc)


# --- the step against the reference ---------------------------------------------------------


def perturbed_sae(name: str, d: int = 16, n: int = 64, seed: int = 0):
    """An initialised SAE in float64 with random, untied encoder and non-zero biases."""
    generator = torch.Generator().manual_seed(seed)
    sae = build_sae(name, d, n, example_params(name)).double()
    sae.initialise(torch.randn(256, d, generator=generator, dtype=torch.float64), generator)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        sae.after_optimizer_step()
    return sae


@pytest.mark.parametrize("products", ["sparse", "dense"])
@pytest.mark.parametrize("name", NAMES)
def test_training_step_matches_plain_autograd(name: str, products: str, monkeypatch) -> None:
    # the support kernels' two forms of the same products, each forced in turn
    monkeypatch.setattr(support_kernels, "DENSE_FRACTION", 1.0 if products == "sparse" else 0.0)
    sae = perturbed_sae(name)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, sae.d, generator=generator, dtype=torch.float64) * 2
    dead = torch.rand(sae.n, generator=generator) < 0.3
    context = StepContext(dead_mask=dead, k_aux=8, aux_coef=1 / 32, progress=0.5, fire_threshold=1e-3)
    reference_sae, fast_sae = sae, copy.deepcopy(sae)
    reference = reference_sae.reference_step(x, context)
    fast = fast_sae.training_step(x, context)
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-10, atol=1e-12)
    assert fast.parts.keys() == reference.parts.keys()
    for part in reference.parts:
        torch.testing.assert_close(fast.parts[part], reference.parts[part], rtol=1e-10, atol=1e-12)
    assert torch.equal(fast.fired.unique(), reference.fired.unique())
    for (parameter_name, expected), (_, got) in zip(reference_sae.named_parameters(), fast_sae.named_parameters()):
        assert got.grad is not None, parameter_name
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-9, atol=1e-12, msg=parameter_name)
    if sae.uses_auxk:
        assert reference.parts["aux_loss"] > 0, "AuxK must act when latents are dead"
    for buffer_name, expected in reference_sae.named_buffers():
        torch.testing.assert_close(fast_sae.get_buffer(buffer_name), expected, equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_runs_under_bf16_autocast(name: str) -> None:
    """Inside torch.autocast(bf16), as on a GPU with train.autocast_bf16, the step gives fp32
    gradients close to the fp32 step's (bf16 keeps ~3 significant digits of pre; the batch is
    large so that JumpReLU's threshold gradient, a count of entries in a window of width ε
    whose edges bf16 blurs, averages over many entries)."""
    sae = perturbed_sae(name).float()
    x = torch.randn(4096, sae.d, generator=torch.Generator().manual_seed(1)) * 2
    context = StepContext(dead_mask=torch.rand(sae.n, generator=torch.Generator().manual_seed(2)) < 0.3,
                          k_aux=8, aux_coef=1 / 32, progress=0.5, fire_threshold=1e-3)
    low_sae = copy.deepcopy(sae)
    sae.training_step(x, context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_sae.training_step(x, context)
    for (parameter_name, expected), (_, got) in zip(sae.named_parameters(), low_sae.named_parameters()):
        assert got.grad.dtype == torch.float32, parameter_name
        scale = expected.grad.abs().max().item()
        torch.testing.assert_close(got.grad, expected.grad, rtol=0.1, atol=0.1 * scale, msg=parameter_name)


@pytest.mark.parametrize("name", NAMES)
def test_inference_form_is_a_registered_rule_with_the_same_codes(name: str) -> None:
    """Other tools' files carry the inference rule: the family's own SAE, given this one's
    maps and ``inference_extras``, encodes exactly as this one does."""
    family = ARCHITECTURES[name].inference_family
    if family is None:
        pytest.skip(f"{name} has no form in other tools")
    assert ARCHITECTURES[family].inference_family == family
    sae = perturbed_sae(name)
    twin = build_sae(family, sae.d, sae.n, resolve_params(family, {"k": getattr(sae, "k", 1)} if family == "topk" else {}, "test", complete=False)).double()
    twin.load_state_dict(sae.state_dict(), strict=False)
    twin.set_inference_extras(sae.inference_extras())
    x = torch.randn(50, sae.d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(twin.encode(x).to_dense(), sae.encode(x).to_dense())


# --- a planted dictionary ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """Activations x = Σ_j c_j D_j with 3 of 64 planted unit directions D_j active per token
    (magnitudes uniform in [1, 2]), as two shards with a manifest."""
    folder = tmp_path_factory.mktemp("planted") / "activations"
    folder.mkdir()
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((PLANTED_DIRECTIONS, PLANTED_D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    active = np.argsort(rng.random((PLANTED_TOKENS, PLANTED_DIRECTIONS)), axis=1)[:, :PLANTED_ACTIVE]
    codes = np.zeros((PLANTED_TOKENS, PLANTED_DIRECTIONS))
    np.put_along_axis(codes, active, rng.uniform(1, 2, (PLANTED_TOKENS, PLANTED_ACTIVE)), axis=1)
    x = (codes @ directions).astype(np.float32)
    attributes = {"model": "planted", "corpus_fingerprint": "planted", "site": "resid0", "skip_positions": 0,
                  "storage_dtype": "float32"}
    half = PLANTED_TOKENS // 2
    windows = torch.zeros(half // 16, 16, dtype=torch.long)
    for index in range(2):
        write_shard(folder / shard_name(index), x[index * half : (index + 1) * half], windows, attributes)
    write_manifest(folder, 2, {**attributes, "revision": None}, {})
    return folder, torch.from_numpy(directions).float()


def planted_settings(name: str, activations: Path, **changes) -> TrainSettings:
    """Training settings of a 128-latent cell on the planted activations."""
    settings = {
        "site": "resid0", "arch": name, "params": example_params(name), "n_latents": 128, "seed": 0,
        "activations": str(activations), "on_exhausted": "cycle", "tokens": 200_000, "batch_size": 256,
        "lr": 3e-3, "warmup_tokens": 0, "decay": "linear", "decay_fraction": 0.2, "adam_eps": 6.25e-10,
        "dead": {"threshold": 1e-3, "window_tokens": 3000}, "geometric_median_sample": 512,
        "checkpoint_every_tokens": 10**9, "log_every_tokens": 4096, "heldout": {"points": 0}, "device": "cpu", "autocast_bf16": False,
    }
    return from_json(TrainSettings, {**settings, **changes}, "planted settings")


@pytest.fixture(scope="module")
def trained_planted(planted, tmp_path_factory) -> dict[str, Path]:
    """Every architecture trained once on the planted activations."""
    activations, _ = planted
    root = tmp_path_factory.mktemp("planted-cells")
    for name in NAMES:
        train_cell(planted_settings(name, activations), root / name, threads=1)
    return {name: root / name for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_planted_directions_are_recovered(name: str, planted, trained_planted) -> None:
    _, directions = planted
    sae, _ = load_sae(trained_planted[name], CPU)
    decoder = sae.W_dec.detach()
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    best_cosine = (directions @ decoder.T).max(dim=1).values
    assert best_cosine.mean() >= 0.9, f"{name}: mean best cosine {best_cosine.mean():.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_gives_identical_outputs(name: str, planted, trained_planted, tmp_path) -> None:
    activations, _ = planted
    sae, cfg = load_sae(trained_planted[name], CPU)
    save_sae(sae, tmp_path, cfg)
    again, again_cfg = load_sae(tmp_path, CPU)
    assert again_cfg == cfg and type(again) is type(sae)
    x = sae.normalise(ActivationStore(activations).head(512, CPU))
    with torch.no_grad():
        assert torch.equal(sae(x), again(x))
        assert torch.equal(sae.encode(x).to_dense(), again.encode(x).to_dense())


def train_stopped_and_resumed(settings: TrainSettings, folder: Path, monkeypatch) -> None:
    """Train ``settings`` into ``folder``, stopped by SIGTERM at the 30th step (no outputs
    then), and train it again: the rerun resumes from the checkpoint SIGTERM wrote."""
    step, calls = trainer.Trainer.step, []

    def step_then_terminate(self, x):
        calls.append(1)
        if len(calls) == 30:
            signal.raise_signal(signal.SIGTERM)
        return step(self, x)

    monkeypatch.setattr(trainer.Trainer, "step", step_then_terminate)
    with pytest.raises(Interrupted):
        train_cell(settings, folder, threads=1)
    assert not (folder / "sae.safetensors").exists()
    monkeypatch.setattr(trainer.Trainer, "step", step)
    train_cell(settings, folder, threads=1)


@pytest.mark.parametrize("name", NAMES)
def test_terminated_run_resumes_to_the_same_weights(name: str, planted, monkeypatch, tmp_path) -> None:
    activations, _ = planted
    settings = planted_settings(name, activations, tokens=20_480, checkpoint_every_tokens=10**9)
    train_cell(settings, tmp_path / "uninterrupted", threads=1)
    train_stopped_and_resumed(settings, tmp_path / "resumed", monkeypatch)
    assert_same_training(tmp_path / "resumed", tmp_path / "uninterrupted")


# --- evaluation on the tiny LM -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_corpus) -> tuple[Path, dict]:
    """The tiny config's training and held-out activations (resid2), extracted once."""
    folder = tmp_path_factory.mktemp("arch-eval")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        config = validate_config(tiny_config(tiny_model, tiny_corpus, **{"train.tokens.base": 4096}))
        prepare_corpus(config["corpus"], Path(corpus_dir(config)))
        for split in ("train", "eval"):
            extract(extraction_settings(config, split, device="cpu"))
    torch.set_num_threads(before)
    return folder, config


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_of_a_tiny_cell_is_in_range(name: str, tiny_run, tmp_path) -> None:
    folder, config = tiny_run
    cell = make_cell(name, 64, {**ARCHITECTURES[name].example}, 0).name
    settings = train_settings(config, "resid2", cell)
    eval_folder = str(folder / activation_dir(config, "resid2", "eval"))
    settings = replace(settings, activations=str(folder / activation_dir(config, "resid2", "train")),
                       heldout=replace(settings.heldout, activations=eval_folder))
    train_cell(settings, tmp_path / cell, threads=1)
    evaluation = replace(eval_settings(config, "resid2", cell), eval_activations=eval_folder)
    metrics = evaluate_cell(evaluation, tmp_path / cell, tmp_path / cell / "metrics.json")
    assert metrics["arch"] == name and metrics["setting"] == cell.replace("-n64", "").removesuffix("-s0")
    assert 0 <= metrics["nmse"] < 2 and -1 <= metrics["cosine_similarity"] <= 1
    assert 0 <= metrics["l0"] <= 64 and 0 <= metrics["dead_fraction"] <= 1
    assert abs(metrics["delta_lm_loss_error_added"]) < 1e-4
    assert metrics["ce_clean"] > 0 and metrics["kl_sae"] >= 0
    fittable = load_schema()["properties"]["scaling"]["properties"]["metrics"]["items"]["enum"]
    assert all(isinstance(metrics[metric], float) for metric in fittable)  # scaling.metrics' names exist
    for key in ("probe_loss", "explain_precision", "explain_recall", "ablation_sparsity"):
        value = metrics[key]
        assert math.isnan(value) or value >= 0, key
    if ARCHITECTURES[name].k_override:
        assert metrics["k_transfer"] and set(metrics["k_transfer_nmse"]) == {str(k) for k in metrics["k_transfer"]}
        assert "k_transfer" not in metrics["not_applicable"]
    else:
        assert metrics["k_transfer"] == [] and "k_transfer" in metrics["not_applicable"]
