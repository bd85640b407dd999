"""The report's tables: every fitted law in one table (CSV and HTML), and the run's resolved
configuration with its provenance (YAML and HTML).

Snakemake's report embeds HTML results as they are, so each table is written as a small
self-contained HTML page next to its machine-readable twin.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from saesweep.analysis.convergence_fits import report_rows as convergence_rows
from saesweep.core.files import atomic_path
from saesweep.core.provenance import provenance

STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:1em}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;"
    "vertical-align:top}th{background:#f0f0f0}"
    "tr.skipped td{color:#777}tr.contradicted td{background:#fff4d6;font-style:italic}"
    "tr.not-resolved td{background:#eef2fb}"
    "tr.flagged td{background:#fde8e8}pre{background:#f6f6f6;padding:.8em}"
)
FIT_COLUMNS = [
    "site", "arch", "metric", "law", "at", "status", "parameters (95% CI)", "cells", "premise",
    "LOO error", "comparison", "held-out check", "flagged", "formula", "reason",
]


def _parameters(entry: dict) -> str:
    """"name = value [lo, hi]" for each parameter of a fitted law entry."""
    parts = []
    for name in entry["param_names"]:
        value, interval = entry["params"][name], entry["ci95"][name]
        text = f"{name} = {value:.4g}" if value is not None else f"{name} = n/a"
        if None not in interval:
            text += f" [{interval[0]:.4g}, {interval[1]:.4g}]"
        parts.append(text)
    return "; ".join(parts)


def _held_out(entry: dict) -> tuple[str, bool | None]:
    """The fit-without-the-largest-n check of a law over n, in words, and whether it is flagged."""
    validation = entry.get("validation")
    if validation is None:
        return "", None
    if validation["status"] != "ok":
        return f"skipped: {validation['reason']}", None
    cells = ", ".join(
        f"{'k=' + str(c['k']) if 'k' in c else 'n=' + str(c['n'])}: {c['predicted']:.3g} vs {c['observed']:.3g} observed ({c['rel_error']:+.1%})"
        for c in validation["cells"]
        if c["predicted"] is not None
    )
    verdict = "inside the interval" if validation["within_interval"] else "OUTSIDE the interval"
    return f"n={validation['holdout_n']} predicted from smaller n: {cells}; {verdict}", validation["flagged"]


def _premise(entry: dict) -> str:
    """The measured fall of a fitted law over each of its variables' observed range, in words."""
    joint = len(entry["premise"]["falls_with"]) > 1
    parts = []
    for variable, check in entry["premise"]["falls_with"].items():
        lo, hi = check["range"]
        fall = "n/a" if check["fall"] is None else f"{check['fall']:.1%}"
        rises = ", rises in part" if check["rises"] and check["fall"] is not None and check["fall"] > 0 else ""
        parts.append(f"{'least ' if joint else ''}fall over {variable} = {lo}…{hi}: {fall}{rises}")
    return "; ".join(parts)


def _comparison(laws: dict, form: str) -> str:
    """The leave-one-out comparison of a pure law and its law with floor
    (``model_choice.compare``), as seen from the row of ``form``."""
    comparison = laws["comparison"]
    if comparison["verdict"] is None:
        return f"not possible: {comparison['reason']}"
    strength = f"LOO ratio pure/floor = {comparison['ratio']:.3g}" if comparison["ratio"] is not None else "LOO ratio unbounded"
    if comparison["preferred"] is None:
        return f"{comparison['verdict']} ({strength}; the lower: {laws[comparison['better']]['law']})"
    if comparison["preferred"] == form:
        return f"preferred ({strength})"
    return f"{laws[comparison['preferred']]['law']} preferred ({strength})"


def _law_row(site: str, arch: str, metric: str, at: str, entry: dict, comparison: str = "") -> dict[str, Any]:
    row = {"site": site, "arch": arch, "metric": metric, "law": entry.get("law", ""), "at": at}
    row.update(status=entry["status"], formula=entry.get("formula", ""), reason=entry.get("reason", ""))
    row["comparison"] = comparison
    if "params" in entry:
        check, flagged = _held_out(entry)
        row.update({"parameters (95% CI)": _parameters(entry), "cells": entry["n_cells"]})
        row.update({"premise": _premise(entry), "LOO error": entry.get("loo_mse")})
        row.update({"held-out check": check, "flagged": flagged})
    return row


