"""Largest difference per metric between two versions of the evaluate stage on real cells.

Runs a small real sweep with this checkout's workflow (``snakemake --cores 2``: the tiny
Llama of ``bench_extract_memory`` (d = 32), generated text, TopK at n ∈ {64, 256} and
k ∈ {4, 16}), then evaluates every trained cell again with another checkout's code
(``--other-src``, e.g. main's ``src``, on PYTHONPATH) from the same settings files, and
prints max |Δ| over the cells for every numeric metric (nested ones flattened with dots;
timings and provenance left out). ``--chunk`` is ``evaluate.batch_size``, small so that the
analysis tokens (``--analysis-windows`` × 31) span many chunks.

    .venv/bin/python benchmarks/compare_eval.py --other-src /path/to/main/src
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench_extract_memory import build_model, make_text

REPO = Path(__file__).resolve().parents[1]
SKIPPED = ("eval_wall_time_s", "provenance")
"""Metrics that differ between any two runs (time) or name the code (provenance)."""


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as {dotted.name: value}."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key in SKIPPED:
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            out.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-src", required=True, help="the other checkout's src folder")
    parser.add_argument("--chunk", type=int, default=100, help="evaluate.batch_size")
    parser.add_argument("--analysis-windows", type=int, default=96)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="compare-eval-"))
    try:
        corpus = scratch / "corpus"
        corpus.mkdir()
        for index in range(12):
            (corpus / f"doc{index:02d}.txt").write_text(make_text(index, 110))
        (scratch / "sample.txt").write_text("".join(make_text(seed, 110) for seed in range(12)))
        build_model(scratch / "model", scratch / "sample.txt")
        config = {
            "run": "compare",
            "model": {"id": str(scratch / "model"), "dtype": "float32"},
            "corpus": {"name": "compare", "source": "files", "include": [f"{corpus}/*.txt"], "eval_fraction": 0.25},
            "activations": {"sites": ["resid2"], "context": 32, "batch_size": 8, "train_tokens": 6000,
                            "eval_tokens": 4000, "shard_tokens": 1500, "storage_dtype": "float32"},
            "sweep": {"n_latents": [64, 256], "k": [4, 16], "seeds": [0]},
            "train": {"tokens": {"base": 12000, "n_ref": 64, "n_exponent": 0.0}, "batch_size": 256,
                      "lr": {"base": 4e-3, "n_ref": 64}, "dead": {"min_tokens": 2000, "factor": 10},
                      "geometric_median_sample": 512, "device": "cpu"},
            "evaluate": {"tokens": 3000, "downstream_windows": 16, "analysis_windows": args.analysis_windows,
                         "explain_latents": 16, "ablation_latents": 4, "ablation_windows": 4,
                         "probe_candidates": 16, "batch_size": args.chunk},
            "scaling": {"metrics": ["nmse", "delta_lm_loss"], "bootstrap": 20},
        }
        (scratch / "config.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                     str(scratch), "--configfile", str(scratch / "config.yaml"), "--cores", "2"]
        with open(scratch / "snakemake.log", "w") as log:
            finished = subprocess.run([*snakemake, "results/compare/scaling/cells.parquet"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        if finished.returncode != 0:
            sys.exit(f"the sweep failed:\n{(scratch / 'snakemake.log').read_text()[-3000:]}")
        cells = sorted((scratch / "results/compare/cells/resid2").iterdir())
        other_env = {**env, "PYTHONPATH": args.other_src}
        code = "import sys; from saesweep.cli import main; sys.exit(main(sys.argv[1:]))"
        largest: dict[str, float] = {}
        for cell in cells:
            subprocess.run([sys.executable, "-c", code, "evaluate", "--settings", str(cell / "eval_settings.json"),
                            "--cell", str(cell), "--out", str(scratch / f"{cell.name}.json")],
                           check=True, env=other_env, cwd=scratch)
            ours = flatten(json.loads((cell / "metrics.json").read_text()))
            theirs = flatten(json.loads((scratch / f"{cell.name}.json").read_text()))
            if set(ours) != set(theirs):
                sys.exit(f"{cell.name}: metrics differ in name: {sorted(set(ours) ^ set(theirs))}")
            for name in ours:
                a, b = ours[name], theirs[name]
                delta = 0.0 if (math.isnan(a) and math.isnan(b)) or a == b else abs(a - b)
                largest[name] = max(largest.get(name, 0.0), delta)
        print(f"{len(cells)} cells ({', '.join(c.name for c in cells)}), chunk {args.chunk}, "
              f"T = {args.analysis_windows * 31} analysis tokens")
        identical = sum(delta == 0 for delta in largest.values())
        print(f"{len(largest)} numbers per cell (nested ones included), {identical} identical in every cell")
        print(f"{'metric':<44}{'max |Δ|':>12}")
        for name, delta in largest.items():
            if "." not in name or delta > 0:  # nested entries only where they differ
                print(f"{name:<44}{delta:>12.3g}")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
