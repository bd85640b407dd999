"""The report's tables: one row per fitted law with its intervals and held-out check, and the
run's configuration with provenance."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from saesweep.core.provenance import settings_hash
from saesweep.analysis.report import fit_table, write_fit_table, write_run_config
from saesweep.analysis.scaling import fit_scaling_laws


def synthetic_fits() -> dict:
    rng = np.random.default_rng(0)
    grid = pd.MultiIndex.from_product([[512, 1024, 2048, 4096], [8, 32]], names=["n_latents", "k"]).to_frame(index=False)
    nmse = 2.0 * grid["n_latents"] ** -0.3 * grid["k"] ** -0.1 * np.exp(rng.normal(0, 0.01, len(grid)))
    cells = grid.assign(site="resid6", arch="topk", seed=0, nmse=nmse)
    return fit_scaling_laws(cells, ["nmse", "absent_metric"], bootstrap=20, seed=0)


def test_fit_table_has_one_row_per_law() -> None:
    fits = synthetic_fits()
    table = fit_table(fits)
    nmse = table[table["metric"] == "nmse"]
    # L(n) at k ∈ {8, 32} and L(k) at 4 values of n, each as pure power law and with floor, plus the joint law
    assert len(nmse) == 2 * 2 + 4 * 2 + 1
    assert set(nmse["at"]) == {"k8", "k32", "n=512", "n=1024", "n=2048", "n=4096", "all cells"}
    power = nmse[(nmse["law"] == "power_n") & (nmse["at"] == "k8")].iloc[0]
    entry = fits["groups"][0]["metrics"]["nmse"]["vs_n"]["k8"]["power"]
    lo, hi = entry["ci95"]["b"]
    assert f"b = {entry['params']['b']:.4g} [{lo:.4g}, {hi:.4g}]" in power["parameters (95% CI)"]
    assert power["held-out check"].startswith("n=4096 predicted from smaller n: k=8: ")
    assert power["held-out check"].endswith("inside the interval") and not power["flagged"]
    assert power["status"] == "ok" and power["premise"].startswith("fall over n = 512…4096: ")
    # 4 cells leave the law with floor too few cells to leave one out
    assert power["comparison"] == (
        "not possible: floor_n: leave-one-out: 4 distinct n value(s), need at least 5 for 3 parameters"
    )
    floor_k = nmse[(nmse["law"] == "floor_k") & (nmse["at"] == "n=512")].iloc[0]
    assert floor_k["status"] == "skipped" and "need at least 4" in floor_k["reason"]
    absent = table[table["metric"] == "absent_metric"]
    assert len(absent) == 1 and absent.iloc[0]["status"] == "skipped" and "not in the cells table" in absent.iloc[0]["reason"]


def test_compute_frontier_laws_are_rows_of_the_table() -> None:
    from test_compute import planted_logs

    from saesweep.analysis.compute import fit_compute_frontiers

    fits = {"groups": [], "compute_frontier": fit_compute_frontiers(planted_logs(), bootstrap=10)}
    table = fit_table(fits)
    assert table["law"].tolist() == ["power_C", "floor_C"] and set(table["at"]) == {"k8: frontier in C"}
    assert (table["metric"] == "heldout_nmse").all() and table["premise"].str.startswith("fall over C = ").all()


def test_flagged_prediction_is_marked(tmp_path: Path) -> None:
    fits = copy.deepcopy(synthetic_fits())
    validation = fits["groups"][0]["metrics"]["nmse"]["vs_n"]["k32"]["power"]["validation"]
    validation.update(within_interval=False, flagged=True)
    write_fit_table(fits, tmp_path / "fits.csv", tmp_path / "fits.html")
    page = (tmp_path / "fits.html").read_text()
    assert page.count("<tr class='flagged'>") == 1 and page.count("OUTSIDE the interval") == 1
    csv = pd.read_csv(tmp_path / "fits.csv")
    assert list(csv.loc[csv["flagged"] == True, "at"]) == ["k32"]  # noqa: E712 (a CSV column of True/False/NaN)


def test_contradicted_laws_and_the_comparison_are_marked(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ns = [2**e for e in range(9, 15)]
    grid = pd.MultiIndex.from_product([ns, [32]], names=["n_latents", "k"]).to_frame(index=False)
    noise = np.exp(rng.normal(0, 0.01, len(grid)))
    falling = grid.assign(site="falls", nmse=2.0 * grid["n_latents"] ** -0.3 * noise)
    rising = grid.assign(site="rises", nmse=(0.1 + 1e-3 * grid["n_latents"] ** 0.5) * noise)
    cells = pd.concat([falling, rising]).assign(arch="topk", seed=0)
    fits = fit_scaling_laws(cells, ["nmse"], bootstrap=0)
    write_fit_table(fits, tmp_path / "fits.csv", tmp_path / "fits.html")
    csv = pd.read_csv(tmp_path / "fits.csv")
    by_n = csv[csv["law"].isin(["power_n", "floor_n"])].set_index(["site", "law"])
    assert list(by_n["status"]) == ["ok", "ok", "contradicted", "contradicted"]
    assert by_n.loc[("rises", "floor_n"), "reason"].startswith("the fitted loss rises with n")
    assert by_n.loc[("rises", "floor_n"), "premise"].startswith("fall over n = 512…16384: -")
    assert by_n.loc[("falls", "power_n"), "premise"].startswith("fall over n = 512…16384: ")
    # pure power-law data: the law with floor (c → 0) predicts as well; both rows say so
    comparison = fits["groups"][0]["metrics"]["nmse"]["vs_n"]["k32"]["comparison"]
    assert comparison["verdict"] == "the data cannot tell"
    said = f"the data cannot tell (LOO ratio pure/floor = {comparison['ratio']:.3g}; the lower: {comparison['better']}_n)"
    assert by_n.loc[("falls", "power_n"), "comparison"] == by_n.loc[("falls", "floor_n"), "comparison"] == said
    assert by_n.loc[("falls", "power_n"), "LOO error"] == pytest.approx(comparison["loo_mse"]["power"])
    page = (tmp_path / "fits.html").read_text()
    rows = re.findall(r"<tr class='([^']*)'><td>(\w+)</td><td>topk</td><td>nmse</td><td>(\w+)</td>", page)
    marked = {(site, law) for kind, site, law in rows if "contradicted" in kind.split()}
    assert {("rises", "power_n"), ("rises", "floor_n")} <= marked
    assert not {("falls", "power_n"), ("falls", "floor_n")} & marked
    assert "tr.contradicted td{" in page and "<i>contradicted</i>" in page


def test_run_config_carries_provenance(tmp_path: Path) -> None:
    config = {"run": "demo", "sweep": {"n_latents": [512, 1024], "k": [8]}, "model": {"id": "m<&>"}}
    write_run_config(config, tmp_path / "run_config.yaml", tmp_path / "run_config.html")
    document = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert document["config"] == config
    assert document["provenance"]["config_hash"] == settings_hash(config)
    assert {"package_version", "git_commit"} <= set(document["provenance"])
    page = (tmp_path / "run_config.html").read_text()
    assert "Configuration of run demo" in page and "m&lt;&amp;&gt;" in page


def test_a_law_not_resolved_is_marked(tmp_path: Path) -> None:
    """Issue 25's table: its pure law's exponent interval holds 0; the row says "not resolved"
    with the reason and is marked, the law with floor is preferred on both rows."""
    from saesweep.analysis import calibrate
    from saesweep.analysis.scaling import fit_pair

    laws = fit_pair("C", np.array(calibrate.ISSUE_NS), np.array(calibrate.ISSUE_NMSE), 20, 0)
    fits = {"groups": [], "compute_frontier": {"groups": [{"site": "s", "arch": "topk", "curve": "k128", "laws": laws}]}}
    fits |= {"bootstrap": 20, "seed": 0, "min_fall": 0.05, "loo_ratio": 2.0, "level": 0.95}
    write_fit_table(fits, tmp_path / "fits.csv", tmp_path / "fits.html")
    csv = pd.read_csv(tmp_path / "fits.csv").set_index("law")
    assert csv.loc["power_C", "status"] == "not resolved" and "includes 0" in csv.loc["power_C", "reason"]
    assert csv.loc["floor_C", "status"] == "ok" and csv.loc["floor_C", "comparison"].startswith("preferred (")
    page = (tmp_path / "fits.html").read_text()
    assert page.count("<tr class='not-resolved'>") == 1 and "<i>not resolved</i>" in page


def test_fit_table_lists_the_delta_lm_law_against_nmse() -> None:
    """One row per (site, arch) of fits.json's ``loss_law``, with its parameters and status."""
    from saesweep.analysis.loss_law import fit_loss_law

    x = np.geomspace(0.05, 0.5, 8)
    entry = fit_loss_law(x, 0.4 * x**1.2, bootstrap=20, rng=np.random.default_rng(0), dropped=1)
    table = fit_table({"groups": [], "loss_law": {"x": "nmse", "y": "delta_lm_loss",
                                                  "groups": [{"site": "resid8", "arch": "topk", "law": entry}]}})
    row = table.iloc[0]
    assert (row["law"], row["metric"], row["status"], row["cells"]) == ("power_nmse", "delta_lm_loss", "ok", 8)
    assert row["parameters (95% CI)"].startswith("a = 0.4")
