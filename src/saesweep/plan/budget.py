"""What a run will cost before it runs: jobs, bytes on disk, memory and wall time.

The workflow's rules take their ``mem_mb`` and ``runtime`` from the functions here and
``saesweep plan`` prints the same numbers, so the plan and what a cluster is asked for
have one source. All sizes are in bytes, memory in MB (10⁶ bytes), times in minutes or
hours as named. The rules' resources are arithmetic on the validated config and the
model's hidden size d (no torch at parse time); only the SAE sizes build the architecture.

Activations of one split of one site (``saesweep extract``): the corpus is cut into
``w = ⌈tokens / (context − skip_positions)⌉`` windows, each giving context − skip rows, so

    rows = w · (context − skip),   bytes = rows · d · itemsize(storage_dtype) + w · context · 4

(the int32 token ids of the windows are stored beside the activations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from saesweep.core.job_settings import DistributedSettings, TrainSettings
from saesweep.evaluation.token_tasks import TASKS
from saesweep.plan.cells import parse_cell, sweep_cells
from saesweep.plan.settings import feature_cells, train_settings

DEFAULT_WIDTH = 4096
"""d assumed when neither ``model.hidden_size`` nor the model folder's config.json gives it."""
DEFAULT_LM_SHAPE = (24, 65536)
"""(blocks, vocabulary) assumed when the model folder's config.json does not give them (a hub
id before download): GPT-2, Pythia and SmolLM2 have ≤ 24 blocks at ≤ 1B parameters and
vocabularies of about 50,000."""
MODEL_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per LM parameter (config key model.dtype)."""
STORAGE_BYTES = {"float16": 2, "float32": 4}
"""Bytes per stored activation value (config key activations.storage_dtype)."""
TOKEN_ID_BYTES = 4
"""Token ids of the windows are stored as int32."""
FLOAT_BYTES = 4
"""SAE parameters, gradients and Adam moments are float32."""
BASE_MEM_MB = 1500
"""The interpreter, torch and its allocator in a training job."""
EVALUATE_BASE_MB = 2000
"""The interpreter, torch, transformers and the tokenizer in an evaluation job."""
TRAIN_FLOPS_PER_S = {"cpu": 1e10, "auto": 1e10, "cuda": 1e13}
"""Sustained rate, per ``train.device``, assumed for a training step's 6 · tokens · n · d
FLOPs (forward and backward of the encoder and decoder products): a conservative guess,
below what this package's sparse TopK step reaches on 2 CPU cores or one data-centre GPU."""
RUNTIME_MARGIN = 2
"""A training job asks for this many times its estimated time ..."""
RUNTIME_BASE_MIN = 10
"""... plus these minutes (start-up, loading the shards, writing the outputs)."""
EVALUATE_RUNTIME_MIN = 30
"""Wall time asked for by one evaluation job (cell or external SAE)."""
ADAM_STATE_SLOTS = 2
"""Adam keeps two moments of every parameter (exp_avg, exp_avg_sq)."""

SWEEP_RULES = ("aggregate", "fit_laws", "plot_figures", "report_tables", "compare_architectures", "explorer", "all")
"""The rules with one job per run, after the cells."""


def model_width(config: dict[str, Any]) -> tuple[int, str]:
    """The model's hidden size d and where it came from: the config key
    ``model.hidden_size``, else ``hidden_size`` in the model folder's config.json,
    else ``DEFAULT_WIDTH``."""
    if config["model"]["hidden_size"] is not None:
        return config["model"]["hidden_size"], "model.hidden_size"
    path = Path(config["model"]["id"], "config.json")
    if path.exists():
        width = json.loads(path.read_text()).get("hidden_size")
        if width is not None:
            return int(width), str(path)
    return DEFAULT_WIDTH, "assumed (set model.hidden_size)"


def extract_mem_mb(d: int, activations: dict[str, Any]) -> int:
    """Memory of an extraction part job: 3 GB for the interpreter, torch and the batch,
    6 · d² bytes per block-sized share of the LM (a rough bound for models up to ~1B), and
    one shard (what streaming extraction holds): every site's rows in the storage dtype, plus
    a float64 copy of one site's rows for the shard's sums."""
    storage_bytes = 2 if activations["storage_dtype"] == "float16" else 4
    shard_bytes = activations["shard_tokens"] * d * (len(activations["sites"]) * storage_bytes + 8)
    return int(3000 + 6 * d * d / 1000 + shard_bytes / 1e6)


