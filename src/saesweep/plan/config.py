"""A run's configuration: schema validation, defaults, cross-key checks, and the cells.

The config is a plain dict (as Snakemake holds it). ``validate_config`` checks it against
the JSON schema in ``workflow/schemas/config.schema.yaml``, fills the schema's defaults,
and checks what a schema cannot express; every failure is a ``UserError`` that names the
key. The rule functions (token budget, learning rate, dead window) live here too, so the
workflow and the command line resolve a cell's settings the same way.
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from saesweep.core.errors import UserError, require_package
from saesweep.core.sites import parse_site
from saesweep.plan.cells import Cell, sweep_cells
from saesweep.plan.protocol import apply_protocol
from saesweep.sae.catalog import declaration

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@cache
def load_schema() -> dict[str, Any]:
    """The config's JSON schema (draft 2020-12)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and return it validated, with defaults filled."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {error}") from None
    return validate_config(raw)


def validate_config(raw: Any) -> dict[str, Any]:
    """Schema check, defaults, then the cross-key checks; returns a new dict."""
    if not isinstance(raw, dict):
        raise UserError("config must be a mapping of keys (run, model, corpus, ...)")
    if isinstance(raw.get("train"), dict) and "auxk" in raw["train"]:
        raise UserError(
            "config key train.auxk: AuxK's settings are parameters of the architectures that use it, "
            "per cell: sweep.archs.{arch}.aux_coef (0 turns AuxK off), k_aux, aux_error_norm (config/README.md)"
        )
    config = copy.deepcopy(raw)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(load_schema()).iter_errors(config)
    )
    if error is not None:
        raise UserError(f"config key {key_name(error.absolute_path)}: {error.message}")
    fill_defaults(config, load_schema())
    fill_synthetic(config)
    apply_protocol(config)
    check_cross_keys(config)
    return config


SYNTHETIC = "synthetic"
"""The model id and corpus name (and source) that a synthetic run's config is given."""
LM_FIT_METRICS = ("delta_lm_loss", "kl_sae", "probe_loss")
"""The metrics of scaling.metrics that need an LM (NaN in a synthetic run)."""


def fill_synthetic(config: dict[str, Any]) -> None:
    """A synthetic run (key ``synthetic``) reads no LM and no text: its config gets the model
    record {id: synthetic, hidden_size: d} and the corpus record {name, source: synthetic}, so
    that every job's settings and resources read d as for a model, and windows of one row
    (activations.context 1, skip_positions 0). It has one site (the site only names the
    folders) and needs sae-lens."""
    generator = config["synthetic"]
    if generator is None:
        return
    model = {"id": SYNTHETIC, "revision": None, "pypi_gguf": None, "dtype": "float32", "prepend_bos": False,
             "hidden_size": generator["hidden_dim"]}
    corpus = {"name": SYNTHETIC, "source": SYNTHETIC}
    for key, filled in (("model", model), ("corpus", corpus)):
        if config.get(key, filled) != filled:
            raise UserError(f"config key {key}: a synthetic run (config key synthetic) reads no {key}; remove the key")
        config[key] = filled
    config["activations"].update(context=1, skip_positions=0)
    if len(config["activations"]["sites"]) != 1:
        raise UserError("config key activations.sites: a synthetic run has one site (it only names the folders)")
    needing_lm = [metric for metric in config["scaling"]["metrics"] if metric in LM_FIT_METRICS]
    if needing_lm:
        raise UserError(f"config key scaling.metrics: {', '.join(needing_lm)} need(s) an LM, which a synthetic run has not; fit e.g. [nmse]")
    require_package("sae_lens", "sae-lens", "peers", "config key synthetic")


