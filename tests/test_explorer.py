"""The results explorer, opened from disk in a real Chromium (tests/browser.py): no console
error or network request, selectors change the plotted data, hover names the cell, laws that
are not ok are labelled, the matched-L0 table sorts, the URL fragment restores a view; and bad
input stops with one line naming the file, writing nothing.

The sweep's files are made by the package's own code from planted cells: ``aggregate`` over
per-cell folders (metrics.json, cfg.json, train_log.parquet), ``fit_scaling_laws`` and
``write_comparison``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from saesweep.analysis.aggregate import aggregate
from saesweep.analysis.compare import write_comparison
from saesweep.analysis.explorer import SIZE_BOUND, write_explorer
from saesweep.analysis.explorer_data import explorer_data
from saesweep.analysis.scaling import fit_scaling_laws
from saesweep.cli import main
from saesweep.core.files import write_json
from saesweep.core.split import PARTS, UNIT, WINDOWS_KEY

SIZES = (256, 512, 1024, 2048, 4096)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def planted_cell(folder: Path, arch: str, curve: str, n: int, knob: dict, l0: float, nmse: float, flops: bool) -> Path:
    """One cell's folder as training and evaluation leave it; returns its metrics.json."""
    name = f"{arch}-n{n}-{curve}-s0"
    cell = folder / name
    cell.mkdir(parents=True)
    setting = f"{arch}-{curve}"
    metrics = {
        "site": "resid2", "arch": arch, "setting": setting, "n_latents": n, "seed": 0, **knob,
        "sparsity_parameter": next(iter(knob)), "l0": l0, "nmse": nmse, "delta_lm_loss": 3 * nmse**1.5,
        "probe_loss": 0.2 + 0.01 * np.log(n), "probe_loss_se": 0.01, "probe_loss_count": 7,
        "provenance": {"settings_hash": f"eval{n:012d}"},
    }
    cfg = {
        "d": 32, "model": "tiny", "provenance": {"package_version": "0.1.0", "git_commit": COMMIT, "settings_hash": f"h{name}"[:16]},
        "training": {"tokens": 1000 * n, "steps": n, "wall_time_s": 1.0, "tokens_per_s": 1e4, "final_dead_fraction": 0.0,
                     "final_nmse": nmse, "epochs": 1.0},
    }
    metrics |= split_parts(nmse, l0)
    write_json(cell / "metrics.json", metrics)
    write_json(cell / "cfg.json", cfg)
    tokens = np.array([250, 500, 1000]) * n
    log = pd.DataFrame({"tokens": tokens, "step": [1, 2, 3], "nmse": nmse * np.array([2.0, 1.4, 1.0]),
                        "heldout_nmse": nmse * np.array([2.1, 1.5, 1.0])})
    if flops:
        log = log.assign(flops=6.0 * 2 * 32 * n * tokens, train_seconds=tokens / 1e4)
    log.to_parquet(cell / "train_log.parquet")
    return cell / "metrics.json"


def split_parts(nmse: float, l0: float, windows: int = 4, tokens: int = 10) -> dict:
    """The validation and test parts of ``metrics.json`` (``evaluation.heldout_split``) of a
    cell whose every held-out window has this NMSE and L0."""
    parts = {part: {"nmse": nmse, "l0": l0} for part in PARTS}
    sums = {"unit": UNIT, "tokens_per_window": tokens}
    for first, part in enumerate(PARTS):
        sums[part] = {"window": list(range(first, 2 * windows, 2)), "tokens": [tokens] * windows,
                      "sq_error": [nmse * tokens] * windows, "variance": [float(tokens)] * windows,
                      "l0_sum": [l0 * tokens] * windows}
    return {**parts, WINDOWS_KEY: sums}


