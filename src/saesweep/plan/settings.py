"""The resolved settings of each job, built from a validated config, and the output paths.

Each job's settings are written to a small JSON file beside its outputs and are the
single source of truth for that job: ``saesweep <stage> --settings FILE`` repeats it by
hand. They hold only what the job uses, so editing another part of the config (adding
a cell, say) does not touch them and does not rerun the job.
"""

from __future__ import annotations

from typing import Any

from saesweep.core.errors import UserError
from saesweep.core.job_settings import (
    EvalSettings, ExtractionSettings, FeatureSettings, ImportSettings, TrainSettings, construct,
)
from saesweep.core.sites import transformer_lens_hook
from saesweep.plan.cells import parse_cell, sweep_cells
from saesweep.plan.config import dead_window, learning_rate, token_budget


def run_dir(config: dict[str, Any]) -> str:
    """``results/{run}``."""
    return f"results/{config['run']}"


def activation_dir(config: dict[str, Any], site: str, split: str) -> str:
    """A site's shard folder: ``{site}`` for training tokens, ``{site}-eval`` for held-out ones."""
    return f"{run_dir(config)}/activations/{site}{'' if split == 'train' else '-eval'}"


def cell_dir(config: dict[str, Any], site: str, cell: str) -> str:
    """``results/{run}/cells/{site}/{cell}``."""
    return f"{run_dir(config)}/cells/{site}/{cell}"


def external_dir(config: dict[str, Any], site: str, name: str) -> str:
    """``results/{run}/external/{site}/{name}``: an external SAE in saesweep's format, its metrics."""
    return f"{run_dir(config)}/external/{site}/{name}"


def corpus_dir(config: dict[str, Any]) -> str:
    """``resources/corpus/{name}``: the corpus split into train.jsonl and eval.jsonl."""
    return f"resources/corpus/{config['corpus']['name']}"


def extraction_part_file(config: dict[str, Any], split: str, part: str) -> str:
    """``results/{run}/activations/{split}-parts/part-{part}.json``: the record one extraction
    part job leaves (``part`` as written: ``0003``, from zero)."""
    return f"{run_dir(config)}/activations/{split}-parts/part-{part}.json"


def extraction_settings(config: dict[str, Any], split: str, device: str = "auto") -> ExtractionSettings:
    """What ``saesweep extract`` needs for one split (train or eval). ``part_files``: the
    record of each part job, as many as config key activations.extract_jobs for training
    tokens; held-out tokens are few and take one part. A synthetic run (config key synthetic)
    generates its rows (``plan.config.fill_synthetic`` made its windows one row each)."""
    activations = config["activations"]
    return construct(ExtractionSettings, {
        "split": split,
        "model": config["model"],
        "sites": activations["sites"],
        "output_dirs": {site: activation_dir(config, site, split) for site in activations["sites"]},
        "corpus_file": f"{corpus_dir(config)}/{split}.jsonl",
        "corpus_summary": f"{corpus_dir(config)}/corpus.json",
        "context": activations["context"],
        "skip_positions": activations["skip_positions"],
        "batch_size": activations["batch_size"],
        "tokens": activations["train_tokens" if split == "train" else "eval_tokens"],
        "shard_tokens": activations["shard_tokens"],
        "storage_dtype": activations["storage_dtype"],
        "device": device,
        "part_files": [
            extraction_part_file(config, split, f"{part:04d}")
            for part in range(activations["extract_jobs"] if split == "train" else 1)
        ],
        **synthetic_extraction(config),
    })


def synthetic_extraction(config: dict[str, Any]) -> dict[str, Any]:
    """The generator of a synthetic run (config key synthetic); nothing for an LM's, whose
    settings stay as they were."""
    return {} if config["synthetic"] is None else {"synthetic": config["synthetic"]}


def train_settings(config: dict[str, Any], site: str, cell_name: str) -> TrainSettings:
    """What ``saesweep train`` needs for one cell: the recipe resolved for its architecture,
    parameters (AuxK's among them, where the architecture uses it) and n."""
    cell = parse_cell(cell_name)
    train = config["train"]
    return construct(TrainSettings, {
        "site": site,
        "arch": cell.arch,
        "params": cell.parameters,
        "n_latents": cell.n_latents,
        "seed": cell.seed,
        "activations": activation_dir(config, site, "train"),
        "on_exhausted": config["activations"]["on_exhausted"],
        "tokens": token_budget(train, cell.n_latents, cell.k),
        "batch_size": train["batch_size"],
        "lr": learning_rate(train, cell.n_latents) * cell.parameters["lr_factor"],
        "warmup_tokens": train["lr"]["warmup_tokens"],
        "decay": train["lr"]["decay"],
        "decay_fraction": train["lr"]["decay_fraction"],
        "adam_eps": train["adam_eps"],
        "dead": {"threshold": train["dead"]["threshold"], "window_tokens": dead_window(train, cell.n_latents, cell.k)},
        "geometric_median_sample": train["geometric_median_sample"],
        "checkpoint_every_tokens": train["checkpoint_every_tokens"],
        "log_every_tokens": train["log_every_tokens"],
        "heldout": {
            **train["heldout"], "tokens": train["heldout"]["tokens"] or config["evaluate"]["tokens"],
            "activations": activation_dir(config, site, "eval"),
        },
        "device": train["device"],
        "autocast_bf16": train["autocast_bf16"],
        **distributed_settings(train),
        **convergence_settings(train),
        "input_normalisation": train["input_normalisation"],
        "ema_decay": train["ema_decay"],
    })


