"""How fast Snakemake builds saesweep's DAG, beside bare Snakemake on a DAG of the same shape.

For each size (cells of one site), the benchmark writes

* ``ours/config.yaml``: the default sweep (config/config.yaml) with its grid replaced by
  n_latents (10 values) × {topk, batchtopk} × k (5 values each) × seeds, so 100 cells per seed;
* ``bare/Snakefile``: the same rules with the same names, wildcards, file fan-in and fan-out
  and job counts, whose jobs would only ``touch`` their outputs: no config validation, no
  input functions, no resource functions, the cell names as a literal list.

It checks that both dry runs list the same jobs per rule (``saesweep.plan.budget.jobs_per_rule``),
then times, interleaved over ``--repeats`` rounds (median; absolute times move with the load):

* ``dry run``: ``snakemake -n --quiet`` of the whole DAG;
* ``parse``: ``snakemake --list-rules``, i.e. reading the Snakefile (what every SLURM job
  repeats before it runs its one job);
* ``one cell``: ``snakemake -n`` of one cell's weights (parse plus a small DAG).

    .venv/bin/python benchmarks/bench_dag.py                    # 1,000 and 10,000 cells
    .venv/bin/python benchmarks/bench_dag.py --seeds 10 --repeats 5
    PYTHONPATH=OLD/src .venv/bin/python benchmarks/bench_dag.py --workflow OLD   # an older checkout
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saesweep.plan.budget import jobs_per_rule  # noqa: E402
from saesweep.plan.config import validate_config  # noqa: E402

N_LATENTS = [1024 * 2**i for i in range(10)]
K = [8, 16, 32, 64, 128]


def sweep_config(seeds: int) -> dict:
    """The default sweep with a grid of 100 cells per seed."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["run"] = "bench"
    config["sweep"] = {"n_latents": N_LATENTS, "seeds": list(range(seeds)), "archs": {"topk": {"k": K}, "batchtopk": {"k": K}}}
    return config


BARE = '''\
SITES = {sites!r}
CELLS = {cells!r}
FIGURES = {figures!r}
RUN = "results/bench"


wildcard_constraints:
    site=r"(resid|mlp|attn)[0-9]+",
    cell=r"[a-z0-9]+-n[0-9]+(-[a-z]+[0-9][0-9.e+-]*)+-s[0-9]+",
    stage=r"train|eval",


rule all:
    default_target: True
    input:
        f"{{RUN}}/scaling/cells.parquet", f"{{RUN}}/scaling/fits.json", f"{{RUN}}/scaling/fits.csv",
        f"{{RUN}}/report/fits.html", f"{{RUN}}/run_config.yaml", f"{{RUN}}/report/run_config.html",
        f"{{RUN}}/scaling/architectures.csv", f"{{RUN}}/report/architectures.html",
        [f"{{RUN}}/scaling/figures/{{name}}.{{ext}}" for name in FIGURES for ext in ("png", "svg")],


rule fetch_model:
    output: directory("resources/models/model")
    shell: "mkdir -p {{output}}"


rule prepare_corpus:
    output: train="resources/corpus/c/train.jsonl", eval="resources/corpus/c/eval.jsonl", summary="resources/corpus/c/corpus.json"
    shell: "touch {{output}}"


rule extraction_settings:
    output: f"{{RUN}}/activations/{{{{stage}}}}_settings.json"
    shell: "touch {{output}}"


rule extract_part:
    input: "resources/models/model", rules.prepare_corpus.output, f"{{RUN}}/activations/{{{{stage}}}}_settings.json"
    output: f"{{RUN}}/activations/{{{{stage}}}}-parts/part-{{{{part}}}}.json"
    shell: "touch {{output}}"


for stage in ("train", "eval"):
    rule:
        name: f"extract_{{stage}}_manifests"
        input: parts=f"{{RUN}}/activations/{{stage}}-parts/part-0000.json", settings=f"{{RUN}}/activations/{{stage}}_settings.json"
        output: [f"{{RUN}}/activations/{{site}}{{'' if stage == 'train' else '-eval'}}/manifest.json" for site in SITES]
        shell: "touch {{output}}"


rule cell_settings:
    output: f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/{{{{stage}}}}_settings.json"
    shell: "touch {{output}}"


rule train_cell:
    input:
        settings=f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/train_settings.json",
        activations=f"{{RUN}}/activations/{{{{site}}}}/manifest.json",
        heldout=f"{{RUN}}/activations/{{{{site}}}}-eval/manifest.json",
    output:
        weights=f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/sae.safetensors",
        cfg=f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/cfg.json",
        train_log=f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/train_log.parquet",
    shell: "touch {{output}}"


rule evaluate_cell:
    input:
        "resources/models/model",
        settings=f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/eval_settings.json",
        weights=rules.train_cell.output.weights,
        cfg=rules.train_cell.output.cfg,
        activations=f"{{RUN}}/activations/{{{{site}}}}-eval/manifest.json",
    output: f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/metrics.json"
    shell: "touch {{output}}"


rule aggregate:
    input: expand(f"{{RUN}}/cells/{{{{site}}}}/{{{{cell}}}}/metrics.json", site=SITES, cell=CELLS)
    output: table=f"{{RUN}}/scaling/cells.parquet", csv=f"{{RUN}}/scaling/cells.csv", logs=f"{{RUN}}/scaling/train_logs.parquet"
    shell: "touch {{output}}"


rule fit_laws:
    input: rules.aggregate.output.table, rules.aggregate.output.logs
    output: f"{{RUN}}/scaling/fits.json"
    shell: "touch {{output}}"


rule plot_figures:
    input: rules.aggregate.output.table, rules.aggregate.output.logs, rules.fit_laws.output
    output: [f"{{RUN}}/scaling/figures/{{name}}.{{ext}}" for name in FIGURES for ext in ("png", "svg")]
    shell: "touch {{output}}"


rule report_tables:
    input: rules.fit_laws.output
    output: f"{{RUN}}/scaling/fits.csv", f"{{RUN}}/report/fits.html", f"{{RUN}}/run_config.yaml", f"{{RUN}}/report/run_config.html"
    shell: "touch {{output}}"


rule compare_architectures:
    input: rules.aggregate.output.table
    output: f"{{RUN}}/scaling/architectures.csv", f"{{RUN}}/report/architectures.html"
    shell: "touch {{output}}"
'''