def planted_sweep(folder: Path, flops: bool = True) -> dict[str, Path]:
    """TopK at k ∈ {8, 32} on nmse = 2 n^(−0.3) k^(−0.1) (noisy), a flat TopK curve k128
    (a law that is not ok), ReLU at two sizes (its laws in n are skipped); the files of a sweep."""
    rng = np.random.default_rng(0)
    paths = []
    for n in SIZES:
        for k in (8, 32):
            nmse = 2.0 * n**-0.3 * k**-0.1 * np.exp(rng.normal(0, 0.01))
            paths.append(planted_cell(folder / "cells", "topk", f"k{k}", n, {"k": k}, 0.97 * k, nmse, flops))
        paths.append(planted_cell(folder / "cells", "topk", "k128", n, {"k": 128}, 120.0, 0.1 * np.exp(rng.normal(0, 0.05)), flops))
    for n in (512, 2048):
        for coef, l0 in ((0.1, 60.0), (1.0, 12.0)):
            paths.append(planted_cell(folder / "cells", "relu", f"l{coef:g}", n, {"l1_coef": coef}, l0, 1.5 * l0**-0.5, flops))
    files = {name: folder / f"{name}" for name in ("cells.parquet", "train_logs.parquet", "fits.json", "architectures.csv")}
    cells = aggregate("planted", paths, files["cells.parquet"], files["train_logs.parquet"], folder / "windows.parquet")
    write_json(files["fits.json"], fit_scaling_laws(cells, ["nmse", "delta_lm_loss"], bootstrap=20, seed=0))
    write_comparison(files["cells.parquet"], folder / "windows.parquet", files["architectures.csv"],
                     folder / "architectures_frontiers.csv", folder / "architectures.html", 50)
    return files


def build(folder: Path, flops: bool = True) -> tuple[Path, dict[str, Path]]:
    files = planted_sweep(folder, flops)
    page = folder / "explorer.html"
    write_explorer(*files.values(), page)
    return page, files


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build(tmp_path_factory.mktemp("explorer"))


def plotted(page) -> list[dict]:
    """The plotted traces (name, mode, x, y, dash) as plotly holds them."""
    return page.evaluate(
        "[...document.getElementById('plot').data].map(t => ({name: t.name || '', mode: t.mode, x: [...t.x], y: [...t.y],"
        " dash: t.line ? t.line.dash : null, fill: t.fill || null}))"
    )


def points(page) -> dict[str, tuple[list, list]]:
    return {t["name"]: (t["x"], t["y"]) for t in plotted(page) if t["mode"] == "markers"}


def choose(page, **values: str) -> None:
    for control, value in values.items():
        page.select_option(f"#{control}", value)


def test_the_page_is_one_file_that_needs_no_network(built: tuple[Path, dict], browser_page) -> None:
    html = built[0].read_text()
    assert "<script src" not in html and "<link" not in html  # every script inline
    assert html.count(get_plotlyjs()) == 1 and built[0].stat().st_size < SIZE_BOUND
    page = browser_page.open(built[0])
    assert page.evaluate("typeof Plotly") == "object"
    assert len(points(page)) > 0
    browser_page.screenshot("explorer")
    assert browser_page.errors == []  # no console error, page error or request beyond the file