def distributed_settings(train: dict[str, Any]) -> dict[str, Any]:
    """``{"distributed": …}`` (processes and timeout) for a cell of several processes; nothing
    for one, so single-process cells keep their settings (and results) as they were."""
    distributed = train["distributed"]
    if distributed["data_parallel"] * distributed["latent_shards"] == 1:
        return {}
    return {"distributed": {key: distributed[key] for key in ("data_parallel", "latent_shards", "timeout_s")}}


def convergence_settings(train: dict[str, Any]) -> dict[str, Any]:
    """``{"convergence": …}`` (ε, window, minimum) when ``train.budget.mode`` is converge;
    nothing for a fixed budget, so its cells keep their settings (and results) as they were."""
    budget = train["budget"]
    if budget["mode"] == "fixed":
        return {}
    return {"convergence": {key: budget[key] for key in ("eps", "window", "min_tokens")}}


def evaluation_sizes(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of config key ``evaluate`` that size the evaluation (all but its device and LM dtype)."""
    return {key: value for key, value in config["evaluate"].items() if key not in ("device", "lm_dtype")}


def evaluation_model(config: dict[str, Any]) -> dict[str, Any]:
    """The LM as the evaluation loads it: config key model, computing in evaluate.lm_dtype
    (resolved by ``plan.protocol``: model.dtype, or float32 under gao2024)."""
    return {**config["model"], "dtype": config["evaluate"]["lm_dtype"]}


def evaluation_device(config: dict[str, Any]) -> str:
    """Where evaluation runs: config key evaluate.device, or train.device when it is null."""
    return config["evaluate"].get("device") or config["train"]["device"]


def eval_settings(config: dict[str, Any], site: str, cell_name: str) -> EvalSettings:
    """What ``saesweep evaluate`` needs for one cell."""
    return construct(EvalSettings, {
        **evaluation_sizes(config),
        "site": site,
        "cell": cell_name,
        "setting": parse_cell(cell_name).setting,
        "seed": parse_cell(cell_name).seed,
        "model": evaluation_model(config),
        "eval_activations": activation_dir(config, site, "eval"),
        "device": evaluation_device(config),
    })


def feature_settings(config: dict[str, Any], site: str, cell_name: str) -> FeatureSettings:
    """What ``saesweep features`` needs for one cell's feature browser (config key ``features``
    but its ``cells``; the evaluation's chunk and device)."""
    return construct(FeatureSettings, {
        **{key: value for key, value in config["features"].items() if key != "cells"},
        "batch_size": config["evaluate"]["batch_size"],
        "site": site,
        "cell": cell_name,
        "seed": parse_cell(cell_name).seed,
        "model": config["model"],
        "eval_activations": activation_dir(config, site, "eval"),
        "device": evaluation_device(config),
    })


def feature_cells(config: dict[str, Any]) -> list[str]:
    """The cells whose feature browser the sweep builds (config key features.cells: ``all`` or
    a list of names); any other cell's is built on demand. None for synthetic activations,
    which have no tokens to show."""
    if config["synthetic"]:
        return []
    chosen = config["features"]["cells"]
    return [cell.name for cell in sweep_cells(config)] if chosen == "all" else list(chosen)


def external_entry(config: dict[str, Any], site: str, name: str) -> dict[str, Any]:
    """The entry of ``external`` with this site and name."""
    for entry in config["external"]:
        if (entry["site"], entry["name"]) == (site, name):
            return entry
    raise UserError(f"config key external: no external SAE {name!r} of site {site}")


def external_source(entry: dict[str, Any]) -> dict[str, str]:
    """Where an external SAE comes from: ``{"path"}``, ``{"release", "sae_id"}`` (SAELens) or
    ``{"hub"[, "hookpoint"]}`` (sparsify)."""
    return {key: entry[key] for key in ("path", "release", "sae_id", "hub", "hookpoint") if key in entry}


def import_settings(config: dict[str, Any], site: str, name: str) -> ImportSettings:
    """What ``saesweep import`` needs for one external SAE (the held-out activations give d)."""
    entry = external_entry(config, site, name)
    return construct(ImportSettings, {
        "name": name,
        "site": site,
        "source": external_source(entry),
        "format": entry.get("format", "auto"),
        "activations": activation_dir(config, site, "eval"),
        "model": config["model"]["id"],
    })


def external_eval_settings(config: dict[str, Any], site: str, name: str) -> EvalSettings:
    """What ``saesweep evaluate`` needs for one external SAE: a cell's settings with the
    external's name as its setting and seed 0 for the evaluation's samples."""
    return construct(EvalSettings, {
        **evaluation_sizes(config),
        "site": site,
        "cell": name,
        "setting": name,
        "seed": 0,
        "model": evaluation_model(config),
        "eval_activations": activation_dir(config, site, "eval"),
        "device": evaluation_device(config),
    })


def interop_metadata(config: dict[str, Any], site: str) -> dict[str, Any]:
    """What other tools record about the activations an SAE of ``site`` reads, in SAELens'
    metadata fields: the model, the TransformerLens hook of the site (with the one
    processing option that changes it off: saesweep reads the transformers model's own
    activations), context, skipped leading positions, prepend_bos and the text."""
    corpus, activations = config["corpus"], config["activations"]
    dataset = corpus["dataset"] if corpus["source"] == "hf" else f"{corpus['source']}:{corpus.get('package', corpus['name'])}"
    return {
        "model_name": config["model"]["id"],
        "model_revision": config["model"]["revision"],
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "hook_name": transformer_lens_hook(site),
        "hook_head_index": None,
        "context_size": activations["context"],
        "seqpos_slice": [activations["skip_positions"], None],
        "prepend_bos": config["model"]["prepend_bos"],
        "dataset_path": dataset,
        "saesweep_site": site,
        "saesweep_corpus": corpus["name"],
    }