def key_name(path: Any) -> str:
    """A config key path such as ``sweep.k[2]``; the top level is called ``(top level)``."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "(top level)"


def fill_defaults(node: Any, schema: dict[str, Any]) -> None:
    """Insert the schema's ``default`` values for absent object keys, recursively."""
    if not isinstance(node, dict):
        return
    for key, child_schema in schema.get("properties", {}).items():
        if key not in node and "default" in child_schema:
            node[key] = copy.deepcopy(child_schema["default"])
        if key in node:
            fill_defaults(node[key], child_schema)


def check_cross_keys(config: dict[str, Any]) -> None:
    """Checks spanning several keys, each failing with the key it concerns."""
    corpus = config["corpus"]
    needed = {"npm": ["package", "include"], "pypi": ["package", "include"], "files": ["include"], "hf": ["dataset"], SYNTHETIC: []}
    for key in needed[corpus["source"]]:
        if key not in corpus:
            raise UserError(f"config key corpus.{key}: required when corpus.source is {corpus['source']}")
    activations = config["activations"]
    if activations["skip_positions"] >= activations["context"]:
        raise UserError(
            f"config key activations.skip_positions: {activations['skip_positions']} leaves no "
            f"position of a {activations['context']}-token window"
        )
    check_evaluation_sizes(config)
    cells = sweep_cells(config)  # architectures, their parameters and every cell's feasibility
    check_training_tokens(config, cells)
    check_external(config)
    budget = config["train"]["tokens"]
    if budget["max"] is not None and budget["max"] < budget["min"]:
        raise UserError("config key train.tokens.max: smaller than train.tokens.min")
    check_distributed(config, cells)
    check_features(config, cells)
    check_convergence(config)


def check_training_tokens(config: dict[str, Any], cells: list[Cell]) -> None:
    """A budget that can be meant: at least ``train.geometric_median_sample`` extracted tokens
    (the sample b_pre starts from; the normalisation's μ and s come from fewer tokens still
    less reliably), and no cell going through them more than ``activations.max_epochs`` times
    (epochs = the cell's budget / activations.train_tokens; more than 1 is refused outright with
    ``on_exhausted: error``). The extraction may give fewer tokens when the corpus ends: the
    cells table's ``epochs`` column has the epochs each cell trained for."""
    activations, train = config["activations"], config["train"]
    extracted, sample = activations["train_tokens"], train["geometric_median_sample"]
    if extracted < sample:
        raise UserError(
            f"config key activations.train_tokens: {extracted} tokens are fewer than train.geometric_median_sample "
            f"({sample}), the sample the SAEs' initialisation is taken from and a floor for the normalisation's statistics"
        )
    limit = 1 if activations["on_exhausted"] == "error" else activations["max_epochs"]
    largest = max(cells, key=lambda cell: token_budget(train, cell.n_latents, cell.k), default=None)
    if largest is None:
        return
    budget = token_budget(train, largest.n_latents, largest.k)
    if budget > limit * extracted:
        key = "activations.on_exhausted is error" if limit == 1 else f"activations.max_epochs is {limit:g}"
        raise UserError(
            f"config key activations.train_tokens: cell {largest.name} trains on {budget} tokens, "
            f"{budget / extracted:.1f} epochs of the {extracted} extracted, and {key}: extract more tokens, "
            "lower train.tokens or raise the limit"
        )


def check_convergence(config: dict[str, Any]) -> None:
    """``train.budget.mode: converge`` needs a learning rate defined for a run of unknown length
    (``train.lr.decay: none``) and a held-out curve spanning at least one doubling
    (``train.heldout.points`` ≥ 2), which the criterion compares (``train.convergence``)."""
    train = config["train"]
    if train["budget"]["mode"] != "converge":
        return
    if train["lr"]["decay"] != "none":
        raise UserError(
            f"config key train.lr.decay: {train['lr']['decay']} needs the run's end, which train.budget.mode "
            "converge does not know in advance; set train.lr.decay: none"
        )
    if train["heldout"]["points"] < 2:
        raise UserError(
            "config key train.heldout.points: train.budget.mode converge compares held-out points a "
            "doubling of tokens apart; set at least 2"
        )