def test_selectors_change_the_plotted_data(built: tuple[Path, dict], browser_page) -> None:
    cells = pd.read_parquet(built[1]["cells.parquet"])
    page = browser_page.open(built[0])
    choose(page, arch="topk", curve="k32", metric="nmse", x="n")
    topk = cells[(cells.arch == "topk") & (cells.curve == "k32")].sort_values("n_latents")
    x, y = points(page)["topk k32"]
    assert x == topk.n_latents.tolist() and y == pytest.approx(topk.nmse.tolist(), rel=1e-5)
    choose(page, metric="delta_lm_loss")
    assert points(page)["topk k32"][1] == pytest.approx(topk.delta_lm_loss.tolist(), rel=1e-5)
    choose(page, x="l0")
    assert points(page)["topk k32"][0] == pytest.approx(topk.l0.tolist(), rel=1e-5)
    choose(page, x="flops", arch="all", curve="all")
    assert set(points(page)) == {"topk k8", "topk k32", "topk k128", "relu l0.1", "relu l1"}
    logs = pd.read_parquet(built[1]["train_logs.parquet"])
    last = logs[(logs.arch == "topk") & (logs.curve == "k32")].groupby("n_latents").flops.max()
    assert points(page)["topk k32"][0] == pytest.approx(last.tolist(), rel=1e-5)
    choose(page, x="tokens", arch="topk", curve="k32", n="512", metric="nmse")  # its held-out curve during training
    during = {t["name"]: t for t in plotted(page) if t["mode"] == "lines"}
    held = logs[(logs.arch == "topk") & (logs.curve == "k32") & (logs.n_latents == 512)]
    assert list(during) == ["topk-n512-k32-s0 during training"]
    assert during["topk-n512-k32-s0 during training"]["x"] == held.tokens.tolist()
    assert during["topk-n512-k32-s0 during training"]["y"] == pytest.approx(held.heldout_nmse.tolist(), rel=1e-5)
    page.uncheck("#curves")
    assert [t for t in plotted(page) if t["mode"] == "lines"] == []
    choose(page, n="all", arch="all", curve="all", x="k")  # ReLU has no k: its cells leave the plot; lines over k are per n
    assert set(points(page)) == {f"topk n={n}" for n in SIZES}
    page.uncheck("#logy")
    assert page.evaluate("document.getElementById('plot').layout.yaxis.type") == "linear"
    browser_page.screenshot("explorer-vs-k")
    assert browser_page.errors == []


def test_hover_shows_the_cell_name_settings_hash_and_commit(built: tuple[Path, dict], browser_page) -> None:
    cells = pd.read_parquet(built[1]["cells.parquet"])
    page = browser_page.open(built[0])
    choose(page, arch="topk", curve="k8", x="n", n="1024")
    x, y = points(page)["topk k8"]
    where = page.evaluate(  # the point's position on the screen, from plotly's axes
        f"(() => {{ const gd = document.getElementById('plot'), box = gd.getBoundingClientRect();"
        f" const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;"
        f" return [box.left + xa._offset + xa.l2p(Math.log10({x[0]})), box.top + ya._offset + ya.l2p(Math.log10({y[0]}))]; }})()"
    )
    page.mouse.move(*where)
    page.wait_for_selector(".hoverlayer .hovertext")
    label = page.evaluate("document.querySelector('.hoverlayer').textContent")
    row = cells[(cells.arch == "topk") & (cells.curve == "k8") & (cells.n_latents == 1024)].iloc[0]
    assert "topk-n1024-k8-s0" in label and row.train_settings_hash in label and COMMIT in label
    assert browser_page.errors == []


def test_laws_are_drawn_with_bands_and_those_not_ok_are_labelled(built: tuple[Path, dict], browser_page) -> None:
    fits = json.loads(built[1]["fits.json"].read_text())
    topk = next(g for g in fits["groups"] if g["arch"] == "topk")["metrics"]["nmse"]["vs_n"]
    flat = topk["k128"]["power"]
    assert flat["status"] in ("contradicted", "not resolved")  # the planted flat curve
    page = browser_page.open(built[0])
    choose(page, arch="topk", metric="nmse", x="n", law="power")
    listed = plotted(page)
    traces = {t["name"]: t for t in listed}
    good = traces["topk k32: power_n"]
    assert good["dash"] == "solid" and topk["k32"]["power"]["status"] == "ok"
    at = [t["name"] for t in listed].index("topk k32: power_n 95% band")
    lower, upper = listed[at - 1], listed[at]  # the band: its lower edge, then the upper filled down to it
    assert upper["fill"] == "tonexty" and lower["x"] == upper["x"] == good["x"]
    assert all(lo <= line <= hi for lo, line, hi in zip(lower["y"], good["y"], upper["y"]))
    assert upper["y"] == pytest.approx(topk["k32"]["power"]["band"]["hi"], rel=1e-5)
    flat_trace = traces[f"topk k128: power_n [{flat['status']}]"]
    assert flat_trace["dash"] == ("dot" if flat["status"] == "contradicted" else "dash")
    notes = page.locator("#notes").inner_text()
    assert f"topk k128: power_n [{flat['status']}]: {flat['reason']}" in notes
    choose(page, arch="relu")  # two sizes: every law in n skipped, none drawn, each one noted
    assert [t for t in plotted(page) if t["mode"] == "lines"] == []
    assert "relu l1: power_n [skipped]: 2 distinct n value(s)" in page.locator("#notes").inner_text()
    choose(page, law="drawn")  # neither law of the pair fitted: the pure law's reason is given
    assert "relu l0.1: power_n [skipped]: 2 distinct n value(s)" in page.locator("#notes").inner_text()
    assert browser_page.errors == []


