"""Architectures compared at matched sparsity, each tuned on validation tokens and reported
on test tokens, with bootstrap intervals; a winner only where the intervals separate.

Settings. A setting is a cell without its seed (``topk-k32-lr0.5``): every parameter of the
architecture, the learning-rate factor and AuxK included, may be a grid. Its point is the
mean over seeds of its cells' (L0, normalised MSE) on each part of the held-out tokens
(``evaluation.heldout_split``: even windows validation, odd windows test).

Envelope. An architecture's frontier at one (site, n) is the lower envelope (Pareto front,
``analysis.envelope``) of its settings' validation points: the settings that no setting of
lower or equal validation L0 beats. Which settings lie on it is decided on validation only;
the values reported are those settings' test points, sorted by test L0.

Matched L0. An architecture's value at an L0 inside [min, max] of its envelope's test L0 is
the linear interpolation of log(nmse) in log(L0) between the two neighbouring envelope
points (the frontier is close to a power law, Gao et al. 2024, Fig. 2); outside it has none.
The L0 values compared at a (site, n) are the test L0 of every envelope point there; a row is
kept where at least two architectures have a value.

Intervals. ``analysis.window_bootstrap`` gives ``replicates`` paired replicates of every
setting's test (nmse, L0), resampling test windows (shared by all cells) and seeds. In each
replicate every envelope is re-sorted by L0 and interpolated at the same matched L0 (an L0
just outside a replicate's range takes its nearest end's value; the settings stay the ones
chosen on validation). An architecture's interval is the 95 % percentile interval of its
replicate values (``core.stats.TAILS_PERCENT``).

Winner. At each matched L0 the candidate is the architecture with the lowest value; it wins
when, for every other architecture with a value there, the 95 % percentile interval of the
paired difference (other − candidate) over the replicates lies above 0. Otherwise the row is
a tie, between the candidate and each architecture whose difference interval contains 0
(per pair at 95 %, without a correction for the number of architectures).

Budget. Per (site, n, architecture): the settings and cells its envelope was chosen from,
their training tokens and training FLOPs (the cells' ``train_flops``: each step as its
architecture runs it, ``sae.flops``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from saesweep.analysis.compute import FLOPS
from saesweep.analysis.envelope import lower_envelope
from saesweep.analysis.window_bootstrap import site_replicates
from saesweep.core.files import atomic_path
from saesweep.core.split import TEST, VALIDATION
from saesweep.core.stats import TAILS_PERCENT

METRIC = "nmse"
"""The metric compared: the one evaluated on both parts with per-window sums."""
GROUP = ["site", "n_latents", "arch"]
SETTING = ["site", "arch", "setting", "n_latents"]
"""A setting's key, in the order of ``window_bootstrap``'s setting keys."""
Replicates = dict[tuple, tuple[np.ndarray, np.ndarray]]
"""Per setting key: its test (nmse_b, l0_b) over the bootstrap replicates."""


def setting_points(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: the seed means of validation and test (L0, nmse), and its seeds."""
    columns = [f"{part}_{name}" for part in (VALIDATION, TEST) for name in ("l0", METRIC)]
    grouped = cells.groupby(SETTING, sort=True)
    points = grouped[columns].mean().join(grouped["seed"].nunique().rename("seeds"))
    return points.reset_index()


