"""SAEs between saesweep and the real SAELens and sparsify packages, in both directions:

- a tiny trained cell of every architecture, exported, loads with ``sae_lens.SAE.load_from_disk``
  (TopK-family cells also with ``sparsify.SparseCoder.load_from_disk``) and, on raw activations
  with a mean far from 0 and a scale far from 1, encodes and reconstructs as saesweep does to
  fp32 round-off (unfolded weights would be off by the scale, so this fails without folding);
- an SAE the package itself built and saved, imported, is evaluated by saesweep's own
  evaluation stage to the normalised MSE and L0 of the package's own forward;
- a broken external SAE (wrong d_in, missing weights, unknown architecture) ends in one line
  naming the file, and nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import replace
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CPU, tiny_config, write_config
from saesweep import cli
from saesweep.core.errors import UserError
from saesweep.core.job_settings import TrainSettings, from_json, to_json
from saesweep.core.sites import transformer_lens_hook
from saesweep.data.activations import ActivationStore, extract, shard_name, write_manifest, write_shard
from saesweep.data.corpus import prepare_corpus
from saesweep.evaluation.evaluate import evaluate_cell
from saesweep.plan.config import validate_config
from saesweep.plan.settings import (
    activation_dir,
    corpus_dir,
    external_eval_settings,
    extraction_settings,
    import_settings,
)
from saesweep.sae.export import load_sae
from saesweep.interop.stages import export_cells, import_external
from saesweep.sae.registry import ARCHITECTURES, resolve_params
from saesweep.train.launch import train_cell

sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(ARCHITECTURES)
SAELENS_ARCH = {"topk": "topk", "multitopk": "topk", "batchtopk": "jumprelu", "relu": "standard",
                "jumprelu": "jumprelu", "gated": "gated", "matryoshka": "jumprelu", "matryoshkatopk": "topk"}
D, N, MEAN, SCALE = 32, 128, 4.0, 7.5


# --- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_activations(tmp_path_factory) -> Path:
    """Planted sparse activations (3 of 64 directions per token) scaled by 7.5 and shifted by
    a mean of about 4 per dimension: a normalisation far from the identity."""
    folder = tmp_path_factory.mktemp("raw") / "activations"
    folder.mkdir()
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((64, D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = np.zeros((8192, 64))
    active = np.argsort(rng.random(codes.shape), axis=1)[:, :3]
    np.put_along_axis(codes, active, rng.uniform(1, 2, (8192, 3)), axis=1)
    x = (SCALE * codes @ directions + MEAN + rng.standard_normal(D)).astype(np.float32)
    attributes = {"model": "planted", "corpus_fingerprint": "planted", "site": "resid0", "skip_positions": 0,
                  "storage_dtype": "float32"}
    windows = torch.zeros(4096 // 16, 16, dtype=torch.long)
    for index in range(2):
        write_shard(folder / shard_name(index), x[index * 4096 : (index + 1) * 4096], windows, attributes)
    write_manifest(folder, 2, {**attributes, "revision": None}, {})
    return folder


@pytest.fixture(scope="module")
def cells(raw_activations, tmp_path_factory) -> dict[str, Path]:
    """Every architecture trained briefly on the raw activations."""
    root = tmp_path_factory.mktemp("cells")
    for name in NAMES:
        settings = {
            "site": "resid0", "arch": name, "params": resolve_params(name, ARCHITECTURES[name].example, "example"),
            "n_latents": N, "seed": 0, "activations": str(raw_activations), "on_exhausted": "cycle",
            "tokens": 16384, "batch_size": 256, "lr": 3e-3, "warmup_tokens": 0, "decay": "none",
            "decay_fraction": 0.2, "adam_eps": 6.25e-10,
            "dead": {"threshold": 1e-3, "window_tokens": 3000}, "geometric_median_sample": 512,
            "checkpoint_every_tokens": 10**9, "log_every_tokens": 4096, "heldout": {"points": 0}, "device": "cpu", "autocast_bf16": False,
        }
        train_cell(from_json(TrainSettings, settings, "planted settings"), root / f"{name}-n{N}", threads=1)
    return {name: root / f"{name}-n{N}" for name in NAMES}


def planted_config() -> dict:
    """A run config whose model and site are those of the planted cells."""
    return validate_config(tiny_config(Path("planted"), Path("/nonexistent"), **{
        "activations.sites": ["resid0"], "activations.context": 16, "activations.skip_positions": 1,
        "model.prepend_bos": True,
    }))


def saesweep_outputs(folder: Path, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes, reconstruction in raw units) of saesweep on raw activations a."""
    sae, _ = load_sae(folder, CPU)
    with torch.no_grad():
        codes = sae.encode(sae.normalise(a)).to_dense()
        return codes, sae.denormalise(sae.decode(codes), a)


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to fp32 round-off: a relative error of 1e-5 of the tensor's own magnitude."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale, msg=what)