def table_column(page, index: int) -> list[str]:
    return page.evaluate(f"[...document.querySelectorAll('#matched tbody tr')].map(r => r.cells[{index}].textContent)")


def test_the_matched_l0_table_sorts_and_the_fragment_restores_the_view(built: tuple[Path, dict], browser_page) -> None:
    comparison = pd.read_csv(built[1]["architectures.csv"])
    assert len(comparison) > 2
    page = browser_page.open(built[0])
    headers = page.evaluate("[...document.querySelectorAll('#matched th')].map(h => h.textContent)")
    assert headers == list(comparison.columns)  # whatever columns the comparison has
    value = headers.index("value")
    page.click(f"#matched th:nth-child({value + 1})")
    shown = [float(v) for v in table_column(page, value)]
    assert shown == pytest.approx(sorted(comparison["value"]), rel=1e-5)
    assert shown != pytest.approx(comparison["value"].tolist(), rel=1e-5)  # the file's order is another
    page.click(f"#matched th:nth-child({value + 1})")
    assert [float(v) for v in table_column(page, value)] == pytest.approx(sorted(comparison["value"], reverse=True), rel=1e-5)
    choose(page, arch="relu", metric="delta_lm_loss", x="l0")
    page.uncheck("#logx")
    view = page.evaluate("location.hash")
    assert view == page.locator("#view").inner_text()
    data, rows = points(page), table_column(page, value)
    browser_page.screenshot("explorer-relu")
    again = browser_page.open(built[0], view[1:])
    assert [again.input_value(f"#{c}") for c in ("arch", "metric", "x")] == ["relu", "delta_lm_loss", "l0"]
    assert not again.is_checked("#logx") and again.evaluate("document.getElementById('plot').layout.xaxis.type") == "linear"
    assert points(again) == data and table_column(again, value) == rows
    assert browser_page.errors == []


def test_flops_and_wall_clock_axes_only_where_the_logs_count_them(tmp_path: Path) -> None:
    files = planted_sweep(tmp_path, flops=False)
    assert set(explorer_data(*files.values())["axes"]) == {"n", "k", "l0", "tokens"}
    data = explorer_data(*planted_sweep(tmp_path / "with", flops=True).values())
    assert set(data["axes"]) == {"n", "k", "l0", "tokens", "flops", "train_seconds"}
    # metrics: what varies within a setting, fitted first; a setting's parameters are not metrics
    assert data["metrics"][:2] == ["nmse", "delta_lm_loss"] and "probe_loss" in data["metrics"]
    assert not {"k", "l1_coef", "seed", "probe_loss_se", "probe_loss_count"} & set(data["metrics"])
    assert set(data["cells"]["se"]) == {"probe_loss"}


@pytest.mark.parametrize("name", ["cells.parquet", "train_logs.parquet", "fits.json", "architectures.csv"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_input_stops_with_one_line_naming_the_file(built: tuple[Path, dict], tmp_path: Path, name: str, damage: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    files = {key: tmp_path / key for key in built[1]}
    for key, path in built[1].items():
        files[key].write_bytes(path.read_bytes())
    if damage == "missing":
        files[name].unlink()
    else:
        files[name].write_bytes(b"PAR1\x00garbage" if name.endswith("parquet") else b"\x00\xff{not a table")
    out = tmp_path / "report" / "explorer.html"
    arguments = ["--cells", files["cells.parquet"], "--logs", files["train_logs.parquet"], "--fits", files["fits.json"],
                 "--architectures", files["architectures.csv"], "--out", out]
    assert main(["explorer", *map(str, arguments)]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(files[name]) in message, message
    assert not out.exists() and not list(tmp_path.glob("report/*"))
