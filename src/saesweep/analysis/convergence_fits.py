"""Two laws of the training budget: tokens to convergence against n, and the compute-optimal
dictionary size n_opt against training compute C (fits.json key ``convergence``).

Tokens to convergence: the cells trained with ``train.budget.mode: converge`` whose criterion
ended them (``converged``; ``train.convergence`` states it) give T_conv(n), the seeds of a
cell averaged; per (site, arch, curve) with at least 3 distinct n,

    T_conv(n) = a · n^β          (Gao et al. 2024 report β ≈ 0.6 for GPT-2 small),

which is what the default token rule ``train.tokens.n_exponent`` assumes. A stop lies on the
held-out grid (points a factor 2^(1/W) apart), so each T_conv is known to that factor only;
the interval below does not include this rounding (with few sizes it can be the larger
uncertainty: over a factor 4 of n, one grid step at each end moves β by ±1/(2W)). Cells the cap ended
(``converged`` false) are left out and counted (``n_capped``): they would have taken more
tokens than their cap, so leaving them out biases β downwards when they are the largest n.

Compute-optimal size: on each compute frontier of ``analysis.compute`` (the held-out points
no point of smaller compute beats) the size of the point at C is the best of the sweep's sizes
at C, a staircase in C. A size n enters the frontier at C_in(n), the least compute at which a
point of n is on it: from there n beats the smaller sizes. Over every size that enters but the
smallest (whose first point is simply the cheapest one, not a crossing),

    n_opt(C_in) = a · C_in^β,

beside L(C) fitted to the same frontier; at least 3 entering sizes are needed. Fitting every
frontier point instead would bias β towards 0: beyond the largest size's entry the staircase
stays at the largest size whatever C, and below the second size's entry at the smallest.

Both are the pure power law a·x^(−b) of ``analysis.laws`` (β = −b) fitted in log space by
``analysis.fitting``, with the 95 % interval of ``analysis.bootstrap`` (the union of the
parametric bootstrap's and the linearised one), one observation per distinct x.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from saesweep.analysis.bootstrap import fit_rng, parameter_intervals, parametric_samples
from saesweep.analysis.compute import GROUP, MIN_SIZES, compute_points, frontier
from saesweep.analysis.fitting import fit_law, linearise
from saesweep.analysis.laws import LAWS, to_public, unresolved
from saesweep.analysis.premise import num
from saesweep.core.stats import LEVEL

MIN_DISTINCT = 3
"""Distinct x a power law with its two parameters and an interval needs (p + 1)."""
TOKENS_LAW = "tokens_to_converge = a * n^beta"
N_OPT_LAW = "n_opt = a * C^beta"


def power_fit(x: np.ndarray, y: np.ndarray, bootstrap: int, rng: np.random.Generator) -> dict:
    """y = a·x^β fitted to one observation per distinct x (see the module docstring):
    {"status": "ok" (or "not resolved" with a ``reason`` when β's interval includes 0),
    "params": {"a", "beta"}, "ci95": {"a": [lo, hi], "beta": [lo, hi]}, "n_points", "bootstrap"}
    or {"status": "skipped", "reason"}."""
    law = LAWS["power_n"]
    nk = np.column_stack([np.asarray(x, dtype=np.int64), np.ones(len(x), dtype=np.int64)])
    if len(np.unique(nk[:, 0])) < MIN_DISTINCT:
        return {"status": "skipped", "reason": f"{len(np.unique(nk[:, 0]))} distinct x, need at least {MIN_DISTINCT}"}
    fit = fit_law(law, nk, np.asarray(y, dtype=float))
    if isinstance(fit, str):
        return {"status": "skipped", "reason": fit}
    samples = parametric_samples(fit, bootstrap, rng)
    (a, b), (lo, hi) = to_public(law, fit.theta), parameter_intervals(fit, samples, linearise(fit))
    entry = {
        "status": "ok",
        "params": {"a": num(a), "beta": num(-b)},
        "ci95": {"a": [num(lo[0]), num(hi[0])], "beta": [num(-hi[1]), num(-lo[1])]},
        "n_points": len(x),
        "bootstrap": {"kind": "parametric", "requested": bootstrap, "succeeded": len(samples)},
    }
    reason = unresolved(entry["ci95"]["beta"], "β", "the growth with x")
    return entry | ({"status": "not resolved", "reason": reason} if reason else {})


def tokens_to_converge_fits(cells: pd.DataFrame, bootstrap: int, seed: int) -> dict:
    """Per (site, arch, curve) of the converge-mode cells: the cells' mean tokens to
    convergence per n, how many the cap ended, and T_conv(n) = a·n^β."""
    out: dict = {"law": TOKENS_LAW, "groups": []}
    if "converged" not in cells.columns or not cells["converged"].notna().any():
        out["reason"] = "no cell trained with train.budget.mode converge"
        return out
    trained = cells[cells["converged"].notna()]
    for (site, arch, curve), group in trained.groupby(GROUP, sort=True):
        done = group[group["converged"].astype(bool)]
        means = done.groupby("n_latents")["tokens_to_converge"].mean()
        entry = {
            "site": site, "arch": arch, "curve": curve,
            "points": [{"n": int(n), "tokens": float(t)} for n, t in means.items()],
            "capped": sorted(int(n) for n in group.loc[~group["converged"].astype(bool), "n_latents"]),
            "n_capped": int((~group["converged"].astype(bool)).sum()),
        }
        entry |= power_fit(means.index.to_numpy(), means.to_numpy(), bootstrap, fit_rng(seed, "tokens", site, arch, curve))
        out["groups"].append(entry)
    return out


def n_opt_fits(logs: pd.DataFrame, bootstrap: int, seed: int) -> dict:
    """Per (site, arch, curve) with held-out points at ``compute.MIN_SIZES`` or more sizes: the
    frontier's (C, n), each size's entry (C_in, n) and n_opt(C_in) = a·C_in^β over the entries
    but the smallest size's."""
    out: dict = {"law": N_OPT_LAW, "groups": []}
    for (site, arch, curve), group in compute_points(logs).groupby(GROUP, sort=True):
        if group["n_latents"].nunique() < MIN_SIZES:
            continue
        edge = frontier(group)
        entry = {
            "site": site, "arch": arch, "curve": curve,
            "points": [{"compute": float(c), "n": int(n)} for c, n in edge[["compute", "n_latents"]].itertuples(index=False)],
            "sizes_on_frontier": sorted(int(n) for n in edge["n_latents"].unique()),
        }
        entries = edge.groupby("n_latents")["compute"].min().iloc[1:]  # the smallest size's first point is no crossing
        entry["entries"] = [{"compute": float(c), "n": int(n)} for n, c in entries.items()]
        if len(entries) < MIN_DISTINCT:
            entry |= {"status": "skipped", "reason": f"{len(entries)} size(s) enter the frontier after the smallest, "
                                                     f"n_opt(C) needs at least {MIN_DISTINCT}"}
        else:
            entry |= power_fit(entries.round().to_numpy(), entries.index.to_numpy(), bootstrap,
                               fit_rng(seed, "n_opt", site, arch, curve))
        out["groups"].append(entry)
    return out


def fit_convergence(cells: pd.DataFrame, logs: pd.DataFrame, bootstrap: int, seed: int = 0) -> dict:
    """fits.json's ``convergence``: {"tokens_to_converge": …, "n_opt": …} (see the functions)."""
    return {
        "level": LEVEL,
        "tokens_to_converge": tokens_to_converge_fits(cells, bootstrap, seed),
        "n_opt": n_opt_fits(logs, bootstrap, seed),
    }


def report_rows(fits: dict) -> list[dict]:
    """The report table's rows (``analysis.report.FIT_COLUMNS``) of fits.json's ``convergence``."""
    rows = []
    convergence = fits.get("convergence", {})
    for key, at in (("tokens_to_converge", "{curve}: converged cells"), ("n_opt", "{curve}: frontier entries")):
        section = convergence.get(key, {})
        for group in section.get("groups", []):
            row = {"site": group["site"], "arch": group["arch"], "metric": key, "law": section["law"],
                   "at": at.format(curve=group["curve"]), "status": group["status"], "formula": section["law"],
                   "reason": group.get("reason", "")}
            if group["status"] in ("ok", "not resolved"):
                row["parameters (95% CI)"] = "; ".join(_shown(name, group) for name in ("a", "beta"))
                row["cells"] = group["n_points"]
            if group.get("n_capped"):
                capped = f"{group['n_capped']} cell(s) ended by the cap left out (n = {group['capped']})"
                row["reason"] = "; ".join(part for part in (row["reason"], capped) if part)
            rows.append(row)
    return rows


def _shown(name: str, group: dict) -> str:
    """"name = value [lo, hi]" of one parameter of a fitted group (n/a where not finite)."""
    value, (lo, hi) = group["params"][name], group["ci95"][name]
    text = f"{name} = {'n/a' if value is None else f'{value:.4g}'}"
    return text if lo is None or hi is None else f"{text} [{lo:.4g}, {hi:.4g}]"
