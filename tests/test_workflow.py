"""The whole DAG on the tiny model, through Snakemake, checking properties of its outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO, snakemake, tiny_config, write_config
from saesweep.analysis.laws import predict
from saesweep.plan.cells import sweep_cells
from saesweep.plan.config import load_config

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_corpus: Path) -> Path:
    """The tiny sweep, run once for all tests of this module."""
    workdir = tmp_path_factory.mktemp("sweep")
    # twice the default budget in smaller batches: enough steps for the k ordering to show;
    # the training tokens extracted by two part jobs
    config = tiny_config(
        tiny_model,
        tiny_corpus,
        **{"sweep.n_latents": [64, 128, 256], "sweep.archs": {"relu": {"l1_coef": [0.1, 1.0]}},
           "train.tokens.base": 24000, "train.batch_size": 128, "activations.extract_jobs": 2},
    )
    write_config(workdir / "config.yaml", config)
    snakemake(workdir)
    return workdir


def test_cells_table_has_every_cell_with_valid_metrics(sweep: Path) -> None:
    table = pd.read_parquet(sweep / "results/tiny/scaling/cells.parquet")
    relu, cells = table[table.arch == "relu"], table[table.arch == "topk"]
    assert sorted(zip(cells.n_latents, cells.k)) == [(n, k) for n in (64, 128, 256) for k in (4, 16)]
    assert sorted(zip(relu.n_latents, relu.l1_coef)) == [(n, c) for n in (64, 128, 256) for c in (0.1, 1.0)]
    assert relu.k.isna().all() and relu.curve.isin(["l0.1", "l1"]).all() and relu.sparsity.eq(relu.l1_coef).all()
    assert table.nmse.between(0, 1.5).all(), table.nmse
    assert (cells.l0 <= cells.k + 1e-9).all()
    # L0 is measured: a larger L1 penalty gives fewer active latents
    by_penalty = relu.set_index(["n_latents", "l1_coef"]).l0
    assert all(by_penalty[(n, 1.0)] < by_penalty[(n, 0.1)] for n in (64, 128, 256))
    assert relu.k_transfer_nmse_4.isna().all() if "k_transfer_nmse_4" in relu else True
    assert relu.not_applicable_k_transfer.str.contains("relu").all()
    assert cells.dead_fraction.between(0, 1).all()
    assert cells.ce_clean.gt(0).all() and cells.kl_sae.ge(0).all()
    assert cells.delta_lm_loss_error_added.abs().max() < 1e-3
    assert (cells.tokens == 24000 // 128 * 128).all()  # whole batches of 128: the last 64 tokens dropped
    assert cells.git_commit.str.len().gt(0).all() and cells.train_settings_hash.str.len().eq(16).all()
    # more latents or more active latents reconstruct better at equal data
    by = cells.set_index(["n_latents", "k"]).nmse
    assert all(by[(n, 16)] < by[(n, 4)] for n in (64, 128, 256))
    assert (sweep / "results/tiny/scaling/cells.csv").exists()


def test_training_loss_falls_and_weights_have_the_cell_shapes(sweep: Path) -> None:
    cell = sweep / "results/tiny/cells/resid2/topk-n256-k16-s0"
    log = pd.read_parquet(cell / "train_log.parquet")
    assert log.tokens.is_monotonic_increasing and log.tokens.iloc[-1] == 24000 // 128 * 128
    assert log.nmse.iloc[-1] < 0.7 * log.nmse.iloc[0]
    weights = load_file(str(cell / "sae.safetensors"))
    assert weights["W_enc"].shape == (256, 32) and weights["W_dec"].shape == (256, 32)
    assert weights["W_dec"].norm(dim=1).sub(1).abs().max() < 1e-5
    cfg = json.loads((cell / "cfg.json").read_text())
    assert cfg["provenance"]["settings_hash"] and cfg["params"]["k"] == 16
    assert not (cell / "checkpoint.pt").exists()


def test_fits_and_figures_exist_with_content(sweep: Path) -> None:
    fits = json.loads((sweep / "results/tiny/scaling/fits.json").read_text())
    assert fits["metrics"] == ["nmse", "delta_lm_loss"]
    groups = {group["arch"]: group["metrics"]["nmse"] for group in fits["groups"]}
    nmse = groups["topk"]
    assert set(nmse["vs_n"]) == {"k4", "k16"} and set(groups["relu"]["vs_n"]) == {"l0.1", "l1"}
    assert groups["relu"]["joint"]["status"] == "skipped" and groups["relu"]["vs_k"] == {}
    cells = pd.read_parquet(sweep / "results/tiny/scaling/cells.parquet")
    for k in (4, 16):
        power = nmse["vs_n"][f"k{k}"]["power"]
        assert power["status"] in ("ok", "not resolved", "contradicted")
        observed = cells[(cells.arch == "topk") & (cells.k == k)].sort_values("n_latents")
        log_observed = np.log(observed.nmse.to_numpy())
        log_fitted = np.log(predict(power, n=observed.n_latents.to_numpy().astype(float)))
        # the law a·n^(−b) contains every constant (b = 0): it fits at least as well as one
        constant = np.abs(log_observed - np.median(log_observed)).sum()
        assert np.abs(log_fitted - log_observed).sum() <= constant + 1e-6
    # every cell's held-out curve has its eight points, with compute and training time; each
    # curve over three sizes has a frontier
    logs = pd.read_parquet(sweep / "results/tiny/scaling/train_logs.parquet")
    assert (logs[logs.heldout_nmse.notna()].groupby(["arch", "setting", "n_latents"]).size() == 8).all()
    assert logs.flops.gt(0).all() and logs.train_seconds.gt(0).all() and logs.heldout_l0.notna().sum() == 8 * len(cells)
    frontiers = {(g["arch"], g["curve"]): g for g in fits["compute_frontier"]["groups"]}
    assert set(frontiers) == {("topk", "k4"), ("topk", "k16"), ("relu", "l0.1"), ("relu", "l1")}
    for group in frontiers.values():
        edge = pd.DataFrame(group["frontier"])
        assert edge.compute.is_monotonic_increasing and edge.loss.is_monotonic_decreasing
        assert group["laws"]["power"]["status"] in ("ok", "not resolved", "contradicted", "skipped")
    for name in ("nmse_vs_n", "delta_lm_loss_vs_n", "training_curves", "training_curves_l0", "frontier", "k_transfer",
                 "k_transfer_delta_lm_loss", "sparsity_frontier", "interpretability", "compute_frontier",
                 "convergence"):
        assert (sweep / f"results/tiny/scaling/figures/{name}.png").stat().st_size > 10_000
        assert (sweep / f"results/tiny/scaling/figures/{name}.svg").exists()


def test_report_has_every_figure_the_fit_table_and_the_run_config(sweep: Path) -> None:
    run_config = yaml.safe_load((sweep / "results/tiny/run_config.yaml").read_text())
    assert run_config["config"]["sweep"]["k"] == [4, 16] and run_config["provenance"]["config_hash"]
    fit_rows = pd.read_csv(sweep / "results/tiny/scaling/fits.csv")
    assert set(fit_rows["metric"]) == {"nmse", "delta_lm_loss", "heldout_nmse", "n_opt"} and "power_n" in set(fit_rows["law"])
    snakemake(sweep, "--report", "report.html")
    page = (sweep / "report.html").read_text()
    comparison = pd.read_csv(sweep / "results/tiny/scaling/architectures.csv")
    assert set(comparison["arch"]) <= {"topk", "relu"} and set(comparison["metric"]) <= {"nmse", "delta_lm_loss"}
    for name in ("fits.html", "run_config.html", "architectures.html", "explorer.html", "k_transfer.png", "sparsity_frontier.png",
                 "interpretability.png", "nmse_joint.png", "compute_frontier.png"):
        assert f"filename={name}" in page, name


def test_nothing_left_to_do_then_one_cell_reruns_alone(sweep: Path) -> None:
    assert "Nothing to be done" in snakemake(sweep, "-n").stdout
    target = "results/tiny/cells/resid2/topk-n64-k4-s0/metrics.json"
    result = snakemake(sweep, "--forcerun", "train_cell", "-n", target)
    jobs = job_counts(result.stdout)
    assert jobs.get("train_cell") == 1 and jobs.get("evaluate_cell") == 1
    assert "extract_part" not in jobs and "extract_train_manifests" not in jobs


def job_counts(output: str) -> dict[str, int]:
    """Rule → job count from the job stats Snakemake prints."""
    return {line.split()[0]: int(line.split()[1]) for line in output.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}


def test_extraction_split_into_part_jobs_feeds_the_manifests(tmp_path: Path, tiny_model: Path, tiny_corpus: Path) -> None:
    write_config(tmp_path / "config.yaml", tiny_config(tiny_model, tiny_corpus, **{"activations.extract_jobs": 3}))
    result = snakemake(tmp_path, "-n", "-p")
    jobs = job_counts(result.stdout)
    assert jobs["extract_part"] == 3 + 1  # three parts of the training tokens, one of the held-out ones
    assert jobs["extract_train_manifests"] == jobs["extract_eval_manifests"] == 1
    for part in range(3):
        assert f"results/tiny/activations/train-parts/part-{part:04d}.json" in result.stdout
        assert f"--part {part:04d}" in result.stdout
    assert "results/tiny/activations/eval-parts/part-0000.json" in result.stdout
    assert "part-0003.json" not in result.stdout
    # training reads only the manifest: one cell's training asks for the parts through it
    target = "results/tiny/cells/resid2/topk-n64-k4-s0/sae.safetensors"
    assert job_counts(snakemake(tmp_path, "-n", target).stdout)["extract_part"] == 3 + 1


def test_a_cell_under_protocol_gao2024_trains_and_evaluates(tmp_path: Path, tiny_model: Path, tiny_corpus: Path) -> None:
    """One cell end to end (extraction, training, evaluation) under the paper's protocol: its
    name carries AuxK's error normaliser, its cfg.json per-token inputs and the EMA, its
    evaluation the LM in float32, and adding the SAE's error back to its reconstruction in the
    spliced LM changes nothing (per-token normalisation inverted with each token's statistics)."""
    config = tiny_config(tiny_model, tiny_corpus, **{
        "protocol": "gao2024", "model.dtype": "bfloat16", "train.dead.window_tokens": 3000,
        "sweep.n_latents": [64], "sweep.k": [4]})
    write_config(tmp_path / "config.yaml", config)
    cell = tmp_path / "results/tiny/cells/resid2/topk-n64-k4-ae1-s0"
    snakemake(tmp_path, str(cell.relative_to(tmp_path) / "metrics.json"))
    cfg = json.loads((cell / "cfg.json").read_text())
    assert cfg["normalisation"]["kind"] == "per_token" and cfg["training"]["ema_decay"] == 0.999
    assert cfg["params"]["aux_error_norm"] == 1 and cfg["settings"]["dead"]["window_tokens"] == 3000
    metrics = json.loads((cell / "metrics.json").read_text())
    assert 0 < metrics["nmse"] < 1.5 and abs(metrics["delta_lm_loss_error_added"]) < 1e-4
    assert json.loads((cell / "eval_settings.json").read_text())["model"]["dtype"] == "float32"


def test_bad_config_names_the_key(sweep: Path, tmp_path: Path, tiny_model: Path, tiny_corpus: Path) -> None:
    write_config(tmp_path / "config.yaml", tiny_config(tiny_model, tiny_corpus, **{"sweep.k": [4, 300]}))
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    assert "sweep.k" in result.stderr and "Traceback" not in result.stderr


SHIPPED = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_dry_runs(path: Path, tmp_path: Path) -> None:
    """Each shipped config, given with --configfile beside the default config/config.yaml (as a
    user runs it from the repository), plans exactly its own cells: it replaces the default
    rather than merging into it."""
    (tmp_path / "config.yaml").write_text(path.read_text())
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    result = snakemake(tmp_path, "-n")
    assert "aggregate" in result.stdout and "evaluate_cell" in result.stdout and "explorer" in result.stdout
    planned = set(re.findall(r"cells/[^/\s]+/([^/\s]+)/metrics\.json", result.stdout))
    assert planned == {cell.name for cell in sweep_cells(load_config(path))}


PROFILES = [["--profile", str(REPO / "profiles" / "default")],
            ["--profile", str(REPO / "profiles" / "slurm"), "--workflow-profile", "none"],
            ["--profile", str(REPO / "profiles" / "slurm"), "--workflow-profile", str(REPO / "profiles" / "slurm-pack")]]


@pytest.mark.parametrize("profile", PROFILES, ids=["default", "slurm", "slurm+pack"])
def test_every_shipped_profile_dry_runs(profile: list[str], tmp_path: Path, tiny_model: Path, tiny_corpus: Path) -> None:
    """Each profile's keys are options this Snakemake and its SLURM plugin accept; packing
    puts every cell's train and evaluate jobs into groups of 4 cells."""
    write_config(tmp_path / "config.yaml", tiny_config(tiny_model, tiny_corpus))  # 4 cells
    result = snakemake(tmp_path, "-n", *profile)
    groups = re.findall(r"Group job pack \(jobs in lexicogr. order\)", result.stdout)
    assert len(groups) == (1 if "slurm-pack" in profile[-1] else 0), result.stdout[-3000:]


def test_external_saes_are_evaluated_into_the_table_and_the_figures(sweep: Path, tmp_path: Path) -> None:
    """Cells exported to SAELens and sparsify, listed as external SAEs, come back as rows of
    their own with the metrics of the cell they were exported from; nothing is retrained."""
    import shutil

    workdir = tmp_path / "sweep"
    shutil.copytree(sweep, workdir, symlinks=True)
    cells = {name: f"results/tiny/cells/resid2/{name}" for name in ("topk-n128-k16-s0", "relu-n128-l0.1-s0")}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for fmt, names in (("saelens", list(cells)), ("sparsify", ["topk-n128-k16-s0"])):
        subprocess.run(["saesweep", "export", "--config", "config.yaml", "--format", fmt, "--out", f"exported/{fmt}",
                        *[cells[name] for name in names]], cwd=workdir, env=env, check=True, capture_output=True)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["external"] = [
        {"name": "lens-topk", "site": "resid2", "path": "exported/saelens/topk-n128-k16-s0"},
        {"name": "lens-relu", "site": "resid2", "path": "exported/saelens/relu-n128-l0.1-s0", "format": "saelens"},
        {"name": "sparse-topk", "site": "resid2", "path": "exported/sparsify/topk-n128-k16-s0"},
    ]
    write_config(workdir / "config.yaml", config)
    before = {path: path.stat().st_mtime_ns for path in (workdir / "results/tiny/cells").rglob("*")}
    snakemake(workdir)
    assert {path: path.stat().st_mtime_ns for path in (workdir / "results/tiny/cells").rglob("*")} == before
    table = pd.read_parquet(workdir / "results/tiny/scaling/cells.parquet")
    external = table[table.external_source.notna()].set_index("setting")
    assert dict(external.arch) == {"lens-topk": "saelens-topk", "lens-relu": "saelens-standard", "sparse-topk": "sparsify-topk"}
    assert (external.curve == external.index).all() and external.tokens.isna().all() and external.seed.isna().all()
    assert len(table) - len(external) == len(pd.read_parquet(sweep / "results/tiny/scaling/cells.parquet"))
    origin = table[table.external_source.isna()].set_index("setting")
    for name, cell in (("lens-topk", "topk-k16"), ("sparse-topk", "topk-k16"), ("lens-relu", "relu-l0.1")):
        expected = origin[origin.n_latents == 128].loc[cell]
        assert external.loc[name, "nmse"] == pytest.approx(expected.nmse, rel=1e-5), name
        assert external.loc[name, "l0"] == pytest.approx(expected.l0, rel=1e-4), name
        assert external.loc[name, "delta_lm_loss"] == pytest.approx(expected.delta_lm_loss, abs=1e-4), name
    fits = json.loads((workdir / "results/tiny/scaling/fits.json").read_text())
    lens = next(group for group in fits["groups"] if group["arch"] == "saelens-topk")["metrics"]["nmse"]
    assert lens["vs_n"]["lens-topk"]["power"]["status"] == "skipped" and lens["joint"]["status"] == "skipped"
    assert (workdir / "results/tiny/scaling/figures/sparsity_frontier.svg").read_text().count("lens-topk") >= 1
    comparison = pd.read_csv(workdir / "results/tiny/scaling/architectures.csv")
    assert not set(comparison["arch"]) & set(external.arch)  # one point each: no frontier of its own


def test_a_broken_external_sae_fails_with_one_line_naming_the_file(sweep: Path, tmp_path: Path) -> None:
    import shutil

    workdir = tmp_path / "sweep"
    shutil.copytree(sweep, workdir, symlinks=True)
    (workdir / "broken").mkdir()
    (workdir / "broken/cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 32, "d_sae": 64}))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["external"] = [{"name": "broken", "site": "resid2", "path": "broken"}]
    write_config(workdir / "config.yaml", config)
    result = snakemake(workdir, "results/tiny/external/resid2/broken/metrics.json", check=False)
    assert result.returncode != 0
    log = (workdir / "results/tiny/logs/import_external/resid2/broken.log").read_text().strip().splitlines()
    assert len(log) == 1 and "missing weights file" in log[0] and "broken has neither sae_weights.safetensors" in log[0]
    assert not (workdir / "results/tiny/external/resid2/broken/cfg.json").exists()


def saesweep(*args: str) -> subprocess.CompletedProcess:
    """The package's command line, as the rules call it."""
    return subprocess.run([str(Path(sys.executable).parent / "saesweep"), *args], capture_output=True, text=True)


def copy_of_run(sweep: Path, folder: Path, **changes) -> Path:
    """A second run folder holding the tiny sweep's scaling tables as another run named
    ``tiny2`` would have written them, with ``changes`` (column → value) applied to every cell."""
    source = sweep / "results/tiny/scaling"
    (folder / "scaling").mkdir(parents=True)
    cells = pd.read_parquet(source / "cells.parquet").assign(run="tiny2", **changes)
    cells.to_parquet(folder / "scaling/cells.parquet")
    pd.read_parquet(source / "train_logs.parquet").assign(run="tiny2").to_parquet(folder / "scaling/train_logs.parquet")
    pd.read_parquet(source / "windows.parquet").to_parquet(folder / "scaling/windows.parquet")
    return folder


def test_cells_carry_their_hardware_and_one_protocol_hash_per_site(sweep: Path) -> None:
    import torch

    cells = pd.read_parquet(sweep / "results/tiny/scaling/cells.parquet")
    for stage in ("train", "eval"):
        assert (cells[f"{stage}_gpu"] == "none").all() and (cells[f"{stage}_gpu_count"] == 0).all()
        assert (cells[f"{stage}_torch_version"] == torch.__version__).all()
        assert cells[f"{stage}_cpu"].str.len().gt(0).all() and (cells[f"{stage}_cpu_cores"] >= 1).all()
    assert (cells["train_processes"] == 1).all()
    # every cell's evaluation settings differ (its name, seed), its protocol does not
    assert cells["eval_settings_hash"].nunique() == len(cells) and cells["eval_protocol_hash"].nunique() == 1


def test_merge_keeps_one_row_per_repeated_cell_and_the_analyses_run_on_it(sweep: Path, tmp_path: Path) -> None:
    first = sweep / "results/tiny"
    cells = pd.read_parquet(first / "scaling/cells.parquet")
    # the second run repeated every cell (another machine: its NMSE differs) and ran seed 1 of the smallest n
    second = copy_of_run(sweep, tmp_path / "tiny2", nmse=cells["nmse"] * 1.5)
    smallest = cells["n_latents"].min()
    extra = pd.read_parquet(second / "scaling/cells.parquet").query("n_latents == @smallest").assign(seed=1)
    pd.concat([pd.read_parquet(second / "scaling/cells.parquet"), extra]).to_parquet(second / "scaling/cells.parquet")
    logs = pd.read_parquet(second / "scaling/train_logs.parquet")
    extra_logs = logs[logs.n_latents == smallest].assign(seed=1)
    pd.concat([logs, extra_logs]).to_parquet(second / "scaling/train_logs.parquet")
    windows = pd.read_parquet(second / "scaling/windows.parquet")
    pd.concat([windows, windows[windows.n_latents == smallest].assign(seed=1)]).to_parquet(second / "scaling/windows.parquet")

    merged = tmp_path / "merged"
    result = saesweep("merge", "--out", str(merged), str(first), str(second))
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(merged / "scaling/cells.parquet")
    assert len(table) == len(cells) + len(extra)
    repeated = table[table.seed == 0].set_index(["arch", "setting", "n_latents"]).sort_index()
    # the first run named wins a repeated cell: its NMSE, not the second run's
    assert np.allclose(repeated["nmse"], cells.set_index(["arch", "setting", "n_latents"]).sort_index()["nmse"])
    assert len(extra) and set(table[table.seed == 1]["run"]) == {"tiny2"}
    summary = json.loads((merged / "merge.json").read_text())
    assert len(summary["dropped_repeats"]) == len(cells) and summary["kept_apart"] == []
    # each kept cell has its own training log once: the first run's for a repeated cell
    merged_logs = pd.read_parquet(merged / "scaling/train_logs.parquet")
    per_cell = merged_logs.groupby(["arch", "setting", "n_latents", "seed"]).size()
    merged_windows = pd.read_parquet(merged / "scaling/windows.parquet").groupby(["arch", "setting", "n_latents", "seed"]).size()
    first_windows = pd.read_parquet(first / "scaling/windows.parquet").groupby(["arch", "setting", "n_latents"]).size()
    assert len(merged_windows) == len(table) and (merged_windows.xs(0, level="seed") == first_windows).all()
    original = pd.read_parquet(first / "scaling/train_logs.parquet").groupby(["arch", "setting", "n_latents"]).size()
    assert len(per_cell) == len(table) and (per_cell.xs(0, level="seed") == original).all()
    # and the second order of precedence keeps the second run's values
    assert saesweep("merge", "--out", str(tmp_path / "reverse"), str(second), str(first)).returncode == 0
    reverse = pd.read_parquet(tmp_path / "reverse/scaling/cells.parquet")
    assert np.allclose(reverse[reverse.seed == 0].sort_values(["arch", "setting", "n_latents"])["nmse"],
                       repeated["nmse"].to_numpy() * 1.5)

    scaling = merged / "scaling"
    for command in (
        ["fit", "--cells", str(scaling / "cells.parquet"), "--logs", str(scaling / "train_logs.parquet"),
         "--metrics", "nmse", "delta_lm_loss", "--bootstrap", "20", "--out", str(scaling / "fits.json")],
        ["compare", "--cells", str(scaling / "cells.parquet"), "--windows", str(scaling / "windows.parquet"),
         "--csv", str(scaling / "architectures.csv"), "--frontiers", str(scaling / "architectures_frontiers.csv"),
         "--html", str(merged / "report/architectures.html"), "--bootstrap", "20"],
        ["plot", "--cells", str(scaling / "cells.parquet"), "--logs", str(scaling / "train_logs.parquet"),
         "--fits", str(scaling / "fits.json"), "--frontiers", str(scaling / "architectures_frontiers.csv"),
         "--metrics", "nmse", "delta_lm_loss", "--title", "merged", "--out-dir", str(scaling / "figures")],
        ["explorer", "--cells", str(scaling / "cells.parquet"), "--logs", str(scaling / "train_logs.parquet"),
         "--fits", str(scaling / "fits.json"), "--architectures", str(scaling / "architectures.csv"),
         "--out", str(merged / "report/explorer.html")],
    ):
        done = saesweep(*command)
        assert done.returncode == 0, done.stderr
    fits = json.loads((scaling / "fits.json").read_text())
    topk = next(group for group in fits["groups"] if group["arch"] == "topk")
    assert topk["site"] == cells["site"].iloc[0] and (scaling / "figures/nmse_vs_n.png").stat().st_size > 10_000
    assert (merged / "report/explorer.html").stat().st_size > 1_000_000


def test_merge_refuses_another_corpus_naming_the_key(sweep: Path, tmp_path: Path) -> None:
    second = copy_of_run(sweep, tmp_path / "tiny2", corpus_fingerprint="another-corpus")
    result = saesweep("merge", "--out", str(tmp_path / "merged"), str(sweep / "results/tiny"), str(second))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "corpus_fingerprint" in lines[0] and "another-corpus" in lines[0]
    assert not (tmp_path / "merged").exists()


def test_merge_keeps_runs_of_two_models_apart_when_asked(sweep: Path, tmp_path: Path) -> None:
    second = copy_of_run(sweep, tmp_path / "tiny2", model="another-model")
    first = sweep / "results/tiny"
    refused = saesweep("merge", "--out", str(tmp_path / "refused"), str(first), str(second))
    assert refused.returncode != 0 and "model is 'another-model'" in refused.stderr
    result = saesweep("merge", "--keep-apart", "--out", str(tmp_path / "merged"), str(first), str(second))
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(tmp_path / "merged/scaling/cells.parquet")
    cells = pd.read_parquet(first / "scaling/cells.parquet")
    site = cells["site"].iloc[0]
    assert table.groupby("site").size().to_dict() == {site: len(cells), f"{site}@tiny2": len(cells)}
    assert set(table[table.site == f"{site}@tiny2"]["model"]) == {"another-model"}
    logs = pd.read_parquet(tmp_path / "merged/scaling/train_logs.parquet")
    assert set(logs["site"]) == {site, f"{site}@tiny2"}
    assert len(logs) == 2 * len(pd.read_parquet(first / "scaling/train_logs.parquet"))


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_merge_of_a_bad_table_names_the_file(sweep: Path, tmp_path: Path, damage: str) -> None:
    second = copy_of_run(sweep, tmp_path / "tiny2")
    bad = second / "scaling/train_logs.parquet"
    if damage == "missing":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:100])
    result = saesweep("merge", "--out", str(tmp_path / "merged"), str(sweep / "results/tiny"), str(second))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and str(bad) in lines[0]
    assert not (tmp_path / "merged").exists()