def figures(metrics: list[str]) -> list[str]:
    """As many figure names as the workflow draws (3 views per fitted metric, 9 others)."""
    return [f"{metric}_{view}" for metric in metrics for view in ("vs_n", "vs_k", "joint")] + [f"other{i}" for i in range(9)]


def prepare(root: Path, seeds: int, workflow: Path = REPO) -> tuple[list[str], list[str], dict[str, int], str]:
    """Write both workflows; return the two snakemake commands (without options) and the jobs."""
    from saesweep.plan.cells import sweep_cells

    config = sweep_config(seeds)
    validated = validate_config(config)
    cells = [cell.name for cell in sweep_cells(validated)]
    ours, bare = root / "ours", root / "bare"
    for folder in (ours, bare):
        folder.mkdir(parents=True)
    (ours / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sites = validated["activations"]["sites"]
    (bare / "Snakefile").write_text(BARE.format(sites=sites, cells=cells, figures=figures(validated["scaling"]["metrics"])))
    common = [sys.executable, "-m", "snakemake", "--workflow-profile", "none", "--cores", "1"]
    ours_cmd = [*common, "--snakefile", str(workflow / "Snakefile"), "--directory", str(ours),
                "--configfile", str(ours / "config.yaml")]
    bare_cmd = [*common, "--snakefile", str(bare / "Snakefile"), "--directory", str(bare)]
    one = f"results/bench/cells/{sites[0]}/{cells[-1]}/sae.safetensors"
    return ours_cmd, bare_cmd, jobs_per_rule(validated), one


def job_stats(output: str) -> dict[str, int]:
    block = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return dict(Counter({m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)
                         if m.group(1) != "total"}))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return elapsed


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def bench(seeds: int, repeats: int, root: Path, workflow: Path) -> list[tuple[str, float, float]]:
    ours, bare, expected, one = prepare(root / f"seeds{seeds}", seeds, workflow)
    for command in (ours, bare):  # untimed: checks the shape, creates .snakemake/
        result = subprocess.run([*command, "-n"], capture_output=True, text=True, env=ENV)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        stats = job_stats(result.stdout)
        assert stats == expected, (command[-1], stats, expected)
    cases = {"dry run": ["-n", "--quiet"], "parse": ["--list-rules"], "one cell": ["-n", one, "--quiet"]}
    times: dict[str, dict[str, list[float]]] = {case: {"ours": [], "bare": []} for case in cases}
    for _ in range(repeats):
        for case, args in cases.items():
            times[case]["ours"].append(timed([*ours, *args]))
            times[case]["bare"].append(timed([*bare, *args]))
    return [(case, statistics.median(t["ours"]), statistics.median(t["bare"])) for case, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 100], help="100 cells per seed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workflow", type=Path, default=REPO,
                        help="the checkout whose Snakefile is timed (default: this one); its src/ must come first "
                        "on PYTHONPATH")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'cells':>7} {'jobs':>7}  {'case':<9} {'saesweep s':>11} {'bare s':>8} {'ratio':>6}")
        for seeds in args.seeds:
            jobs = sum(jobs_per_rule(validate_config(sweep_config(seeds))).values())
            for case, ours, bare in bench(seeds, args.repeats, Path(tmp), args.workflow.resolve()):
                print(f"{100 * seeds:>7} {jobs:>7}  {case:<9} {ours:>11.2f} {bare:>8.2f} {ours / bare:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
