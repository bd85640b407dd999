# Config validation, the sweep's cells, paths and input functions shared by every rule.
import json
import sys
from pathlib import Path

from saesweep.core.errors import UserError
from saesweep.core.job_settings import DistributedSettings, to_json
from saesweep.plan import budget
from saesweep.plan import settings as job
from saesweep.plan.cells import sweep_cells
from saesweep.plan.config import check_against_model_folder, validate_config

try:
    validated = validate_config(config)
    check_against_model_folder(validated)
except UserError as error:
    sys.exit(f"saesweep: invalid config: {error}")
config.clear()
config.update(validated)

RUN = job.run_dir(config)
SITES = config["activations"]["sites"]
CELLS = [cell.name for cell in sweep_cells(config)]
EXTERNAL = [(entry["site"], entry["name"]) for entry in config["external"]]
FIT_METRICS = config["scaling"]["metrics"]
# Figure name → the caption file (workflow/report/{view}.rst) that describes it.
FIGURES = (
    {
        f"{metric}_{view}": view
        for metric in FIT_METRICS
        for view in ("vs_n", "vs_k", "joint")
    }
    | {
        view: view
        for view in (
            "dead_fraction",
            "frontier",
            "sparsity_frontier",
            "k_transfer",
            "interpretability",
            "compute_frontier",
            "training_curves",
            "training_curves_l0",
            "dead_latents",
            "convergence",
            "dense_fraction",
            "latent_density",
        )
    }
    | {
        "k_transfer_delta_lm_loss": "k_transfer",
        "sparsity_frontier_delta_lm_loss": "sparsity_frontier",
    }
)


wildcard_constraints:
    site=r"(resid|mlp|attn)[0-9]+",
    cell=r"[a-z0-9]+-n[0-9]+(-[a-z]+[0-9][0-9.e+-]*)+-s[0-9]+",
    stage=r"train|eval",
    part=r"[0-9]+",
    name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    external_stage=r"import|eval",


def final_targets():
    """The sweep's table, fits, figures and the report's tables."""
    return [
        f"{RUN}/scaling/cells.parquet",
        f"{RUN}/scaling/fits.json",
        f"{RUN}/scaling/fits.csv",
        f"{RUN}/report/fits.html",
        f"{RUN}/run_config.yaml",
        f"{RUN}/report/run_config.html",
        f"{RUN}/scaling/architectures.csv",
        f"{RUN}/report/architectures.html",
        f"{RUN}/report/explorer.html",
        *feature_browsers(),
        *[
            f"{RUN}/scaling/figures/{name}.{ext}"
            for name in FIGURES
            for ext in ("png", "svg")
        ],
    ]


def feature_browsers():
    """The feature browser of every cell of features.cells, on every site."""
    return [
        f"{job.cell_dir(config, site, cell)}/features/index.html"
        for site in SITES
        for cell in job.feature_cells(config)
    ]


# The local model folder when fetch_model makes it, else nothing (an input of every job
# that loads the LM).
MODEL_INPUT = [config["model"]["id"]] if config["model"]["pypi_gguf"] else []


def all_manifests(split):
    """Manifest of every site's training (``train``) or held-out (``eval``) shards."""
    return [
        f"{job.activation_dir(config, site, split)}/manifest.json" for site in SITES
    ]


def extraction_parts(split):
    """The record of every extraction part job of a split (config key activations.extract_jobs)."""
    return job.extraction_settings(config, split).part_files


def settings_json(wildcards):
    """The resolved settings of one cell's train or eval job, as JSON."""
    build = job.train_settings if wildcards.stage == "train" else job.eval_settings
    return json.dumps(
        to_json(build(config, wildcards.site, wildcards.cell)), sort_keys=True
    )


def width():
    """The model's hidden size d for resource requests (read when asked: a model folder
    that a rule makes appears after the workflow has started)."""
    return budget.model_width(config)[0]


def extract_mem_mb(wildcards):
    """Memory of an extraction part job (saesweep.plan.budget.extract_mem_mb)."""
    return budget.extract_mem_mb(width(), config["activations"])


def train_threads(wildcards):
    """CPU threads of a training job: 2, or one per process of a distributed cell (the same
    for every cell: read from train.distributed, not from each cell's settings)."""
    replicas, shards = budget.train_processes(
        DistributedSettings(**config["train"]["distributed"])
    )
    return max(2, replicas * shards)


def train_mem_mb(wildcards):
    """Memory of a cell's training job (saesweep.plan.budget.train_mem_mb)."""
    settings = job.train_settings(config, wildcards.site, wildcards.cell)
    return budget.train_mem_mb(settings, width(), config["activations"]["shard_tokens"])


def evaluate_mem_mb(wildcards):
    """Memory of a cell's evaluation job (saesweep.plan.budget.evaluate_mem_mb)."""
    return budget.evaluate_mem_mb(config, width(), budget.cell_latents(wildcards.cell))


def external_evaluate_mem_mb(wildcards, input):
    """Memory of an external SAE's evaluation job (saesweep.plan.budget.evaluate_mem_mb),
    n from its cfg.json (before the import has run: the sweep's largest n)."""
    cfg = Path(input.cfg)
    if cfg.exists():
        n = json.loads(cfg.read_text())["n_latents"]
    else:
        n = max(cell.n_latents for cell in sweep_cells(config))
    return budget.evaluate_mem_mb(config, width(), n)


def train_runtime(wildcards):
    """Minutes asked for by a cell's training job (saesweep.plan.budget.train_runtime_min)."""
    settings = job.train_settings(config, wildcards.site, wildcards.cell)
    return budget.train_runtime_min(settings, width())


def external_metrics():
    """The metrics of every external SAE (config key external)."""
    return [
        f"{job.external_dir(config, site, name)}/metrics.json"
        for site, name in EXTERNAL
    ]


def external_settings_json(wildcards):
    """The resolved settings of one external SAE's import or eval job, as JSON."""
    build = (
        job.import_settings
        if wildcards.external_stage == "import"
        else job.external_eval_settings
    )
    return json.dumps(
        to_json(build(config, wildcards.site, wildcards.name)), sort_keys=True
    )


def external_files(wildcards):
    """The files of an external SAE's folder on disk (none for a hub source), so that a
    changed file reruns its import; what is missing the import itself reports."""
    entry = job.external_entry(config, wildcards.site, wildcards.name)
    folder = Path(entry.get("path", ""))
    if "path" not in entry or not folder.is_dir():
        return []
    return sorted(
        str(p) for p in folder.iterdir() if p.suffix in (".json", ".safetensors")
    )
