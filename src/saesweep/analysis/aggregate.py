"""One table of the sweep: a row per cell with every metric, the training facts and the
provenance (``cells.parquet`` and a CSV beside it), and the cells' training logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from saesweep.analysis.window_bootstrap import read_windows
from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json

KEY_COLUMNS = ["site", "arch", "setting", "n_latents", "seed"]


TRAINING_COLUMNS = {
    "tokens": "tokens",
    "steps": "steps",
    "train_wall_time_s": "wall_time_s",
    "train_seconds": "train_seconds",
    "train_flops": "flops",
    "train_tokens_per_s": "tokens_per_s",
    "train_final_dead_fraction": "final_dead_fraction",
    "train_final_nmse": "final_nmse",
    "epochs": "epochs",
    "train_budget": "budget",
    "converged": "converged",
    "tokens_to_converge": "tokens_to_converge",
}
"""Column → key of ``cfg.json``'s ``training`` block."""


def cell_row(cell_folder: Path, metrics_path: Path) -> dict[str, Any]:
    """The scalar metrics of ``metrics.json`` (nested dicts flattened with ``_``, lists
    left out but the latent-density histogram's counts), the training facts of ``cfg.json`` and the provenance; ``curve`` is the cell's
    setting without its architecture (``k32``, ``l0.3``: the cells of one line over n) and
    ``sparsity`` the value of its architecture's sparsity knob; ``eval_protocol_hash`` says
    which evaluations are comparable (``evaluation.comparability``) and ``train_*`` / ``eval_*``
    hardware columns what each job ran on (``core.provenance.hardware``). An external SAE
    (``interop.stages``) has its name as setting and curve, the source as ``external_source``,
    and no training facts, training hardware, sparsity knob (unless it reported k) or seed."""
    metrics = read_json(metrics_path, "cell metrics")
    cfg = read_json(cell_folder / "cfg.json", "SAE config")
    row: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(f"{prefix}_{key}" if prefix else key, inner)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            row[prefix] = value

    flatten("", {key: value for key, value in metrics.items() if key not in {"firing_histogram", "provenance"}})
    external = cfg.get("external")
    training = cfg.get("training", {})
    row.update({
        "curve": external["name"] if external else metrics["setting"].split("-", 1)[1],
        "sparsity": metrics.get(metrics["sparsity_parameter"]),
        "d": cfg["d"],
        **{column: training.get(key) for column, key in TRAINING_COLUMNS.items()},
        "model": cfg["model"],
        "revision": cfg.get("revision"),
        "corpus_fingerprint": cfg.get("corpus_fingerprint"),
        "package_version": cfg["provenance"]["package_version"],
        "git_commit": cfg["provenance"]["git_commit"],
        "train_settings_hash": None if external else cfg["provenance"]["settings_hash"],
        "eval_settings_hash": metrics["provenance"]["settings_hash"],
        "eval_protocol_hash": metrics["provenance"].get("protocol_hash"),
    })
    for stage, block in (("train", cfg["provenance"]), ("eval", metrics["provenance"])):
        row.update({f"{stage}_{key}": value for key, value in block.get("hardware", {}).items()})
    if external:
        row["external_source"] = json.dumps(external["source"], sort_keys=True)
    row["firing_histogram_counts"] = metrics.get("firing_histogram", {}).get("counts")  # fixed bins: evaluation.density
    return row


def aggregate(run: str, metrics_paths: list[Path], table: Path, logs: Path, windows: Path) -> pd.DataFrame:
    """Write the cells table (parquet + CSV), the concatenated training logs and the cells'
    per-window sums of the validation and test parts (``window_bootstrap.read_windows``), which
    the architecture comparison resamples."""
    rows, log_frames = [], []
    for path in metrics_paths:
        folder = Path(path).parent
        row = {"run": run, **cell_row(folder, Path(path))}
        rows.append(row)
        if "external_source" in row:
            continue  # an external SAE was not trained here: no training log
        log = pd.read_parquet(folder / "train_log.parquet")
        log_frames.append(log.assign(**{key: row[key] for key in ("run", *KEY_COLUMNS, "curve", "sparsity", "d")}))
    if not rows:
        raise UserError("no cell to aggregate")
    cells = pd.DataFrame(rows).sort_values(KEY_COLUMNS, ignore_index=True)
    ordered = ["run", *KEY_COLUMNS] + [c for c in cells.columns if c not in {"run", *KEY_COLUMNS}]
    cells = cells[ordered]
    write_table(cells, Path(table))
    with atomic_path(Path(table).with_suffix(".csv")) as temporary:
        cells.to_csv(temporary, index=False)
    write_table(pd.concat(log_frames, ignore_index=True), Path(logs))
    write_table(read_windows([Path(path) for path in metrics_paths]), Path(windows))
    return cells


def with_curves(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with the ``curve`` and ``sparsity`` columns, derived from k (curve ``k32``)
    for a table written before architectures other than TopK existed (e.g. merged with
    ``saesweep merge``), where every cell is TopK."""
    if "curve" in cells.columns:
        return cells
    return cells.assign(curve="k" + cells["k"].astype("int64").astype(str), sparsity=cells["k"])


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """A parquet file, atomically."""
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)
