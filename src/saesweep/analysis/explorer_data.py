"""What the results explorer shows, read from a sweep's files and cut down to plain lists
(``analysis.explorer`` writes it into the page as JSON).

Inputs: ``cells.parquet`` (one row per cell), ``train_logs.parquet`` (the training curves),
``fits.json`` (``analysis.scaling``) and ``architectures.csv`` (``analysis.compare``). A file
that is missing or cannot be read is a ``UserError`` naming it, raised before anything is
written.

- Points: one per cell, named ``{arch}-n{n}-{curve}-s{seed}`` (its folder's name; an external
  SAE by its name), with its training-settings hash (the evaluation's for an external SAE) and
  git commit, and its value on each x-axis: n, k, measured L0, training tokens and, where the
  training logs have them, the cumulative ``flops`` and ``train_seconds`` at the cell's last
  logged step (absent columns: no such axis).
- Metrics: the numeric columns of the cells table that vary within some (arch, setting)
  group (a setting's parameters and run-wide constants do not), minus the axes' own
  columns and the ``*_se`` / ``*_count`` companions; ``{metric}_se``, where present, is the
  metric's error bar. The fitted metrics come first.
- Laws: every 1-D law of fits.json (L(n) per curve, L(k) per n), its line
  L̂(x) = ``laws.predict`` on its band's grid and the band's 95 % limits; ``drawn`` marks the
  one of each pure/with-floor pair the figures draw (``law_plots._law_to_draw``), or the pure
  law where neither was fitted (so that its reason is shown). A law not fitted at all
  (``skipped``) has no line, only its reason.
- Training curves: each cell's held-out NMSE during training (the logs' ``heldout_nmse``)
  over tokens and, where logged, FLOPs and wall-clock; drawn with the cells' ``nmse``.
- Table: architectures.csv as it is (any columns, one list per row).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saesweep.analysis.aggregate import with_curves
from saesweep.analysis.law_plots import _law_to_draw
from saesweep.analysis.laws import predict
from saesweep.core.errors import UserError
from saesweep.core.files import read_json

AXES = {
    "n": "dictionary size n",
    "k": "k (active latents asked for)",
    "l0": "L0 (measured active latents)",
    "tokens": "training tokens",
    "flops": "training FLOPs (counted by the trainer)",
    "train_seconds": "training wall-clock (s)",
}
"""x-axis key → its label; ``flops`` and ``train_seconds`` come from the training logs."""
LOGGED_AXES = ("flops", "train_seconds")
CURVE_AXES = ("tokens", *LOGGED_AXES)
"""The axes over which the training curves (held-out NMSE during training) can be drawn."""
CURVE_METRIC = "nmse"
"""The metric of the cells whose plot the training curves (the logs' ``heldout_nmse``) join."""
NOT_METRICS = {"n_latents", "seed", "d", "k", "sparsity", "tokens", "steps", "epochs"}
DIGITS = 6
"""Significant digits kept for every number in the page (its size, not its precision, is the point)."""


def read_table(path: Path, what: str, reader: Any = pd.read_parquet) -> pd.DataFrame:
    """A table file read whole; missing or unreadable is a UserError naming it."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return reader(path)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise UserError(f"{what} {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0]})") from None


def short(value: Any) -> Any:
    """A JSON-ready value: numbers to ``DIGITS`` significant digits, non-finite and missing to None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.{DIGITS}g}")
    if pd.isna(value):
        return None
    return str(value)


def column(values: Any) -> list:
    """``short`` over a sequence."""
    return [short(v) for v in values]


def metric_columns(cells: pd.DataFrame, fitted: list[str]) -> list[str]:
    """The metrics a person can plot (see the module docstring): fitted ones first."""
    numeric = [c for c in cells.columns if pd.api.types.is_numeric_dtype(cells[c]) and not pd.api.types.is_bool_dtype(cells[c])]
    candidates = [c for c in numeric if c not in NOT_METRICS and not c.endswith(("_se", "_count")) and cells[c].notna().any()]
    varies = cells.groupby(["arch", "setting"])[candidates].nunique().max() if candidates else pd.Series(dtype=int)
    chosen = sorted(c for c in candidates if varies.get(c, 0) > 1)
    return [m for m in fitted if m in chosen] + [m for m in chosen if m not in fitted]


def cell_names(cells: pd.DataFrame) -> list[str]:
    """Each row's cell name: its folder's name, or an external SAE's own name."""
    external = cells["external_source"].notna() if "external_source" in cells else pd.Series(False, index=cells.index)
    return [
        curve if is_external else f"{arch}-n{int(n)}-{curve}-s{int(seed)}"
        for arch, n, curve, seed, is_external in zip(cells["arch"], cells["n_latents"], cells["curve"], cells["seed"].fillna(0), external)
    ]


def logged_axes(cells: pd.DataFrame, logs: pd.DataFrame) -> dict[str, list]:
    """The ``LOGGED_AXES`` columns present in the logs, each cell's value at its last logged
    step (None for a cell without a log, e.g. an external SAE)."""
    keys = ["site", "arch", "setting", "n_latents", "seed"]
    present = [c for c in LOGGED_AXES if c in logs.columns]
    if not present:
        return {}
    last = logs.sort_values("tokens").groupby(keys)[present].last().reset_index()
    joined = cells[keys].merge(last, on=keys, how="left")
    return {c: column(joined[c]) for c in present}


