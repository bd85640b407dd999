"""Figures are written as PNG and SVG, readable (log axes, labels, titles) and survive skipped fits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saesweep.analysis import curve_plots, law_plots, plots
from saesweep.analysis.plots import INTERPRETABILITY
from saesweep.analysis.aggregate import with_curves
from saesweep.analysis.scaling import fit_scaling_laws

TITLE = "gpt2-small · run test"


@pytest.fixture(scope="module")
def cells() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    grid = pd.MultiIndex.from_product(
        [[512, 1024, 2048, 4096, 8192], [8, 16, 32], range(2), ["resid.6", "resid.9"]],
        names=["n_latents", "k", "seed", "site"],
    ).to_frame(index=False)
    n, k = grid["n_latents"].to_numpy(float), grid["k"].to_numpy(float)
    nmse = (2.0 * n**-0.3 + 0.05) * k**-0.1 * np.exp(rng.normal(0, 0.01, len(grid)))
    return with_curves(grid).assign(
        arch="topk",
        tokens=10**7,
        nmse=nmse,
        delta_lm_loss=0.2 * nmse - 0.04,
        dead_fraction=np.clip(n / 16384 * rng.uniform(0.5, 1.0, len(grid)), 0, 1),
        ce_loss_recovered=1 - nmse,
    )


@pytest.fixture(scope="module")
def fits(cells: pd.DataFrame) -> dict:
    return fit_scaling_laws(cells, ["nmse", "delta_lm_loss"], bootstrap=8, seed=0)


def svg_text(path: Path) -> str:
    """The text drawn in an SVG written with svg.fonttype = none."""
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


def check_written(paths: list[Path], *labels: str) -> str:
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = svg_text(svg)
    for label in (TITLE, *labels):
        assert label in text, label
    return text


def test_metric_vs_n(cells: pd.DataFrame, fits: dict, tmp_path: Path) -> None:
    paths = law_plots.plot_metric_vs_n(cells, fits, "nmse", tmp_path / "figs" / "nmse_vs_n", TITLE)
    text = check_written(
        paths,
        "number of latents n (log scale)",
        "normalised MSE (log scale)",
        "resid.6 · topk",
        "resid.9 · topk",
        "k8",
        "fitted law (band: 95% interval)",
    )
    assert "4096" in text  # log axis labelled at the sweep's own n


def test_metric_vs_k(cells: pd.DataFrame, fits: dict, tmp_path: Path) -> None:
    paths = law_plots.plot_metric_vs_k(cells, fits, "nmse", tmp_path / "nmse_vs_k", TITLE)
    check_written(paths, "active latents per token k (log scale)", "n=512")


def test_joint_contours(cells: pd.DataFrame, fits: dict, tmp_path: Path) -> None:
    paths = law_plots.plot_joint_contours(cells, fits, "nmse", tmp_path / "joint", TITLE)
    check_written(paths, "number of latents n (log scale)", "active latents per token k (log scale)", "fill: joint fit")


def test_skipped_fits_are_noted(cells: pd.DataFrame, tmp_path: Path) -> None:
    few = cells[cells["n_latents"] <= 1024]
    few_fits = fit_scaling_laws(few, ["nmse"], bootstrap=0)
    text = check_written(law_plots.plot_metric_vs_n(few, few_fits, "nmse", tmp_path / "few_n", TITLE), "fit skipped")
    assert "need at least" in text
    check_written(law_plots.plot_joint_contours(few, few_fits, "nmse", tmp_path / "few_joint", TITLE), "fit skipped")
    no_fits = law_plots.plot_metric_vs_n(few, {"groups": []}, "nmse", tmp_path / "none", TITLE)
    check_written(no_fits, "fit skipped: no fit for nmse")


def test_non_positive_values_are_noted(cells: pd.DataFrame, fits: dict, tmp_path: Path) -> None:
    paths = law_plots.plot_metric_vs_n(cells, fits, "delta_lm_loss", tmp_path / "dlm", TITLE)
    check_written(paths, "ΔLM loss (nats/token) (log scale)", "non-positive")


def test_dead_fraction_and_frontier(cells: pd.DataFrame, tmp_path: Path) -> None:
    check_written(plots.plot_fraction_vs_n(cells, "dead_fraction", tmp_path / "dead", TITLE), "dead latents (fraction of n)", "k32")
    check_written(
        plots.plot_frontier(cells, tmp_path / "frontier", TITLE),
        "normalised MSE (log scale)",
        "ΔLM loss (nats/token)",
        "k16",
    )


def convergence_logs(cells: pd.DataFrame) -> pd.DataFrame:
    """Held-out rows at 8 token counts for TopK (the fixture's cells) and for ReLU at two
    penalties, two seeds each: FLOPs and seconds grow with tokens and differ by seed."""
    relu = cells[cells["k"] == 8].assign(arch="relu", curve="l0.1", sparsity=0.1)
    relu = pd.concat([relu, relu.assign(curve="l1", sparsity=1.0)])
    steps = pd.DataFrame({"tokens": np.geomspace(1e4, 1e7, 8).astype(int)})
    logs = pd.concat([cells, relu])[["site", "arch", "curve", "sparsity", "n_latents", "seed", "nmse"]].merge(steps, how="cross")
    return logs.assign(
        heldout_nmse=logs["nmse"] * (1 + 1e5 / logs["tokens"]) * (1 + 0.05 * logs["seed"]),
        heldout_l0=20 + 1e5 / logs["tokens"],
        flops=logs["tokens"] * logs["n_latents"] * 1e3,
        train_seconds=logs["tokens"] / 1e4 * (1 + logs["seed"]),
    )


def test_convergence_curves(cells: pd.DataFrame, tmp_path: Path) -> None:
    """Per (site, n) every architecture in one panel, against tokens, FLOPs and training
    seconds; the L0 figure draws the penalty architectures only."""
    logs = convergence_logs(cells)
    text = check_written(
        curve_plots.plot_training_curves(logs, tmp_path / "train", TITLE),
        "training tokens (log scale)", "training FLOPs", "training wall-clock", "resid.6 · n = 512",
        "topk k8", "relu l0.1", "held-out normalised MSE (log scale)", "band min–max",
    )
    assert text.count("resid.9 · n = 8192") == 3  # one panel per x-axis
    l0 = check_written(
        curve_plots.plot_training_curves(logs, tmp_path / "l0", TITLE, "heldout_l0", penalty_only=True),
        "held-out L0", "relu l1",
    )
    assert "topk" not in l0, l0[l0.find("topk") - 300:]  # ReLU only
    empty = curve_plots.plot_training_curves(logs[logs["arch"] == "topk"], tmp_path / "none", TITLE, "heldout_l0", penalty_only=True)
    assert "no penalty architecture" in svg_text(empty[1])


def test_seed_bands_are_median_and_range() -> None:
    logs = pd.DataFrame({"site": "resid1", "n_latents": 64, "arch": "topk", "curve": "k4", "tokens": 100,
                         "seed": [0, 1, 2], "heldout_nmse": [0.3, 0.1, 0.2], "flops": [10, 30, 20],
                         "train_seconds": [1.0, 5.0, 2.0]})
    (band,) = curve_plots.seed_bands(logs, "heldout_nmse").to_dict("records")
    assert (band["heldout_nmse"], band["low"], band["high"], band["seeds"]) == (0.2, 0.1, 0.3, 3)
    assert (band["flops"], band["train_seconds"]) == (20, 2.0)


def test_dead_latents(cells: pd.DataFrame, tmp_path: Path) -> None:
    """Both dead-latent measures against tokens per latent, one panel per (site, arch, n), the
    expected firings of a uniform-rate latent in each legend entry."""
    steps = pd.DataFrame({"tokens": [1000, 2000, 4000, 8000]})
    logs = cells[["site", "arch", "curve", "sparsity", "n_latents", "k", "seed"]].merge(steps, how="cross")
    logs = logs.assign(
        dead_fraction=0.3, heldout_dead_fraction=0.2, heldout_expected_firings=8192 * logs["k"] / logs["n_latents"],
        window_expected_firings=50.0,
    )
    logs.loc[logs["tokens"] == 2000, "heldout_dead_fraction"] = np.nan  # a log row between held-out points
    text = check_written(
        plots.plot_dead_latents(logs, tmp_path / "dead_latents", TITLE),
        "training tokens per latent (tokens / n, log scale)",
        "never fires on the held-out tokens",
        "no firing in the training dead window",
        "k8: expect 16 held-out, 50 window firings",  # n = 4096: 8192 · 8 / 4096
        "topk · n=512",
    )
    assert text.count("topk · n=") == 10  # 2 sites × 5 sizes
    empty = check_written(plots.plot_dead_latents(logs.drop(columns="heldout_dead_fraction"), tmp_path / "none", TITLE))
    assert "no training log with held-out points" in empty


def test_all_non_positive_values_fall_back_to_a_linear_axis(cells: pd.DataFrame, tmp_path: Path) -> None:
    negative = cells.assign(delta_lm_loss=-cells["delta_lm_loss"].abs() - 1e-3)
    fits = fit_scaling_laws(negative, ["delta_lm_loss"], bootstrap=0)
    paths = law_plots.plot_metric_vs_n(negative, fits, "delta_lm_loss", tmp_path / "neg", TITLE)
    check_written(paths, "no positive value: linear scale")


def with_k_transfer(cells: pd.DataFrame) -> pd.DataFrame:
    """Cells with k-transfer columns at k′ ∈ {k/2, k, 2k, 4k}: error lowest at the training k."""
    out = cells.copy()
    for k_test in (4, 8, 16, 32, 64, 128):
        ratio = np.log2(k_test / out["k"])
        out[f"k_transfer_nmse_{k_test}"] = np.where(ratio.between(-1, 2), out["nmse"] * (1 + ratio**2), np.nan)
    return out


def test_k_transfer_columns_are_ordered_by_test_k(cells: pd.DataFrame) -> None:
    columns = plots.k_transfer_columns(with_k_transfer(cells).assign(k_transfer_nmse_x=0.0), "nmse")
    assert list(columns) == [4, 8, 16, 32, 64, 128]
    assert columns[16] == "k_transfer_nmse_16"


def test_k_transfer(cells: pd.DataFrame, tmp_path: Path) -> None:
    check_written(
        plots.plot_k_transfer(with_k_transfer(cells), tmp_path / "multi", TITLE),
        "latents kept at test time k′ (log scale)",
        "normalised MSE (log scale)",
        "trained at k=16",
        "k′ = k",
    )
    text = check_written(plots.plot_k_transfer(cells, tmp_path / "none", TITLE))
    assert "no k_transfer_nmse_* columns in the table" in text


def test_sparsity_frontier_draws_envelopes_with_bands(cells: pd.DataFrame, tmp_path: Path, monkeypatch) -> None:
    topk = cells[cells["site"] == "resid.6"].assign(l0=cells["k"].astype(float))
    relu = topk.drop_duplicates(["n_latents", "k", "seed"]).assign(
        arch="relu", k=np.nan, curve=lambda t: "l" + (1 / t["sparsity"]).round(3).astype(str),
        l0=lambda t: 1.5 * t["l0"], nmse=lambda t: 1.3 * t["nmse"],
    )
    both = pd.concat([topk, relu]).assign(setting=lambda t: t["arch"] + "-" + t["curve"])
    points = both.groupby(["site", "arch", "setting", "n_latents"])[["l0", "nmse"]].mean().reset_index()
    frontiers = points.assign(
        test_l0=points["l0"], test_nmse=points["nmse"], test_nmse_lo=0.9 * points["nmse"],
        test_nmse_hi=1.1 * points["nmse"], on_envelope=True,
    )
    dominated = frontiers[frontiers["setting"] == "topk-k16"].assign(setting="topk-k16-lr2", on_envelope=False)
    dominated = dominated.assign(test_nmse=2 * dominated["test_nmse"])
    frontiers = pd.concat([frontiers, dominated], ignore_index=True)
    bands = []
    original = plots.Axes.fill_between
    monkeypatch.setattr(plots.Axes, "fill_between", lambda ax, x, lo, hi, **kw: bands.append((list(x), list(lo), list(hi))) or original(ax, x, lo, hi, **kw))
    text = check_written(
        plots.plot_sparsity_frontier(both, frontiers, tmp_path / "frontier", TITLE),
        "measured L0 (active latents per token) (log scale)", "(test windows)",
        "n=512", "n=8192", "topk", "relu", "k16", "l0.125", "topk-k16-lr2", "architecture (envelope)",
    )
    assert "resid.9" not in text
    assert len(bands) == 2 * 5  # one band per architecture and panel
    for x, lo, hi in bands:
        assert len(x) == 3 and x == sorted(x)  # through the three envelope settings, not the dominated one
        assert np.allclose(np.array(hi) / np.array(lo), 1.1 / 0.9)
    check_written(plots.plot_sparsity_frontier(both, frontiers, tmp_path / "delta", TITLE, "delta_lm_loss"), "topk")
    assert len(bands) == 10  # no band for a metric without a validation/test split


def test_interpretability(cells: pd.DataFrame, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    full = cells.assign(
        probe_loss=rng.uniform(0.1, 0.3, len(cells)),
        explain_precision=rng.uniform(0, 1, len(cells)),
        explain_recall=rng.uniform(0, 1, len(cells)),
        ablation_sparsity=rng.uniform(0, 1, len(cells)),
    )
    # probe loss falls with n, far beyond its intervals; the other metrics are noise with wide ones
    full["probe_loss"] = 1.0 / full["n_latents"]
    for metric in INTERPRETABILITY:
        full[f"{metric}_se"] = 1e-6 if metric == "probe_loss" else 0.5
        full[f"{metric}_count"] = 20  # units per cell: the t quantile's degrees of freedom
    text = check_written(
        plots.plot_interpretability(full, tmp_path / "interp", TITLE),
        "probe loss (nats, mean over tasks)",
        "N2G explanation precision",
        "N2G explanation recall",
        "ablation sparsity (lower: sparser effect)",
        "resid.9 · topk",
        "trend in n (95%)", ": falls", ": not resolved",
    )
    assert ": rises" not in text
    assert "no probe_loss" not in text
    partial = check_written(plots.plot_interpretability(full.drop(columns="probe_loss"), tmp_path / "p", TITLE))
    assert "no probe_loss in the table" in partial and "no explain_recall" not in partial


def test_compute_frontier(tmp_path: Path) -> None:
    from test_compute import planted_logs

    from saesweep.analysis.compute import fit_compute_frontiers

    logs = planted_logs()
    fits = {"compute_frontier": fit_compute_frontiers(logs, bootstrap=20)}
    text = check_written(
        law_plots.plot_compute_frontier(logs, fits, tmp_path / "compute", TITLE),
        "resid1 · topk · k8", "frontier", "n=64", "n=2048", "·C^−0.", "law fitted to the frontier",
    )
    assert "contradicted" not in text
    empty = check_written(law_plots.plot_compute_frontier(logs, {"compute_frontier": {"groups": []}}, tmp_path / "e", TITLE))
    assert "no curve with held-out points" in empty


def test_a_law_not_resolved_is_drawn_as_such(tmp_path: Path) -> None:
    """Issue 25's table as a compute frontier whose comparison is forced to the pure law: the
    law is drawn dashed and the legend and the note say "not resolved"."""
    from saesweep.analysis import calibrate
    from saesweep.analysis.scaling import fit_pair

    laws = fit_pair("C", np.array(calibrate.ISSUE_NS), np.array(calibrate.ISSUE_NMSE), 10, 0)
    assert laws["power"]["status"] == "not resolved"
    laws["comparison"] |= {"preferred": "power", "better": "power"}
    logs = pd.DataFrame({"site": "s", "arch": "topk", "curve": "k128", "n_latents": 256, "seed": 0, "d": 576, "tokens": [1, 2], "heldout_nmse": [0.3, 0.2]})
    frontier = pd.DataFrame({"compute": list(calibrate.ISSUE_NS), "loss": list(calibrate.ISSUE_NMSE)})
    group = {"site": "s", "arch": "topk", "curve": "k128", "frontier": frontier.to_dict("records"), "laws": laws}
    text = check_written(
        law_plots.plot_compute_frontier(logs, {"compute_frontier": {"groups": [group]}}, tmp_path / "nr", TITLE),
        ": not resolved", "not resolved (dashed): the exponent b's 95% interval",
    )
    assert "contradicted" not in text


def test_latent_density_and_dense_fraction(cells: pd.DataFrame, tmp_path: Path) -> None:
    """Every cell's histogram on the shared bins is drawn as the fraction of its latents; the
    note gives the largest dense fraction per curve; cells without a histogram are left out."""
    from saesweep.analysis.density_plots import plot_latent_density
    from saesweep.evaluation.density import DENSITY_BINS

    rng = np.random.default_rng(1)
    histograms = [rng.multinomial(int(n), np.full(DENSITY_BINS, 1 / DENSITY_BINS)).tolist() for n in cells["n_latents"]]
    table = cells.assign(firing_histogram_counts=histograms, dense_fraction=rng.uniform(0, 0.05, len(cells)))
    table.loc[0, "firing_histogram_counts"] = None
    text = check_written(plot_latent_density(table, tmp_path / "density", TITLE), "fraction of the cell's latents", "k16")
    for site in ("resid.6", "resid.9"):
        worst = table[(table["curve"] == "k8") & (table["site"] == site)]["dense_fraction"].max()
        assert f"k8: dense (&gt; 10% of tokens) at most {worst:.1%} of latents" in text
    check_written(plots.plot_fraction_vs_n(table, "dense_fraction", tmp_path / "dense", TITLE), "k32")