def test_the_activations_are_far_from_normalised(cells, raw_activations) -> None:
    sae, _ = load_sae(cells["topk"], CPU)
    assert abs(float(sae.act_scale) - 1) > 2 and sae.act_mean.abs().mean() > 2


@pytest.mark.parametrize("name", NAMES)
def test_saelens_loads_every_exported_cell_and_agrees_on_raw_activations(name, cells, raw_activations, tmp_path) -> None:
    export_cells(planted_config(), [cells[name]], "saelens", tmp_path)
    folder = tmp_path / cells[name].name
    sae = sae_lens.SAE.load_from_disk(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[name] == sae.cfg.architecture()
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.dtype) == (D, N, "float32")
    if SAELENS_ARCH[name] == "topk":
        assert sae.cfg.k == ARCHITECTURES[name].example["k"]
    metadata = sae.cfg.metadata
    assert (metadata.model_name, metadata.hook_name, metadata.context_size, metadata.prepend_bos) == (
        "planted", "blocks.0.hook_resid_post", 16, True)
    assert metadata.dataset_path.startswith("files:") and metadata.saesweep_cell == cells[name].name
    a = ActivationStore(raw_activations).head(1024, CPU)
    codes, reconstruction = saesweep_outputs(cells[name], a)
    with torch.no_grad():
        got_codes = sae.encode(a)
        assert_close(got_codes, codes, f"{name}: codes")
        assert_close(sae.decode(got_codes), reconstruction, f"{name}: reconstruction")
        assert_close(sae(a), reconstruction, f"{name}: forward")
    assert codes.gt(0).sum(dim=1).float().mean() > 1, "the comparison must involve active latents"


@pytest.mark.parametrize("name", ["topk", "multitopk"])
def test_sparsify_loads_exported_topk_cells_and_agrees_on_raw_activations(name, cells, raw_activations, tmp_path) -> None:
    export_cells(planted_config(), [cells[name]], "sparsify", tmp_path)
    folder = tmp_path / cells[name].name
    coder = sparsify.SparseCoder.load_from_disk(folder)
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D, N, 3)
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["hook_name"] == "blocks.0.hook_resid_post" and metadata["saesweep_arch"] == name
    a = ActivationStore(raw_activations).head(1024, CPU)
    codes, reconstruction = saesweep_outputs(cells[name], a)
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(a)
        dense = torch.zeros_like(codes).scatter_(1, top_indices, top_acts)
        assert_close(dense, codes, f"{name}: codes")
        assert_close(coder.decode(top_acts, top_indices), reconstruction, f"{name}: reconstruction")
        assert_close(coder(a).sae_out, reconstruction, f"{name}: forward")


