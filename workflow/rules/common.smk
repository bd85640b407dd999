# Config validation, the sweep's cells, paths and input functions shared by every rule.
import json
import sys
from pathlib import Path

from saesweep.plan.cells import sweep_cells
from saesweep.plan.config import check_sites_against_model, validate_config
from saesweep.core.errors import UserError
from saesweep.plan import settings as job

try:
    validated = validate_config(config)
    model_config = Path(validated["model"]["id"], "config.json")
    if model_config.exists():
        # read the depth from the file: importing transformers would slow every job's start
        depth = json.loads(model_config.read_text()).get("num_hidden_layers")
        if depth is not None:
            check_sites_against_model(validated, depth)
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
            "dead_latents",
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
        *[
            f"{RUN}/scaling/figures/{name}.{ext}"
            for name in FIGURES
            for ext in ("png", "svg")
        ],
    ]


def model_input(wildcards):
    """The local model folder when a rule of this workflow makes it, else nothing."""
    return [config["model"]["id"]] if config["model"]["pypi_gguf"] else []


def all_manifests(split):
    """Manifest of every site's training (``train``) or held-out (``eval``) shards."""
    return [
        f"{job.activation_dir(config, site, split)}/manifest.json" for site in SITES
    ]


def extraction_parts(split):
    """The record of every extraction part job of a split (config key activations.extract_jobs)."""
    return job.extraction_settings(config, split)["part_files"]


def settings_json(wildcards):
    """The resolved settings of one cell's train or eval job, as JSON."""
    build = job.train_settings if wildcards.stage == "train" else job.eval_settings
    return json.dumps(build(config, wildcards.site, wildcards.cell), sort_keys=True)


def model_width():
    """Hidden size of the model when its config is on disk (for memory estimates), else 4096."""
    path = Path(config["model"]["id"], "config.json")
    return (
        json.loads(path.read_text()).get("hidden_size", 4096) if path.exists() else 4096
    )


def extract_mem_mb(wildcards):
    """Memory of an extraction part job: a fixed 3 GB for the interpreter and torch, 6 · d²
    kB for the model, and one shard (what streaming extraction holds): each site's rows in
    the storage dtype, plus a float64 copy of one site's rows for the shard's sums."""
    activations = config["activations"]
    storage_bytes = 2 if activations["storage_dtype"] == "float16" else 4
    shard_bytes = (
        activations["shard_tokens"] * model_width() * (len(SITES) * storage_bytes + 8)
    )
    return int(3000 + 6 * model_width() * model_width() / 1000 + shard_bytes / 1e6)


def train_processes():
    """Processes of one training job: train.distributed's data_parallel × latent_shards."""
    distributed = config["train"]["distributed"]
    return distributed["data_parallel"] * distributed["latent_shards"]


def train_threads(wildcards):
    """CPU threads of a training job: 2, or one per process of a distributed cell."""
    return max(2, train_processes())


def train_mem_mb(wildcards):
    """Memory of a training job, per process times the processes: its latents' parameters,
    gradients and Adam moments (4 · 2(n/S)d floats), its rows' pre-activations and
    selections (3 · (B/D) · (n/S) floats), shards read ahead, and a fixed 1.5 GB for the
    interpreter and torch (D, S: train.distributed; 1 × 1 for one process)."""
    settings = job.train_settings(config, wildcards.site, wildcards.cell)
    distributed = config["train"]["distributed"]
    n = settings["n_latents"] / distributed["latent_shards"]
    batch = settings["batch_size"] / distributed["data_parallel"]
    floats = 4 * 2 * n * model_width() + 3 * batch * n
    shard_bytes = 8 * config["activations"]["shard_tokens"] * model_width() * 2
    return int(train_processes() * (1500 + (4 * floats + shard_bytes) / 1e6))


def train_runtime(wildcards):
    """Minutes for a training job: a generous bound from tokens · n · d at 1 GFLOP/s·6."""
    settings = job.train_settings(config, wildcards.site, wildcards.cell)
    flops = 6 * settings["tokens"] * settings["n_latents"] * model_width()
    return int(10 + flops / 1e9 / 60)


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
    return json.dumps(build(config, wildcards.site, wildcards.name), sort_keys=True)


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