def choose_envelopes(points: pd.DataFrame) -> pd.DataFrame:
    """``points`` with ``on_envelope``: whether the setting lies on its (site, n, arch)'s lower
    envelope of validation (L0, nmse), among the settings with both positive."""
    x, y = f"{VALIDATION}_l0", f"{VALIDATION}_{METRIC}"
    chosen: set[tuple] = set()
    for _, group in points[(points[x] > 0) & (points[y] > 0)].groupby(GROUP):
        chosen |= set(lower_envelope(group, x, y)[SETTING].itertuples(index=False, name=None))
    keys = points[SETTING].itertuples(index=False, name=None)
    return points.assign(on_envelope=[key in chosen for key in keys])


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of replicate ``values`` (axis 0); nan without replicates."""
    if len(values) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(values, TAILS_PERCENT)
    return float(lo), float(hi)


def interpolate(l0: np.ndarray, value: np.ndarray, at: np.ndarray, clamp: bool = False) -> np.ndarray:
    """exp of the linear interpolation of log(value) in log(l0) at ``at`` (l0 increasing);
    nan outside [l0[0], l0[-1]] unless ``clamp`` (then the nearest end's value)."""
    result = np.exp(np.interp(np.log(at), np.log(l0), np.log(value)))
    if clamp:
        return result
    return np.where((at >= l0[0]) & (at <= l0[-1]), result, np.nan)


def envelope_values(envelope: pd.DataFrame, replicates: Replicates, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point values (L,), replicate values (B, L)) of one architecture's envelope at ``at``."""
    ordered = envelope.sort_values(f"{TEST}_l0")
    point = interpolate(ordered[f"{TEST}_l0"].to_numpy(), ordered[f"{TEST}_{METRIC}"].to_numpy(), at)
    keys = [tuple(row) for row in ordered[SETTING].itertuples(index=False)]
    nmse = np.stack([replicates[key][0] for key in keys], axis=1)  # (B, settings)
    l0 = np.stack([replicates[key][1] for key in keys], axis=1)
    boot = np.empty((len(nmse), len(at)))
    for b in range(len(nmse)):
        order = np.argsort(l0[b])
        boot[b] = interpolate(l0[b, order], nmse[b, order], at, clamp=True)
    return point, boot


def matched_rows(site: str, n: int, envelopes: dict[str, pd.DataFrame], replicates: Replicates) -> list[dict]:
    """The rows of one (site, n): every architecture's value and interval at each compared L0
    and the verdict (module docstring)."""
    at = np.unique(np.concatenate([e[f"{TEST}_l0"].to_numpy() for e in envelopes.values()]))
    values = {arch: envelope_values(e, replicates, at) for arch, e in envelopes.items()}
    rows = []
    for index, l0 in enumerate(at):
        present = {arch: (point[index], boot[:, index]) for arch, (point, boot) in values.items() if not math.isnan(point[index])}
        if len(present) < 2:
            continue
        best = min(present, key=lambda arch: present[arch][0])
        differences = {arch: percentile_interval(boot - present[best][1]) for arch, (_, boot) in present.items()}
        tied = sorted(arch for arch in present if arch != best and not differences[arch][0] > 0)
        for arch, (point, boot) in present.items():
            lo, hi = percentile_interval(boot)
            envelope = envelopes[arch]
            rows.append({
                "site": site, "n_latents": int(n), "metric": METRIC, "l0": float(l0), "arch": arch,
                "value": float(point), "value_lo": float(lo), "value_hi": float(hi),
                "difference_lo": float(differences[arch][0]), "difference_hi": float(differences[arch][1]),
                "wins": arch == best and not tied, "tie": bool(tied) and (arch == best or arch in tied),
                "l0_min": float(envelope[f"{TEST}_l0"].min()), "l0_max": float(envelope[f"{TEST}_l0"].max()),
                "settings": " ".join(envelope.sort_values(f"{TEST}_l0")["setting"]),
            })
    return rows


TABLE_COLUMNS = [
    "site", "n_latents", "metric", "l0", "arch", "value", "value_lo", "value_hi", "difference_lo",
    "difference_hi", "wins", "tie", "l0_min", "l0_max", "settings",
]


def compare(cells: pd.DataFrame, windows: pd.DataFrame, replicates: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matched-L0 table, every setting's points with ``on_envelope`` and its test interval
    ``test_nmse_lo``/``_hi``, ``test_l0_lo``/``_hi``) of the cells, from ``windows``
    (``window_bootstrap.read_windows``) and ``replicates`` bootstrap replicates, seeded."""
    points = choose_envelopes(setting_points(cells))
    boot: Replicates = {}
    for site in sorted(points["site"].unique()):
        boot |= site_replicates(windows, site, replicates, seed)
    for name in ("nmse", "l0"):
        index = 0 if name == "nmse" else 1
        bounds = np.array([percentile_interval(boot[tuple(key)][index]) for key in points[SETTING].itertuples(index=False)])
        points[f"{TEST}_{name}_lo"], points[f"{TEST}_{name}_hi"] = bounds.reshape(-1, 2).T
    rows = []
    for (site, n), group in points[points["on_envelope"]].groupby(["site", "n_latents"], sort=True):
        envelopes = {arch: e for arch, e in group.groupby("arch", sort=True) if len(e) >= 2}
        if len(envelopes) >= 2:
            rows += matched_rows(site, n, envelopes, boot)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS), points


def tuning_budget(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (site, n, arch): settings, cells, training tokens and training FLOPs (``FLOPS``)."""
    cells = cells.assign(flops=cells["train_flops"] if "train_flops" in cells else np.nan)
    grouped = cells.groupby(GROUP, sort=True)
    return pd.DataFrame({
        "settings": grouped["setting"].nunique(), "cells": grouped.size(),
        "training_tokens": grouped["tokens"].sum(min_count=1), "training_flops": grouped["flops"].sum(min_count=1),
    }).reset_index()


PAPER_ANALYSES = ("refine_nmse_gain", "shrinkage_ratio", "dense_fraction")
"""The per-cell columns of Gao et al.'s §5.1 refinement (``evaluation.refine``) and of dense
latents (``evaluation.density``), summarised per architecture."""


def paper_analyses(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (site, arch): the number of cells and the median [min, max] over its cells of each
    column of ``PAPER_ANALYSES`` it has (a spread over settings and sizes, not an interval)."""
    present = [column for column in PAPER_ANALYSES if column in cells]
    rows = []
    for (site, arch), group in cells.groupby(["site", "arch"], sort=True):
        row: dict[str, object] = {"site": site, "arch": arch, "cells": len(group)}
        for column in present:
            values = group[column].dropna()
            row[column] = (f"{values.median():.3g} [{values.min():.3g}, {values.max():.3g}]" if len(values) else "")
        rows.append(row)
    return pd.DataFrame(rows, columns=["site", "arch", "cells", *present])


def comparison_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (site, n, L0): each architecture's ``value [lo, hi]``, the winner (or "tie")
    and the tied architectures."""
    keys = ["site", "n_latents", "l0"]
    if table.empty:
        return pd.DataFrame(columns=[*keys, "winner", "tied"])
    text = table.assign(shown=[f"{v:.4g} [{lo:.4g}, {hi:.4g}]" for v, lo, hi in table[["value", "value_lo", "value_hi"]].to_numpy()])
    wide = text.pivot(index=keys, columns="arch", values="shown")
    wide.columns.name = None
    winner = table[table["wins"]].set_index(keys)["arch"].rename("winner")
    tied = table[table["tie"]].groupby(keys)["arch"].agg(lambda archs: ", ".join(sorted(archs))).rename("tied")
    wide = wide.join(winner).join(tied)
    wide["winner"] = wide["winner"].fillna("tie")
    wide["tied"] = wide["tied"].fillna("")
    return wide.reset_index()


PAGE_INTRO = (
    "<p>Each architecture's settings (every grid value, the learning-rate factor included) are "
    "points (L0, normalised MSE) on two disjoint halves of the held-out tokens: even windows "
    "(validation) and odd windows (test). Its frontier is the lower envelope of its validation "
    "points; the values below are those settings' test points, interpolated (log-log) at each "
    "compared L0, never outside an envelope's L0 range. Intervals: 95 % percentile bootstrap "
    "over test windows (shared by every cell, so differences are paired) and over seeds where a "
    "setting has several. An architecture wins only where the 95 % interval of its difference to "
    "every other one excludes 0; otherwise the row says tie and names who is tied. Lower wins.</p>"
)


SINGLE_SEED = (
    "<p><b>One seed per setting:</b> the intervals hold the variation over held-out tokens only, "
    "not over retraining; a winner here may not survive another seed (add seeds to "
    "<code>sweep.seeds</code>).</p>"
)


def write_comparison(
    cells_path: Path, windows_path: Path, csv_path: Path, frontiers_path: Path, html_path: Path,
    replicates: int, seed: int = 0,
) -> pd.DataFrame:
    """The comparison (``compare``) as CSV, every setting's points as ``frontiers_path`` (CSV,
    for the figure), and an HTML page: the matched-L0 table with winners or ties, the
    envelopes and the tuning budget of every architecture."""
    cells = pd.read_parquet(cells_path)
    table, points = compare(cells, pd.read_parquet(windows_path), replicates, seed)
    with atomic_path(csv_path) as temporary:
        table.to_csv(temporary, index=False)
    with atomic_path(frontiers_path) as temporary:
        points.to_csv(temporary, index=False)
    html = lambda frame: frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)  # noqa: E731
    budget = tuning_budget(cells)
    sections = [f"<h2>{METRIC} at matched L0 (test windows)</h2>"]
    if points["seeds"].max() == 1:
        sections.append(SINGLE_SEED)
    if table.empty:
        sections.append(
            "<p>No L0 at which two architectures can be compared: each needs at least two settings on "
            "its envelope at a dictionary size, and their L0 ranges must overlap.</p>"
        )
    else:
        sections.append(html(comparison_summary(table)))
    envelope = points[points["on_envelope"]].drop(columns="on_envelope")
    sections += [
        "<h2>Envelopes: the settings chosen on validation windows</h2>", html(envelope),
        f"<h2>Tuning budget of each architecture</h2><p>Training FLOPs = {FLOPS}: each architecture's "
        "step as it runs (TopK's sparse decode, Gated's two encoder paths, Matryoshka's prefixes).</p>",
        html(budget),
        "<h2>Refinement and dense latents</h2><p>Per architecture, the median [min, max] over its cells of: "
        "refine_nmse_gain, the share of the NMSE removed when each token's code values are refitted by "
        "non-negative least squares on the same support (Gao et al. 2024, §5.1); shrinkage_ratio, the refitted "
        "values' sum over the encoder's (above 1: the encoder shrinks its values, as an L1 penalty does); and "
        "dense_fraction, the latents firing on more than 10 % of the held-out tokens.</p>",
        html(paper_analyses(cells)),
    ]
    page = (
        "<html><head><meta charset='utf-8'><title>Architectures at matched L0</title></head><body>"
        "<h1>Architectures at matched L0</h1>" + PAGE_INTRO + "".join(sections) + "</body></html>"
    )
    with atomic_path(html_path) as temporary:
        Path(temporary).write_text(page)
    return table