def training_curves(cells: pd.DataFrame, logs: pd.DataFrame, axes: list[str]) -> dict:
    """Each cell's held-out NMSE during training (the logs' ``heldout_nmse`` rows): the cell's
    row index in ``cells``, and per curve its values on each of ``axes`` (those the logs have)
    and of ``CURVE_METRIC``."""
    keys = ["site", "arch", "setting", "n_latents", "seed"]
    shown = [a for a in axes if a in logs.columns]
    if "heldout_nmse" not in logs.columns or not shown:
        return {"cell": [], "x": {a: [] for a in shown}, "y": []}
    rows = logs[logs["heldout_nmse"].notna()].sort_values("tokens")
    index = {key: i for i, key in enumerate(cells[keys].itertuples(index=False, name=None))}
    out: dict = {"cell": [], "x": {a: [] for a in shown}, "y": []}
    for key, curve in rows.groupby(keys, sort=False):
        if key in index:
            out["cell"].append(index[key])
            out["y"].append(column(curve["heldout_nmse"]))
            for a in shown:
                out["x"][a].append(column(curve[a]))
    return out


def law_record(site: str, arch: str, metric: str, x: str, at: str, form: str, entry: dict, drawn: bool) -> dict:
    """One 1-D law as the page draws it: its identity, status, formula, parameters and, when
    fitted, its line and band on the band's grid."""
    record = {
        "site": site, "arch": arch, "metric": metric, "x": x, "at": at, "form": form, "drawn": drawn,
        "law": entry["law"], "status": entry["status"], "reason": entry.get("reason", ""), "formula": entry["formula"],
    }
    if "params" in entry and entry.get("band"):
        grid = np.asarray(entry["band"]["x"], dtype=float)
        record["params"] = {name: short(value) for name, value in entry["params"].items()}
        record["grid"] = column(grid)
        record["line"] = column(predict(entry, **{x: grid}))
        record["lo"] = column(entry["band"]["lo"])
        record["hi"] = column(entry["band"]["hi"])
    return record


def law_records(fits: dict) -> list[dict]:
    """Every 1-D law (pure and with floor) of every group, metric, curve (laws in n) and n (laws in k)."""
    records = []
    for group in fits["groups"]:
        for metric, fitted in group["metrics"].items():
            if fitted["status"] != "ok":
                continue
            for section, x in (("vs_n", "n"), ("vs_k", "k")):
                for at, laws in fitted[section].items():
                    drawn = _law_to_draw(laws)
                    for form in ("power", "floor"):
                        entry = laws[form]
                        shown = entry is drawn if drawn is not None else form == "power"
                        records.append(law_record(group["site"], group["arch"], metric, x, at, form, entry, shown))
    return records


def optional(cells: pd.DataFrame, name: str) -> list:
    """A column of the cells table, ``short``-ened; all None where the table lacks it."""
    return column(cells[name]) if name in cells.columns else [None] * len(cells)


def read_cells(path: Path) -> pd.DataFrame:
    """The cells table with its ``curve`` column (``aggregate.with_curves``), checked for the
    columns the page needs."""
    cells = read_table(path, "cells table")
    missing = [c for c in ("site", "arch", "setting", "n_latents", "seed") if c not in cells.columns]
    if "curve" not in cells.columns and "k" not in cells.columns:
        missing.append("curve")
    if missing:
        raise UserError(f"cells table {path} lacks the column(s) {missing}")
    return with_curves(cells).reset_index(drop=True)


def explorer_data(cells_path: Path, logs_path: Path, fits_path: Path, table_path: Path) -> dict:
    """Everything the page shows (see the module docstring), as JSON-ready lists."""
    cells = read_cells(cells_path)
    logs = read_table(logs_path, "training logs")
    fits = read_json(fits_path, "fits file")
    table = read_table(table_path, "architecture comparison", pd.read_csv)
    if not isinstance(fits, dict) or "groups" not in fits:
        raise UserError(f"fits file {fits_path} has no 'groups': not a fits.json of saesweep fit")
    metrics = metric_columns(cells, list(fits.get("metrics", [])))
    hashes = [train or evaluation for train, evaluation in zip(optional(cells, "train_settings_hash"), optional(cells, "eval_settings_hash"))]
    x = {"n": optional(cells, "n_latents"), "k": optional(cells, "k"), "l0": optional(cells, "l0"), "tokens": optional(cells, "tokens")}
    x.update(logged_axes(cells, logs))
    return {
        "run": optional(cells, "run")[0] if len(cells) else "",
        "axes": {key: label for key, label in AXES.items() if key in x and any(v is not None for v in x[key])},
        "metrics": metrics,
        "cells": {
            "name": cell_names(cells), "site": column(cells["site"]), "arch": column(cells["arch"]),
            "curve": column(cells["curve"]), "n": column(cells["n_latents"]), "hash": hashes, "commit": optional(cells, "git_commit"),
            "x": x,
            "y": {m: column(cells[m]) for m in metrics},
            "se": {m: column(cells[f"{m}_se"]) for m in metrics if f"{m}_se" in cells},
        },
        "laws": law_records(fits),
        "curves": training_curves(cells, logs, list(CURVE_AXES)),
        "curve_metric": CURVE_METRIC,
        "table": {"columns": [str(c) for c in table.columns], "rows": [column(row) for row in table.itertuples(index=False)]},
    }


def to_script_json(data: dict) -> str:
    """``data`` as JSON safe inside a ``<script>`` element (no ``</`` sequence)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