def lm_shape(config: dict[str, Any]) -> tuple[int, int]:
    """(blocks L, vocabulary V) of the model from its folder's config.json (``num_hidden_layers``
    or ``n_layer``, ``vocab_size``), else ``DEFAULT_LM_SHAPE``."""
    path = Path(config["model"]["id"], "config.json")
    if path.exists():
        model = json.loads(path.read_text())
        layers = model.get("num_hidden_layers", model.get("n_layer"))
        if layers is not None and model.get("vocab_size") is not None:
            return int(layers), int(model["vocab_size"])
    return DEFAULT_LM_SHAPE


def evaluate_bytes(config: dict[str, Any], d: int, n: int) -> dict[str, int]:
    """Memory of an evaluation job of an SAE with n latents over d dimensions, by term (bytes),
    as the bound of ``evaluation.analysis`` states it; with c = evaluate.batch_size (the
    chunk), T = analysis_windows · (context − skip_positions) analysis tokens, t = the token
    tasks, p, m = probe_candidates, explain_latents, U = min(n, t·p + m) chosen latents,
    L, V = ``lm_shape``, b = lm_batch_size:

        base           ``EVALUATE_BASE_MB``: the interpreter, torch, transformers
        sae            4 · (2·n·d + 3·n + 3·d)        weights, biases, per-latent extras
        lm             itemsize(evaluate.lm_dtype) · (12·L·d² + V·d)
        chunk          4 · 3·c·n + 8·c·n              one chunk's pre-activations and codes, and
                                                      the chunk in float64 for the probe screen
        activations    4 · (tokens + T) · d           reconstruction and analysis rows
        logits         4 · 7·b·context·V              one LM batch's logits and log-probabilities
        analysis       8 · (6 + 3·t)·n + 4 · T·(U + 1) + T·t + 8 · 12·T·p
                                                      screen sums, counts, chosen columns,
                                                      labels, one task's probe fits
        recovery       12·n·N + 4·c·(n + N)           only a synthetic run (N true features; no LM):
                                                      |cos| (float32) and the Hungarian costs
                                                      (float64), one chunk's dense codes and
                                                      true feature activations

    None grows with T · n."""
    evaluate, activations = config["evaluate"], config["activations"]
    context = activations["context"]
    tokens = evaluate["analysis_windows"] * (context - activations["skip_positions"])
    tasks, candidates = len(TASKS), evaluate["probe_candidates"]
    chosen = min(n, tasks * candidates + evaluate["explain_latents"])
    layers, vocab = (0, 0) if config["synthetic"] else lm_shape(config)  # synthetic activations: no LM
    return {
        "base": EVALUATE_BASE_MB * 10**6,
        "sae": FLOAT_BYTES * (2 * n * d + 3 * n + 3 * d),
        "lm": MODEL_DTYPE_BYTES[config["evaluate"]["lm_dtype"]] * (12 * layers * d * d + vocab * d),
        "chunk": (FLOAT_BYTES * 3 + 8) * evaluate["batch_size"] * n,
        "activations": FLOAT_BYTES * (evaluate["tokens"] + tokens) * d,
        "logits": FLOAT_BYTES * 7 * evaluate["lm_batch_size"] * context * vocab,
        "analysis": 8 * (6 + 3 * tasks) * n + FLOAT_BYTES * tokens * (chosen + 1) + tokens * tasks
        + 8 * 12 * tokens * candidates,
        **recovery_bytes(config, n),
    }


def recovery_bytes(config: dict[str, Any], n: int) -> dict[str, int]:
    """``{"recovery": …}`` (``evaluate_bytes``) for a synthetic run, nothing for an LM's."""
    if not config["synthetic"]:
        return {}
    features = config["synthetic"]["num_features"]
    return {"recovery": 12 * n * features + FLOAT_BYTES * config["evaluate"]["batch_size"] * (n + features)}


def evaluate_mem_mb(config: dict[str, Any], d: int, n: int) -> int:
    """Memory of an evaluation job in MB: the sum of ``evaluate_bytes``, rounded up."""
    return math.ceil(sum(evaluate_bytes(config, d, n).values()) / 1e6)


def cell_latents(cell: str) -> int:
    """n of a cell from its name (for a rule's resources)."""
    return parse_cell(cell).n_latents


def train_processes(distributed: DistributedSettings | None) -> tuple[int, int]:
    """(D, S): a cell's data-parallel replicas and latent shards (1, 1 for one process)."""
    return (1, 1) if distributed is None else (distributed.data_parallel, distributed.latent_shards)


