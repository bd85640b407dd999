"""The results explorer: one self-contained HTML page of a sweep (``report/explorer.html``).

The page holds three scripts inline and loads nothing: plotly.js (the minified bundle of the
installed ``plotly`` package), the sweep's data as JSON (``analysis.explorer_data``) and
``explorer.js``, under two hundred lines that fill the selectors (site, architecture, n,
sparsity setting, metric, x-axis, which law; log axes), build the traces and hand them to
``Plotly.react``, keep the view in the URL fragment and sort the matched-L0 table.

Why plotly: it is a maintained library that draws interactive log-axis scatter plots, bands and
hover labels in the browser, it is already installed with sae-lens, and its bundle can be
inlined whole so the page opens from disk without a network. Vega-Lite would need four
libraries inlined (vega, vega-lite, vega-embed and altair to write the spec). The bundle is
most of the page (plotly.min.js is about 4.7 MB); the data of the default sweep add tens of kB.
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path

from plotly.colors import qualitative
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from saesweep.analysis.explorer_data import explorer_data, to_script_json
from saesweep.core.files import atomic_path

STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:1em}"
    "#controls label{margin-right:1em;white-space:nowrap}#plot{height:560px}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 6px}"
    "th{background:#f0f0f0;cursor:pointer}th[aria-sort=ascending]::after{content:' ▲'}"
    "th[aria-sort=descending]::after{content:' ▼'}code{background:#f6f6f6}#table{max-height:420px;overflow:auto;display:inline-block}"
)
CONTROLS = (
    ("site", "site"), ("arch", "architecture"), ("n", "n"), ("curve", "sparsity setting"),
    ("metric", "metric"), ("x", "x-axis"), ("law", "fitted law"),
)
"""(element id, label) of each selector; ``explorer.js`` fills their options."""
CHECKS = (("logx", "log x"), ("logy", "log y"), ("curves", "training curves (nmse over tokens, FLOPs, seconds)"))
"""(element id, label) of each check box, all checked at first."""
PALETTE = qualitative.D3 + qualitative.Dark24
"""Colours of the plotted lines (34 before one repeats), in order of their names; a law takes its line's."""
SIZE_BOUND = 5_500_000
"""Bytes the page stays under on the default sweep (README): plotly.js is 4.8 MB of it."""


def page(data: dict) -> str:
    """The explorer's HTML for ``explorer_data``'s ``data``."""
    selects = "".join(f"<label>{label} <select id='{key}'></select></label>" for key, label in CONTROLS)
    checks = "".join(f"<label><input type='checkbox' id='{key}' checked> {text}</label>" for key, text in CHECKS)
    script = files("saesweep.analysis").joinpath("explorer.js").read_text(encoding="utf-8")
    title = f"Results explorer · run {data['run']}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h2>{html.escape(title)}</h2><div id='controls'>{selects}{checks}</div><div id='plot'></div>"
        "<p>Points are cells (hover: name, settings hash, commit; error bars: the metric's standard error "
        "where evaluated); thin lines, the held-out nmse of each cell during training. Over n and k the fitted laws are drawn with their 95% bands: solid when ok, dashed "
        "when not resolved, dotted without band when contradicted; the notes below give the reason of every "
        "law that is not ok.</p><ul id='notes'></ul>"
        "<p>This view: <code id='view'></code> (add it to this page's address to share it).</p>"
        "<h3>Architectures at matched L0</h3><p>Click a column's name to sort.</p>"
        "<div id='table'><table id='matched'><thead><tr></tr></thead><tbody></tbody></table></div>"
        f"<p><small>Drawn with plotly.js {html.escape(get_plotlyjs_version())} (inline).</small></p>"
        f"<script type='application/json' id='explorer-data'>{to_script_json({**data, 'palette': PALETTE})}</script>"
        f"<script>{script}</script></body></html>\n"
    )


def write_explorer(cells: Path, logs: Path, fits: Path, table: Path, out: Path) -> int:
    """Read the sweep's files (every one, before writing anything), write the page atomically
    and return its size in bytes."""
    text = page(explorer_data(cells, logs, fits, table))
    with atomic_path(out) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))