def check_distributed(config: dict[str, Any], cells: list[Cell]) -> None:
    """A distributed cell needs an architecture whose step runs across processes, n a
    multiple of the latent shards and a batch of at least one row per replica."""
    train = config["train"]
    distributed = train["distributed"]
    shards, replicas = distributed["latent_shards"], distributed["data_parallel"]
    if shards * replicas == 1:
        return
    for cell in cells:
        if not declaration(cell.arch).shardable:
            raise UserError(
                f"config key train.distributed: architecture {cell.arch} cannot be trained by several "
                "processes (its training step has no latent-sharded or data-parallel form); "
                "set data_parallel and latent_shards to 1"
            )
        if cell.n_latents % shards:
            raise UserError(
                f"config key train.distributed.latent_shards: {shards} does not divide n_latents = {cell.n_latents}"
            )
    if train["batch_size"] < replicas:
        raise UserError(
            f"config key train.distributed.data_parallel: {replicas} replicas need train.batch_size of at least "
            f"{replicas} (got {train['batch_size']})"
        )


def check_evaluation_sizes(config: dict[str, Any]) -> None:
    """What the evaluation reads must fit in the held-out split it is given (else it would
    silently use less): its tokens, and its windows of context − skip_positions kept tokens."""
    activations, evaluate = config["activations"], config["evaluate"]
    held_out = activations["eval_tokens"]
    if evaluate["tokens"] > held_out:
        raise UserError(f"config key evaluate.tokens: {evaluate['tokens']} is more than activations.eval_tokens ({held_out})")
    curve = config["train"]["heldout"]["tokens"]
    if curve is not None and curve > held_out:
        raise UserError(f"config key train.heldout.tokens: {curve} is more than activations.eval_tokens ({held_out})")
    kept = activations["context"] - activations["skip_positions"]
    for key in ("downstream_windows", "analysis_windows") if config["synthetic"] is None else ():  # no LM: no windows read
        if evaluate[key] * kept > held_out:
            raise UserError(
                f"config key evaluate.{key}: {evaluate[key]} windows of {kept} kept tokens are more than "
                f"activations.eval_tokens ({held_out})"
            )
    if evaluate["ablation_windows"] > evaluate["analysis_windows"]:
        raise UserError(
            f"config key evaluate.ablation_windows: {evaluate['ablation_windows']} is more than "
            f"evaluate.analysis_windows ({evaluate['analysis_windows']}), among which the ablated latents are sampled"
        )


def check_features(config: dict[str, Any], cells: list[Cell]) -> None:
    """The feature browser's cells are cells of the sweep, its latents include its most
    frequent ones, and its windows fit in the held-out split."""
    features, activations = config["features"], config["activations"]
    if features["cells"] != "all":
        names = {cell.name for cell in cells}
        unknown = [name for name in features["cells"] if name not in names]
        if unknown:
            raise UserError(f"config key features.cells: {unknown[0]!r} is not a cell of the sweep (e.g. {min(names)})")
    if features["most_frequent"] > features["latents"]:
        raise UserError(
            f"config key features.most_frequent: {features['most_frequent']} is more than features.latents ({features['latents']})"
        )
    kept = activations["context"] - activations["skip_positions"]
    if features["windows"] * kept > activations["eval_tokens"]:
        raise UserError(
            f"config key features.windows: {features['windows']} windows of {kept} kept tokens are more than "
            f"activations.eval_tokens ({activations['eval_tokens']})"
        )


SOURCES = {"path": ("format",), "release": ("sae_id",), "hub": ("hookpoint",)}
"""The source keys of an external SAE → the keys that belong to each."""
REQUIRED_WITH = {"release": "sae_id"}