def train_mem_mb(settings: TrainSettings, d: int, shard_tokens: int) -> int:
    """Memory of a training job, per process times its D · S processes: its latents'
    parameters, gradients and Adam moments of W_enc and W_dec (4 · 2(n/S)d floats; 5 with a
    weight average, ``ema_slots``), its rows' pre-activations and selections (3 · (B/D) · (n/S)
    floats), 8 shards of float16 read ahead (8 · shard_tokens · d · 2 bytes), and ``BASE_MEM_MB``."""
    replicas, shards = train_processes(settings.distributed)
    n, batch = settings.n_latents / shards, settings.batch_size / replicas
    floats = (4 + ema_slots(settings.ema_decay)) * 2 * n * d + 3 * batch * n
    shard_bytes = 8 * shard_tokens * d * 2
    return int(replicas * shards * (BASE_MEM_MB + (FLOAT_BYTES * floats + shard_bytes) / 1e6))


def train_flops(settings: TrainSettings, d: int) -> int:
    """FLOPs of a training job: 6 · tokens · n · d."""
    return 6 * settings.tokens * settings.n_latents * d


def train_hours(settings: TrainSettings, d: int) -> float:
    """Estimated hours of a training job: its FLOPs at ``TRAIN_FLOPS_PER_S`` of its device."""
    return train_flops(settings, d) / TRAIN_FLOPS_PER_S[settings.device] / 3600


def train_runtime_min(settings: TrainSettings, d: int) -> int:
    """Wall time asked for by a training job, in minutes:
    ``RUNTIME_BASE_MIN + RUNTIME_MARGIN · 60 · train_hours``, rounded up."""
    return math.ceil(RUNTIME_BASE_MIN + RUNTIME_MARGIN * 60 * train_hours(settings, d))


def tensor_bytes(arch: str, n: int, d: int, params: dict[str, Any]) -> tuple[int, int]:
    """Bytes of an SAE's tensors as ``sae.safetensors`` holds them (its state dict), and
    of its trained parameters alone; the architecture is built on torch's meta device, so
    nothing is allocated."""
    import torch

    from saesweep.sae.registry import build_sae

    with torch.device("meta"):
        sae = build_sae(arch, d, n, params)
    stored = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in sae.parameters() if p.requires_grad)
    return stored, trained


def ema_slots(decay: float) -> int:
    """Copies of the trained parameters a weight average keeps (``train.ema``): 1, or 0 without one."""
    return int(decay > 0)


def checkpoint_bytes(stored: int, trained: int, n: int, decay: float) -> int:
    """Bytes of a training checkpoint's tensors: the SAE's, Adam's two moments of every
    trained parameter, the weight average's copy of them (``ema_slots``), and the int64
    tokens-since-fired count of each latent."""
    return stored + (ADAM_STATE_SLOTS + ema_slots(decay)) * trained + 8 * n


def activation_footprint(config: dict[str, Any], split: str, d: int) -> dict[str, int]:
    """Windows, rows (tokens) and bytes of one site's shards of ``split`` (train or eval);
    see the module docstring. Fewer when the corpus runs out (the extraction says so)."""
    activations = config["activations"]
    kept = activations["context"] - activations["skip_positions"]
    windows = math.ceil(activations["train_tokens" if split == "train" else "eval_tokens"] / kept)
    rows = windows * kept
    value_bytes = rows * d * STORAGE_BYTES[activations["storage_dtype"]]
    id_bytes = 0 if config["synthetic"] else windows * activations["context"] * TOKEN_ID_BYTES  # generated rows have none
    return {"windows": windows, "tokens": rows, "activation_bytes": value_bytes, "token_id_bytes": id_bytes,
            "bytes": value_bytes + id_bytes}


def jobs_per_rule(config: dict[str, Any]) -> dict[str, int]:
    """How many jobs of each rule a full run (``snakemake`` with no targets) has."""
    cells = len(config["activations"]["sites"]) * len(sweep_cells(config))
    external = len(config["external"])
    jobs = {
        "fetch_model": 1 if config["model"]["pypi_gguf"] else 0,
        "prepare_corpus": 0 if config["synthetic"] else 1,
        "extraction_settings": 2,
        "extract_part": config["activations"]["extract_jobs"] + 1,  # training parts, one held-out part
        "extract_train_manifests": 1,
        "extract_eval_manifests": 1,
        "cell_settings": 2 * cells,
        "train_cell": cells,
        "evaluate_cell": cells,
        "external_settings": 2 * external,
        "import_external": external,
        "evaluate_external": external,
        **dict.fromkeys(("feature_settings", "feature_browser"), len(config["activations"]["sites"]) * len(feature_cells(config))),
    }
    jobs.update({rule: 1 for rule in SWEEP_RULES})
    return {rule: count for rule, count in jobs.items() if count}