@pytest.mark.parametrize("name", ["relu", "batchtopk"])
def test_sparsify_export_of_other_architectures_is_refused_before_writing(name, cells, tmp_path) -> None:
    with pytest.raises(UserError, match="sparsify has TopK coders only"):
        export_cells(planted_config(), [cells["topk"], cells[name]], "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_checks_the_config_is_the_cells_run(cells, tmp_path, capsys) -> None:
    config = planted_config()
    config["model"]["id"] = "another-model"
    write_config(tmp_path / "c.yaml", config)
    code = cli.main(["export", "--format", "saelens", "--out", str(tmp_path / "out"), "--config",
                     str(tmp_path / "c.yaml"), str(cells["topk"])])
    error = capsys.readouterr().err
    assert code == 2 and "is not from this config (model.id another-model" in error
    assert not (tmp_path / "out").exists()


def test_transformer_lens_hook_names() -> None:
    assert transformer_lens_hook("resid8") == "blocks.8.hook_resid_post"
    assert transformer_lens_hook("mlp0") == "blocks.0.hook_mlp_out"
    assert transformer_lens_hook("attn11") == "blocks.11.hook_attn_out"


# --- import: SAEs the packages built ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_corpus) -> tuple[Path, dict]:
    """The tiny config's held-out activations of resid2 (d = 32), extracted once."""
    folder = tmp_path_factory.mktemp("interop-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        config = validate_config(tiny_config(tiny_model, tiny_corpus))
        prepare_corpus(config["corpus"], Path(corpus_dir(config)))
        extract(extraction_settings(config, "eval", device="cpu"))
    return folder, config


def saelens_sae(architecture: str, activations: torch.Tensor, d_in: int = 32, seed: int = 0):
    """A SAELens SAE of ``architecture`` built by SAELens, with random weights around the data:
    b_dec at the activations' mean, encoder rows = decoder rows."""
    from sae_lens import GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens import TopKSAE, TopKSAEConfig

    classes = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
               "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "gated": (GatedSAE, GatedSAEConfig)}
    cls, cfg_cls = classes[architecture]
    options = {"k": 6} if architecture == "topk" else {}
    sae = cls(cfg_cls(d_in=d_in, d_sae=96, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        directions = torch.randn(96, d_in, generator=generator)
        sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True) * activations.std())
        sae.W_enc.copy_(sae.W_dec.T / activations.std() ** 2)
        if d_in == activations.shape[1]:
            sae.b_dec.copy_(activations.mean(dim=0))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(96, generator=generator) * 0.6 - 0.1)  # some θ < 0: ReLU alone
    return sae


def package_nmse_and_l0(forward, encode, activations: torch.Tensor) -> tuple[float, float]:
    """Σ‖a − â‖² / Σ‖a − ā‖² and the mean number of non-zero codes, from the package's own forward."""
    with torch.no_grad():
        a = activations.double()
        error = (forward(activations).double() - a).pow(2).sum()
        l0 = encode(activations).gt(0).sum(dim=1).double().mean()
    return float(error / (a - a.mean(dim=0)).pow(2).sum()), float(l0)


def external_config(config: dict, **entry) -> dict:
    return validate_config({**config, "external": [{"name": "ext", "site": "resid2", **entry}]})


def import_and_evaluate(tiny_run, entry: dict, tmp_path: Path) -> dict:
    """Import the external SAE of ``entry`` and evaluate it with the evaluation stage."""
    folder, config = tiny_run
    config = external_config(config, **entry)
    settings = import_settings(config, "resid2", "ext")
    import_external(replace(settings, activations=str(folder / settings.activations)), tmp_path / "imported")
    evaluation = external_eval_settings(config, "resid2", "ext")
    evaluation = replace(evaluation, eval_activations=str(folder / evaluation.eval_activations))
    return evaluate_cell(evaluation, tmp_path / "imported", tmp_path / "imported" / "metrics.json")


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_a_saelens_sae_is_evaluated_to_the_nmse_of_its_own_forward(architecture, tiny_run, tmp_path) -> None:
    folder, config = tiny_run
    activations = ActivationStore(folder / activation_dir(config, "resid2", "eval")).head(config["evaluate"]["tokens"], CPU)
    sae = saelens_sae(architecture, activations)
    sae.save_model(tmp_path / "saelens")
    nmse, l0 = package_nmse_and_l0(sae, sae.encode, activations)
    metrics = import_and_evaluate(tiny_run, {"path": str(tmp_path / "saelens")}, tmp_path)
    assert metrics["arch"] == f"saelens-{architecture}" and metrics["setting"] == "ext"
    assert metrics["nmse"] == pytest.approx(nmse, rel=1e-5)
    assert metrics["l0"] == pytest.approx(l0, rel=1e-6) and 0 < l0 < 96
    assert metrics["seed"] is None and metrics["n_latents"] == 96
    assert abs(metrics["delta_lm_loss_error_added"]) < 1e-4
    assert (metrics["k"] == 6) if architecture == "topk" else ("k" not in metrics)


def test_a_saelens_sae_without_input_bias_is_evaluated_to_its_own_forward(tiny_run, tmp_path) -> None:
    folder, config = tiny_run
    activations = ActivationStore(folder / activation_dir(config, "resid2", "eval")).head(config["evaluate"]["tokens"], CPU)
    sae = saelens_sae("gated", activations)
    sae.cfg.apply_b_dec_to_input = False
    sae.save_model(tmp_path / "saelens")
    nmse, l0 = package_nmse_and_l0(sae, sae.encode, activations)
    metrics = import_and_evaluate(tiny_run, {"path": str(tmp_path / "saelens"), "format": "saelens"}, tmp_path)
    assert metrics["nmse"] == pytest.approx(nmse, rel=1e-5) and metrics["l0"] == pytest.approx(l0, rel=1e-6)


def test_a_sparsify_coder_is_evaluated_to_the_nmse_of_its_own_forward(tiny_run, tmp_path) -> None:
    folder, config = tiny_run
    activations = ActivationStore(folder / activation_dir(config, "resid2", "eval")).head(config["evaluate"]["tokens"], CPU)
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=80, k=5))
    with torch.no_grad():
        coder.b_dec.copy_(activations.mean(dim=0))
        coder.encoder.bias.normal_(0, 0.1)
        coder.W_dec.mul_(activations.std())
    coder.save_to_disk(tmp_path / "sparsify")

    def encode(a):
        acts, indices, _ = coder.encode(a)
        return torch.zeros(len(a), 80).scatter_(1, indices, acts)

    nmse, l0 = package_nmse_and_l0(lambda a: coder(a).sae_out, encode, activations)
    metrics = import_and_evaluate(tiny_run, {"path": str(tmp_path / "sparsify")}, tmp_path)
    assert metrics["arch"] == "sparsify-topk" and metrics["k"] == 5
    assert metrics["nmse"] == pytest.approx(nmse, rel=1e-5) and metrics["l0"] == pytest.approx(l0, rel=1e-6)