def fit_table(fits: dict) -> pd.DataFrame:
    """One row per law of a ``fit_scaling_laws`` result: L(n) at each k, L(k) at each n (pure
    power law and law with floor, each with the pair's leave-one-out comparison) and the joint L(n, k),
    per (site, arch) group and metric; a metric that could not be fitted at all is one row with
    its reason; then the laws in C of each compute frontier (``compute``), if any, the laws of
    the training budget (``convergence_fits``: tokens to convergence, n_opt(C)) and ΔLM loss
    against NMSE per group (``loss_law``), if fitted."""
    rows = []
    for group in fits["groups"]:
        site, arch = group["site"], group["arch"]
        for metric, fitted in group["metrics"].items():
            if fitted["status"] != "ok":
                rows.append({"site": site, "arch": arch, "metric": metric, "status": "skipped", "reason": fitted["reason"]})
                continue
            for section, prefix in (("vs_n", ""), ("vs_k", "n=")):
                for value, laws in fitted[section].items():
                    for form in ("power", "floor"):
                        at = f"{prefix}{value}"  # vs_n: the curve (k32, l0.3); vs_k: the n
                        rows.append(_law_row(site, arch, metric, at, laws[form], _comparison(laws, form)))
            rows.append(_law_row(site, arch, metric, "all cells", fitted["joint"]))
    for group in fits.get("compute_frontier", {}).get("groups", []):
        laws = group["laws"]
        for form in ("power", "floor"):
            at = f"{group['curve']}: frontier in C"
            rows.append(_law_row(group["site"], group["arch"], "heldout_nmse", at, laws[form], _comparison(laws, form)))
    rows += convergence_rows(fits)
    for group in fits.get("loss_law", {}).get("groups", []):  # ΔLM loss against NMSE (``loss_law``)
        entry = group["law"]
        row = {"site": group["site"], "arch": group["arch"], "metric": "delta_lm_loss", "law": entry["law"],
               "at": "all cells, against nmse", "status": entry["status"], "formula": entry["formula"],
               "reason": entry.get("reason", ""), "cells": entry["n_cells"]}
        if "params" in entry:
            row["parameters (95% CI)"] = _parameters(entry)
        rows.append(row)
    return pd.DataFrame(rows, columns=FIT_COLUMNS).astype({"cells": "Int64", "LOO error": float})


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"
    )


def _marks(row: pd.Series) -> dict[str, bool]:
    """The CSS classes of a fit-table row: a skipped law, one contradicting its premise, one whose
    exponent's interval includes 0, a flagged held-out check (a contradicted law may be flagged
    as well)."""
    return {
        "skipped": row.get("status") == "skipped",
        "contradicted": row.get("status") == "contradicted",
        "not-resolved": row.get("status") == "not resolved",
        "flagged": row.get("flagged") is True,
    }


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for _, row in table.iterrows():
        kinds = [name for name, marked in _marks(row).items() if marked]
        cells = "".join(f"<td>{'' if pd.isna(v) else html.escape(str(v))}</td>" for v in row)
        body.append(f"<tr class='{' '.join(kinds)}'>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_fit_table(fits: dict, csv_path: Path, html_path: Path) -> None:
    """``fit_table(fits)`` as CSV and as an HTML page (flagged held-out checks in red, laws that
    contradict their premise in amber italics, laws not resolved in blue)."""
    table = fit_table(fits)
    with atomic_path(csv_path) as temporary:
        table.to_csv(temporary, index=False)
    note = (
        f"<p>Intervals ({fits['level']:.0%}): the wider of a parametric bootstrap ({fits['bootstrap']} "
        f"replicates simulated from the fitted law, seed {fits['seed']}) and the linearised "
        "least-squares interval with a t quantile. "
        "A law over n is refitted without the largest n and asked to predict it; a prediction "
        "outside its interval is flagged (red row). Every law claims that the loss falls with its "
        f"variable(s) by more than {fits['min_fall']:.0%} over the observed range; a fit that rises "
        "or falls less is <i>contradicted</i> (amber italic row, reason given) and is not a scaling law. "
        "A law whose exponent's interval includes 0 is <i>not resolved</i> (blue row): the data do not "
        "exclude a flat curve. Where a pure power law and a law with floor are fitted to the same cells, "
        "each is refitted without each cell in turn and predicts it (LOO error: mean squared log "
        f"error); one is preferred when its LOO error is over {fits['loo_ratio']:g} times smaller, "
        "otherwise the data cannot tell.</p>"
    )
    with atomic_path(html_path) as temporary:
        temporary.write_text(_page("Fitted scaling laws", note + _html_table(table)), encoding="utf-8")


def write_run_config(config: dict, yaml_path: Path, html_path: Path) -> None:
    """The run's validated configuration (defaults filled) with its provenance (package version,
    git commit, config hash), as YAML and as an HTML page."""
    stamp = provenance(config)
    stamp["config_hash"] = stamp.pop("settings_hash")
    document = {"provenance": stamp, "config": config}
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    with atomic_path(yaml_path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    title = f"Configuration of run {config.get('run', '')}"
    with atomic_path(html_path) as temporary:
        temporary.write_text(_page(title, f"<pre>{html.escape(text)}</pre>"), encoding="utf-8")