def check_external(config: dict[str, Any]) -> None:
    """Each external SAE has one source, reads a site of the sweep and a name of its own."""
    seen: set[str] = set()
    for index, entry in enumerate(config["external"]):
        key = f"external[{index}]"
        sources = [source for source in SOURCES if source in entry]
        if len(sources) != 1:
            raise UserError(
                f"config key {key}: give exactly one of path, release (with sae_id) or hub (found {sources or 'none'})"
            )
        source = sources[0]
        for other, belongs in SOURCES.items():
            for extra in belongs:
                if extra in entry and other != source:
                    raise UserError(f"config key {key}.{extra}: belongs with {other}, not {source}")
        if source in REQUIRED_WITH and REQUIRED_WITH[source] not in entry:
            raise UserError(f"config key {key}.{REQUIRED_WITH[source]}: required with {source}")
        if entry["site"] not in config["activations"]["sites"]:
            raise UserError(
                f"config key {key}.site: {entry['site']} is not one of activations.sites "
                f"{config['activations']['sites']} (its held-out activations are evaluated)"
            )
        if entry["name"] in seen:
            raise UserError(f"config key {key}.name: {entry['name']!r} is used by another external SAE")
        seen.add(entry["name"])


def check_against_model_folder(config: dict[str, Any]) -> None:
    """When ``model.id`` is a local folder with a config.json: its sites against the model's
    depth, and ``model.hidden_size`` (when given) against its width. Reads the JSON file
    only (importing transformers would slow the start of every workflow job)."""
    path = Path(config["model"]["id"], "config.json")
    if not path.exists():
        return
    model = json.loads(path.read_text())
    if model.get("num_hidden_layers") is not None:
        check_sites_against_model(config, model["num_hidden_layers"])
    given, width = config["model"]["hidden_size"], model.get("hidden_size")
    if given is not None and width is not None and given != width:
        raise UserError(f"config key model.hidden_size: {given}, but {path} says hidden_size {width}")


def check_sites_against_model(config: dict[str, Any], n_layers: int) -> None:
    """Every site's layer must exist in a model of ``n_layers`` blocks (0 … n_layers−1)."""
    for index, site in enumerate(config["activations"]["sites"]):
        layer = parse_site(site).layer
        if layer >= n_layers:
            raise UserError(
                f"config key activations.sites[{index}]: {site} asks for block {layer}, "
                f"but the model has blocks 0..{n_layers - 1}"
            )


def token_budget(train: dict[str, Any], n_latents: int, k: int | None) -> int:
    """Training tokens of a cell:
    base · (n / n_ref)^n_exponent · (k_ref / k)^k_exponent, clipped to [min, max];
    a cell without k (ReLU, JumpReLU, Gated) uses k = k_ref."""
    rule = train["tokens"]
    k = rule["k_ref"] if k is None else k
    tokens = rule["base"] * (n_latents / rule["n_ref"]) ** rule["n_exponent"] * (rule["k_ref"] / k) ** rule["k_exponent"]
    tokens = max(rule["min"], tokens)
    if rule["max"] is not None:
        tokens = min(rule["max"], tokens)
    return int(round(tokens))


def learning_rate(train: dict[str, Any], n_latents: int) -> float:
    """Peak learning rate lr = base / sqrt(n / n_ref) (Gao et al.: 2e-4 / sqrt(n / 2^14))."""
    return train["lr"]["base"] / math.sqrt(n_latents / train["lr"]["n_ref"])


def dead_window(train: dict[str, Any], n_latents: int, k: int | None) -> int:
    """Tokens without a firing after which a latent counts as dead: with train.dead.window
    ``scaled``, max(min_tokens, factor · n / k), n / k being the mean gap between firings of a
    latent if all latents fired equally often (a cell without k uses k = train.tokens.k_ref);
    with ``fixed``, train.dead.window_tokens for every cell (openai/sparse_autoencoder: 10M)."""
    dead = train["dead"]
    if dead["window"] == "fixed":
        return dead["window_tokens"]
    k = train["tokens"]["k_ref"] if k is None else k
    return int(max(dead["min_tokens"], dead["factor"] * n_latents / k))
