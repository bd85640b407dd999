"""The report's tables: one row per fitted law with its intervals and held-out check, and the
run's configuration with provenance."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
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
    assert set(nmse["at"]) == {"k=8", "k=32", "n=512", "n=1024", "n=2048", "n=4096", "all cells"}
    power = nmse[(nmse["law"] == "power_n") & (nmse["at"] == "k=8")].iloc[0]
    entry = fits["groups"][0]["metrics"]["nmse"]["vs_n"]["8"]["power"]
    lo, hi = entry["ci95"]["b"]
    assert f"b = {entry['params']['b']:.4g} [{lo:.4g}, {hi:.4g}]" in power["parameters (95% CI)"]
    assert power["held-out check"].startswith("n=4096 predicted from smaller n: k=8: ")
    assert power["held-out check"].endswith("inside the interval") and not power["flagged"]
    floor_k = nmse[(nmse["law"] == "floor_k") & (nmse["at"] == "n=512")].iloc[0]
    assert floor_k["status"] == "skipped" and "need at least 4" in floor_k["reason"]
    absent = table[table["metric"] == "absent_metric"]
    assert len(absent) == 1 and absent.iloc[0]["status"] == "skipped" and "not in the cells table" in absent.iloc[0]["reason"]


def test_flagged_prediction_is_marked(tmp_path: Path) -> None:
    fits = copy.deepcopy(synthetic_fits())
    validation = fits["groups"][0]["metrics"]["nmse"]["vs_n"]["32"]["power"]["validation"]
    validation.update(within_interval=False, flagged=True)
    write_fit_table(fits, tmp_path / "fits.csv", tmp_path / "fits.html")
    page = (tmp_path / "fits.html").read_text()
    assert page.count("<tr class='flagged'>") == 1 and page.count("OUTSIDE the interval") == 1
    csv = pd.read_csv(tmp_path / "fits.csv")
    assert list(csv.loc[csv["flagged"] == True, "at"]) == ["k=32"]  # noqa: E712 (a CSV column of True/False/NaN)


def test_run_config_carries_provenance(tmp_path: Path) -> None:
    config = {"run": "demo", "sweep": {"n_latents": [512, 1024], "k": [8]}, "model": {"id": "m<&>"}}
    write_run_config(config, tmp_path / "run_config.yaml", tmp_path / "run_config.html")
    document = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert document["config"] == config
    assert document["provenance"]["config_hash"] == settings_hash(config)
    assert {"package_version", "git_commit"} <= set(document["provenance"])
    page = (tmp_path / "run_config.html").read_text()
    assert "Configuration of run demo" in page and "m&lt;&amp;&gt;" in page