# --- broken external SAEs -----------------------------------------------------------------------


def import_error(tiny_run, entry: dict, tmp_path: Path, capsys) -> str:
    """The one line ``saesweep import`` prints for ``entry``; checks that nothing was written."""
    folder, config = tiny_run
    settings = import_settings(external_config(config, **entry), "resid2", "ext")
    settings = replace(settings, activations=str(folder / settings.activations))
    (tmp_path / "settings.json").write_text(json.dumps(to_json(settings)))
    code = cli.main(["import", "--settings", str(tmp_path / "settings.json"), "--out", str(tmp_path / "imported")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert not (tmp_path / "imported").exists()
    return lines[0]


def test_wrong_d_in_names_the_config_and_both_widths(tiny_run, tmp_path, capsys) -> None:
    folder, config = tiny_run
    activations = ActivationStore(folder / activation_dir(config, "resid2", "eval")).head(256, CPU)
    saelens_sae("topk", activations, d_in=48).save_model(tmp_path / "wide")
    line = import_error(tiny_run, {"path": str(tmp_path / "wide")}, tmp_path, capsys)
    assert f"{tmp_path / 'wide' / 'cfg.json'}: d_in is 48" in line and "d = 32" in line


def saved_by(package: str, folder: Path) -> Path:
    """A 64-latent SAE of d = 32 saved in ``folder`` by ``package`` itself; its weights file."""
    if package == "saelens":
        saelens_sae("standard", torch.randn(64, 32)).save_model(folder)
        return folder / "sae_weights.safetensors"
    sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=64, k=4)).save_to_disk(folder)
    return folder / "sae.safetensors"


