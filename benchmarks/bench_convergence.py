"""Train a few cells of a config with ``train.budget.mode: converge`` on an existing run's
activations, and report what each took: tokens to convergence (or the cap), held-out NMSE at
the stop, training wall time; then the sum over the cells run.

    .venv/bin/python benchmarks/bench_convergence.py --config config/converge.yaml \\
        --activations results/quickstart/activations --out /tmp/converge-cells \\
        --cells topk-n256-k32-ax0-s0 topk-n1024-k32-ax0-s0 --threads 2

``--activations`` is the ``activations`` folder of a finished run whose extraction settings
(model, corpus, sites, context, tokens) equal the config's (checked: the folder's
``train_settings.json`` and ``eval_settings.json`` against the config's, paths aside), so no
extraction is repeated. Training only: the evaluation, the extraction and the fits are timed by
a workflow run (benchmarks/README.md). Writes nothing but under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from saesweep.core.errors import UserError
from saesweep.core.job_settings import to_json
from saesweep.plan.config import load_config
from saesweep.plan.settings import extraction_settings, train_settings
from saesweep.train.launch import train_cell

PATH_KEYS = {"corpus_file", "corpus_summary", "output_dirs", "part_files", "device"}
"""Extraction settings that name places (or the device), not what is extracted."""


def check_same_extraction(config: dict, folder: Path) -> None:
    """The run's extraction settings of both splits, paths aside, equal the config's."""
    for split in ("train", "eval"):
        recorded = json.loads((folder / f"{split}_settings.json").read_text())
        wanted = to_json(extraction_settings(config, split))
        differ = sorted(key for key in wanted.keys() - PATH_KEYS if wanted[key] != recorded.get(key))
        if differ:
            raise UserError(f"{folder}/{split}_settings.json: extracted with other {differ} than the config asks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--activations", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cells", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config)
    check_same_extraction(config, args.activations)
    rows = []
    for cell in args.cells:
        for site in config["activations"]["sites"]:
            settings = train_settings(config, site, cell)
            heldout = replace(settings.heldout, activations=str(args.activations / f"{site}-eval"))
            settings = replace(settings, activations=str(args.activations / site), heldout=heldout)
            folder = args.out / site / cell
            started = time.perf_counter()
            train_cell(settings, folder, args.threads)
            seconds = time.perf_counter() - started
            cfg = json.loads((folder / "cfg.json").read_text())
            log = pd.read_parquet(folder / "train_log.parquet")
            curve = log[log["heldout_nmse"].notna()]
            training = cfg["training"]
            rows.append({
                "site": site, "cell": cell, "cap": settings.tokens, "tokens": training["tokens"],
                "converged": training["converged"], "heldout_nmse": float(curve["heldout_nmse"].iloc[-1]),
                "heldout_points": len(curve), "train_s": round(training["wall_time_s"], 1), "job_s": round(seconds, 1),
            })
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{len(table)} cells: {table['tokens'].sum():,} tokens, {table['job_s'].sum():.0f} s of training jobs "
          f"({args.threads} threads), {int(table['converged'].sum())} converged, "
          f"{int((~table['converged'].astype(bool)).sum())} ended by the cap")


if __name__ == "__main__":
    main()