def test_a_synthetic_run_scores_feature_recovery_and_marks_the_lm_metrics(tmp_path: Path) -> None:
    """config key synthetic: the activations are generated (no model, no text), each cell is
    scored against the planted dictionary, its LM metrics are NaN with the reason, and every
    figure is drawn (those of LM metrics saying why they are empty)."""
    pytest.importorskip("sae_lens")
    config = {
        "run": "syn",
        "activations": {"sites": ["resid0"], "train_tokens": 8000, "eval_tokens": 2000, "shard_tokens": 4000,
                        "storage_dtype": "float32"},
        "sweep": {"n_latents": [32, 64], "seeds": [0], "archs": {"topk": {"k": [4], "aux_coef": [0]}, "relu": {"l1_coef": [0.3]}}},
        "train": {"tokens": {"base": 8000, "n_ref": 32, "n_exponent": 0.0}, "batch_size": 256, "lr": {"base": 4e-3, "n_ref": 64},
                  "dead": {"min_tokens": 2000, "factor": 10}, "geometric_median_sample": 512, "log_every_tokens": 2048,
                  "device": "cpu"},
        "evaluate": {"tokens": 2000, "batch_size": 512},
        "scaling": {"metrics": ["nmse"], "bootstrap": 20},
        "synthetic": {"num_features": 128, "hidden_dim": 16, "hierarchy": {"root_nodes": 2, "max_depth": 2},
                      "correlation": {"rank": 4}, "orthogonalization_steps": 0},
    }
    write_config(tmp_path / "config.yaml", config)
    assert "prepare_corpus" not in job_counts(snakemake(tmp_path, "-n").stdout)
    snakemake(tmp_path)
    run = tmp_path / "results/syn"
    assert (run / "activations/resid0-eval/planted/synthetic_model.safetensors").exists()
    cells = pd.read_parquet(run / "scaling/cells.parquet")
    assert len(cells) == 4 and cells.mcc.between(0.05, 1).all() and cells.feature_uniqueness.between(0, 1).all()
    assert cells.firing_precision.between(0, 1).all() and cells.firing_recall.between(0, 1).all()
    assert cells.true_l0.gt(0).all() and cells.nmse.between(0, 1.5).all()
    for column in ("delta_lm_loss", "ce_loss_recovered", "kl_score", "probe_loss", "explain_precision", "ablation_sparsity"):
        assert cells[column].isna().all(), column
    assert cells.not_applicable_downstream.str.contains("no language model").all()
    for name in ("nmse_vs_n", "sparsity_frontier", "frontier", "interpretability", "k_transfer_delta_lm_loss"):
        assert (run / f"scaling/figures/{name}.png").stat().st_size > 5_000