def cell_budgets(config: dict[str, Any], d: int) -> list[dict[str, Any]]:
    """Per cell of every site: tokens, SAE and checkpoint bytes, memory, estimated hours and
    wall time asked for."""
    rows = []
    for site in config["activations"]["sites"]:
        for cell in sweep_cells(config):
            settings = train_settings(config, site, cell.name)
            stored, trained = tensor_bytes(cell.arch, cell.n_latents, d, cell.parameters)
            rows.append({
                "site": site,
                "cell": cell.name,
                "tokens": settings.tokens,
                "sae_bytes": stored,
                "checkpoint_bytes": checkpoint_bytes(stored, trained, cell.n_latents, settings.ema_decay),
                "mem_mb": train_mem_mb(settings, d, config["activations"]["shard_tokens"]),
                "eval_mem_mb": evaluate_mem_mb(config, d, cell.n_latents),
                "hours": train_hours(settings, d),
                "runtime_min": train_runtime_min(settings, d),
            })
    return rows


def plan(config: dict[str, Any]) -> dict[str, Any]:
    """Everything ``saesweep plan`` prints, as numbers (see ``format_plan``)."""
    d, d_source = model_width(config)
    cells = cell_budgets(config, d)
    jobs = jobs_per_rule(config)
    sites = {
        site: {split: activation_footprint(config, split, d) for split in ("train", "eval")}
        for site in config["activations"]["sites"]
    }
    evaluations = jobs["evaluate_cell"] + jobs.get("evaluate_external", 0)
    hours = {
        "train_cell": {"estimated": sum(c["hours"] for c in cells), "asked": sum(c["runtime_min"] for c in cells) / 60},
        "evaluate_cell": {"estimated": None, "asked": jobs["evaluate_cell"] * EVALUATE_RUNTIME_MIN / 60},
    }
    if "evaluate_external" in jobs:
        hours["evaluate_external"] = {"estimated": None, "asked": jobs["evaluate_external"] * EVALUATE_RUNTIME_MIN / 60}
    disk = sum(split["bytes"] for site in sites.values() for split in site.values()) + sum(c["sae_bytes"] for c in cells)
    return {
        "run": config["run"],
        "d": d,
        "d_source": d_source,
        "device": config["train"]["device"],
        "jobs": jobs,
        "sites": sites,
        "cells": cells,
        "hours": hours,
        "evaluations": evaluations,
        "disk_bytes": disk,
        "peak_checkpoint_bytes": sum(c["checkpoint_bytes"] for c in cells),
    }


def human_bytes(count: float) -> str:
    """1536 → ``1.5 KiB``; powers of 1024."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_plan(summary: dict[str, Any]) -> str:
    """The plan as text: jobs per rule, activations per site, one line per cell, hours, disk."""
    lines = [
        f"run {summary['run']}: d = {summary['d']} ({summary['d_source']}), train.device {summary['device']}",
        "",
        "jobs per rule",
        *(f"  {rule:<28}{count:>8}" for rule, count in summary["jobs"].items()),
        f"  {'total':<28}{sum(summary['jobs'].values()):>8}",
        "",
        "activations per site (shards on disk: values + int32 token ids)",
        f"  {'site':<10}{'split':<7}{'tokens':>14}{'values':>12}{'token ids':>12}",
    ]
    for site, splits in summary["sites"].items():
        for split, f in splits.items():
            lines.append(f"  {site:<10}{split:<7}{f['tokens']:>14,}{human_bytes(f['activation_bytes']):>12}"
                         f"{human_bytes(f['token_id_bytes']):>12}")
    lines += [
        "",
        "cells (mem_mb: a train_cell job's memory; eval mb: its evaluate_cell job's)",
        f"  {'site':<10}{'cell':<30}{'tokens':>14}{'SAE':>11}{'checkpoint':>12}{'mem_mb':>8}{'eval mb':>9}"
        f"{'est. h':>9}{'asked h':>9}",
    ]
    for c in summary["cells"]:
        lines.append(f"  {c['site']:<10}{c['cell']:<30}{c['tokens']:>14,}{human_bytes(c['sae_bytes']):>11}"
                     f"{human_bytes(c['checkpoint_bytes']):>12}{c['mem_mb']:>8}{c['eval_mem_mb']:>9}{c['hours']:>9.2f}"
                     f"{c['runtime_min'] / 60:>9.2f}")
    unit = "GPU-hours" if summary["device"] == "cuda" else "hours"
    lines += ["", f"{unit} per rule (asked = the runtime resource sent to the cluster, summed over jobs)"]
    for rule, h in summary["hours"].items():
        estimated = "-" if h["estimated"] is None else f"{h['estimated']:.2f}"
        lines.append(f"  {rule:<28}estimated {estimated:>9}   asked {h['asked']:>9.2f}")
    lines += [
        "",
        f"disk: {human_bytes(summary['disk_bytes'])} of activations and SAEs; "
        f"up to {human_bytes(summary['peak_checkpoint_bytes'])} more of checkpoints while cells train",
    ]
    return "\n".join(lines)
