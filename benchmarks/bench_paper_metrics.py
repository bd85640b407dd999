"""CPU time of the paper's metrics (refinement, ablation sparsity with T = 16, N2G) on one
real cell of a finished sweep, each timed alone with one thread (``time.process_time``), so
that the number does not depend on the machine's load.

    .venv/bin/python benchmarks/bench_paper_metrics.py --run-dir /path/to/sweep \\
        --cell results/quickstart/cells/resid8/topk-n4096-k128-ax0-s0

The cell's ``eval_settings.json`` is read (``ablation_latents`` of an older settings file is
taken as the per-token cap), with ``--ablation-tokens``, ``--ablation-latents`` and
``--refine-tokens`` as the default sweep's config sets them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from saesweep.core.job_settings import EvalSettings, ModelSettings
from saesweep.evaluation.ablation import ablation_metrics
from saesweep.evaluation.analysis import ColumnGather, count_firing, encoded_chunks, n2g_metrics, sample_live_latents
from saesweep.evaluation.evaluate import load_inputs
from saesweep.evaluation.n2g import n2g_pad
from saesweep.evaluation.refine import RefinementAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the sweep's working directory")
    parser.add_argument("--cell", type=Path, required=True, help="the cell folder, relative to --run-dir")
    parser.add_argument("--ablation-tokens", type=int, default=2)
    parser.add_argument("--ablation-latents", type=int, default=8)
    parser.add_argument("--refine-tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(args.run_dir)
    raw = json.loads((args.cell / "eval_settings.json").read_text())
    raw.pop("ablation_latents", None)
    raw.update(ablation_tokens=args.ablation_tokens, ablation_latents=args.ablation_latents, refine_tokens=args.refine_tokens)
    settings = EvalSettings(**{**raw, "model": ModelSettings(**raw["model"])})
    inputs = load_inputs(settings, args.cell, torch.device("cpu"))
    sae = inputs.sae
    timings: dict[str, float] = {}

    started = time.process_time()
    refined = RefinementAccumulator(settings.refine_tokens)
    with torch.no_grad():
        for start in range(0, len(inputs.activations), settings.batch_size):
            x = sae.normalise(inputs.activations[start : start + settings.batch_size])
            refined.update(sae, x, sae.encode(x))
    timings["refinement"] = time.process_time() - started

    skip = inputs.store.manifest["skip_positions"]
    started = time.process_time()
    ablation = ablation_metrics(sae, inputs.lm, inputs.cfg["site"], inputs.windows[: settings.ablation_windows], skip,
                                settings.ablation_tokens, settings.lm_batch_size, settings.seed, settings.ablation_latents)
    timings["ablation"] = time.process_time() - started

    windows = inputs.windows[: settings.analysis_windows, skip:]
    kept = inputs.store.head(windows.numel(), torch.device("cpu"))
    counts = torch.zeros(sae.n, dtype=torch.int64)
    for _, _, codes in encoded_chunks(sae, kept, settings.batch_size):
        count_firing(counts, codes, len(kept))
    explained = sample_live_latents(counts, settings.explain_latents, settings.seed)
    gather = ColumnGather(explained, sae.n, len(kept))
    for _, _, codes in encoded_chunks(sae, kept, settings.batch_size):
        gather.update(codes)
    started = time.process_time()
    n2g = n2g_metrics(sae, inputs.lm, inputs.cfg["site"], explained, gather.columns(), windows,
                      n2g_pad(inputs.tokenizer), settings.batch_size, settings.seed)
    timings["n2g"] = time.process_time() - started
    print(json.dumps({"cell": str(args.cell), "cpu_s": {k: round(v, 2) for k, v in timings.items()},
                      "refinement": refined.result(), "ablation": ablation, "n2g": n2g}, indent=1))


if __name__ == "__main__":
    main()