@pytest.mark.parametrize("package", ["saelens", "sparsify"])
def test_missing_weights_name_the_file(package, tiny_run, tmp_path, capsys) -> None:
    folder = tmp_path / package
    weights = saved_by(package, folder)
    entry = {"path": str(folder), "format": package}
    weights.unlink()
    line = import_error(tiny_run, entry, tmp_path, capsys)
    assert f"{weights} do not exist" in line
    shutil.rmtree(folder)
    (folder).mkdir()
    (folder / "cfg.json").write_text("{}")
    assert "missing weights file" in import_error(tiny_run, {"path": str(folder)}, tmp_path, capsys)


@pytest.mark.parametrize("package", ["saelens", "sparsify"])
def test_truncated_weights_name_the_file(package, tiny_run, tmp_path, capsys) -> None:
    folder = tmp_path / package
    weights = saved_by(package, folder)
    weights.write_bytes(weights.read_bytes()[:-100])
    line = import_error(tiny_run, {"path": str(folder)}, tmp_path, capsys)
    assert f"{weights} cannot be read: truncated" in line


def test_unknown_architectures_name_the_config_and_the_supported_ones(tiny_run, tmp_path, capsys) -> None:
    folder = tmp_path / "saelens"
    saelens_sae("standard", torch.randn(64, 32)).save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matching_pursuit"}))
    line = import_error(tiny_run, {"path": str(folder)}, tmp_path, capsys)
    assert str(folder / "cfg.json") in line and "'matching_pursuit'" in line and "topk" in line
    coder = tmp_path / "groupmax"
    sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=64, k=4, activation="groupmax")).save_to_disk(coder)
    line = import_error(tiny_run, {"path": str(coder)}, tmp_path, capsys)
    assert str(coder / "cfg.json") in line and "'groupmax'" in line


def test_a_missing_folder_is_named(tiny_run, tmp_path, capsys) -> None:
    line = import_error(tiny_run, {"path": str(tmp_path / "nowhere")}, tmp_path, capsys)
    assert f"folder {tmp_path / 'nowhere'} does not exist" in line


# --- the config section -------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "a", "release": "r", "sae_id": "i"}, "exactly one of path, release"),
    ({}, "exactly one of path, release"),
    ({"release": "r"}, "external[0].sae_id: required with release"),
    ({"hub": "h", "format": "saelens"}, "external[0].format: belongs with path"),
    ({"path": "a", "site": "resid3"}, "external[0].site: resid3 is not one of activations.sites"),
])
def test_bad_external_entries_name_their_key(entry, message) -> None:
    config = tiny_config(Path("/nonexistent/model"), Path("/nonexistent/corpus"))
    config["external"] = [{"name": "ext", "site": "resid2", **entry}]
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(config)


def test_external_names_are_unique() -> None:
    config = tiny_config(Path("/nonexistent/model"), Path("/nonexistent/corpus"))
    config["external"] = [{"name": "ext", "site": "resid2", "path": "a"}, {"name": "ext", "site": "resid2", "path": "b"}]
    with pytest.raises(UserError, match=r"external\[1\].name"):
        validate_config(config)
