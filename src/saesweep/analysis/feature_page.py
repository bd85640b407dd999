"""A cell's feature browser as one self-contained HTML page (inline CSS, one small inline
script, nothing fetched): an index table of the shown latents, sortable by any numeric
column (click its header: density, largest activation, explanation precision, recall), and
one section per latent (``#latent-{j}``) with its contexts, activation histogram,
explanation and logit effects (``evaluation.features`` says how each is computed).

Every token of a context is one span whose background shades with the latent's value there,
α = z / max z_j (the latent's largest value on the browser's tokens), with the value in its
``data-z`` (and its tooltip); a context's own token is outlined. Token texts are cut to
``MAX_TOKEN_CHARS`` characters and an explanation to ``MAX_PATTERNS`` patterns of at most
``MAX_PATTERN_TOKENS`` tokens, so that the page's size has the bound ``size_bound``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from saesweep.core.files import atomic_path
from saesweep.core.job_settings import FeatureSettings
from saesweep.evaluation.features import Band, Browser, Context, LatentCard

MAX_TOKEN_CHARS = 16
"""Characters of a token's text shown (longer ones end in …)."""
MAX_PATTERNS = 8
"""Explanation patterns shown per latent."""
MAX_PATTERN_TOKENS = 6
"""Tokens of a pattern shown (its last ones: the activating token ends it)."""
WORST_NUMBER = -1.2345e-300
"""The longest number ``number`` writes (for the size bound)."""
WORST_TEXT = '"' * MAX_TOKEN_CHARS + "x"
"""The text whose shown form is the longest (every character escaped to 6 bytes)."""

STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:1em;max-width:1100px}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
    "th{background:#f0f0f0}th[data-key]{cursor:pointer}th[data-key]:after{content:' \\2195';color:#999}"
    "section{border-top:2px solid #888;margin-top:1.5em}h3{font-size:13px;margin:.8em 0 .2em}"
    ".ctx{font-family:monospace;white-space:pre;margin:1px 0;overflow:hidden}"
    ".t{border-radius:2px}.t.hit{outline:1px solid #c00}.v{display:inline-block;width:5em;color:#555}"
    ".k{font-family:monospace;white-space:pre;background:#eee;padding:0 2px}"
    ".row{display:flex;gap:2em;flex-wrap:wrap}.note{color:#555;max-width:60em}svg{background:#fafafa}"
)
SCRIPT = (
    "document.querySelectorAll('#index th[data-key]').forEach(function(th){"
    "th.addEventListener('click',function(){var key=th.dataset.key,body=document.querySelector('#index tbody'),"
    "rows=Array.prototype.slice.call(body.rows),down=th.dataset.order!=='desc';"
    "rows.sort(function(a,b){var x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);return down?y-x:x-y;});"
    "th.dataset.order=down?'desc':'asc';rows.forEach(function(r){body.appendChild(r);});});});"
)


def number(value: float) -> str:
    """A value in 5 significant digits (``nan`` for nan)."""
    return f"{value:.5g}"


def token_html(text: str) -> str:
    """A token's text as shown: newlines as ↵, tabs as →, at most ``MAX_TOKEN_CHARS``
    characters (then …), escaped."""
    text = text.replace("\n", "↵").replace("\t", "→")
    if len(text) > MAX_TOKEN_CHARS:
        text = text[:MAX_TOKEN_CHARS] + "…"
    return html.escape(text)


def token_span(text: str, value: float, peak: float, hit: bool) -> str:
    """One token of a context, shaded by α = value / peak (two decimals)."""
    alpha = min(1.0, max(0.0, value / peak)) if peak > 0 else 0.0
    return (
        f'<span class="t{" hit" if hit else ""}" style="background:rgba(255,102,0,{alpha:.2f})" '
        f'title="z = {number(value)}" data-z="{number(value)}">{token_html(text)}</span>'
    )


def context_html(context: Context, peak: float, texts: dict[int, str]) -> str:
    """A context: its token's value, then its tokens shaded."""
    spans = "".join(
        token_span(texts[token], value, peak, context.start + i == context.position)
        for i, (token, value) in enumerate(zip(context.token_ids, context.values))
    )
    return (
        f'<div class="ctx" data-z="{number(context.value)}" data-window="{context.window}" '
        f'data-position="{context.position}"><span class="v">{number(context.value)}</span>{spans}</div>'
    )


def histogram_svg(edges: list[float], counts: list[int], label: str, marks: Sequence[float] = ()) -> str:
    """Bars of ``counts`` over ``edges`` (240 × 70 px), with the edges' ends and ``label``
    written under them and a tick at each of ``marks``."""
    width, height, bins = 240.0, 50.0, len(counts)
    tallest = max(counts, default=0) or 1
    span = (edges[-1] - edges[0]) or 1.0
    bars = "".join(
        f'<rect x="{i * width / bins:.1f}" y="{height - height * c / tallest:.1f}" '
        f'width="{width / bins:.1f}" height="{height * c / tallest:.1f}" fill="#e67e22"/>'
        for i, c in enumerate(counts)
    )
    ticks = "".join(
        f'<line x1="{width * (m - edges[0]) / span:.1f}" x2="{width * (m - edges[0]) / span:.1f}" '
        f'y1="{height}" y2="{height + 6}" stroke="#333"/>'
        for m in marks
    )
    return (
        f'<svg width="{width:.0f}" height="{height + 22:.0f}" role="img" aria-label="{label}">{bars}{ticks}'
        f'<text x="0" y="{height + 18:.0f}" font-size="10">{number(edges[0])}</text>'
        f'<text x="{width / 2:.0f}" y="{height + 18:.0f}" font-size="10" text-anchor="middle">{label}</text>'
        f'<text x="{width:.0f}" y="{height + 18:.0f}" font-size="10" text-anchor="end">{number(edges[-1])}</text></svg>'
    )


def pattern_html(pattern: list[int], texts: dict[int, str]) -> str:
    """An n-gram pattern as token boxes (its last ``MAX_PATTERN_TOKENS``)."""
    shown = pattern[-MAX_PATTERN_TOKENS:]
    lead = "…" if len(pattern) > len(shown) else ""
    return lead + "".join(f'<span class="k">{token_html(texts[t])}</span>' for t in shown)


def explanation_html(card: LatentCard, texts: dict[int, str]) -> str:
    """The explanation's patterns (at most ``MAX_PATTERNS``; how many more)."""
    if not card.patterns:
        return "none"
    parts = " | ".join(pattern_html(p, texts) for p in card.patterns[:MAX_PATTERNS])
    more = len(card.patterns) - MAX_PATTERNS
    return parts + (f" (+{more} more)" if more > 0 else "")


def logits_html(entries: list[tuple[int, float]], texts: dict[int, str]) -> str:
    """Token boxes with their logit effects, one per line."""
    return "<br>".join(f'<span class="k">{token_html(texts[t])}</span> {number(e)}' for t, e in entries)


def band_html(band: Band, peak: float, texts: dict[int, str], first: bool) -> str:
    """A quantile band's heading (the ``first`` band includes its lower edge) and its contexts."""
    contexts = "".join(context_html(c, peak, texts) for c in band.contexts)
    below = "≤" if first else "&lt;"
    return f"<h3>Random, {number(band.low)} {below} z ≤ {number(band.high)} ({band.size} tokens)</h3>{contexts}"


def latent_section(card: LatentCard, browser: Browser) -> str:
    """One latent's section, anchored ``#latent-{j}``."""
    texts, peak = browser.token_text, card.max_value
    top = "".join(context_html(c, peak, texts) for c in card.top)
    bands = "".join(band_html(b, peak, texts, i == 0) for i, b in enumerate(card.bands))
    return (
        f'<section id="latent-{card.latent}" class="latent"><h2>Latent {card.latent}</h2>'
        f'<p>Fires on {card.count} of {browser.tokens} tokens: density {number(card.density)} '
        f"(log10 {number(math.log10(card.density))}); largest value {number(card.max_value)}, "
        f"mean when firing {number(card.mean_value)}.</p>"
        f'<div class="row"><div><h3>Activation histogram (firing tokens)</h3>'
        f"{histogram_svg(card.histogram_edges, card.histogram_counts, 'z')}</div>"
        f"<div><h3>Promoted tokens</h3>{logits_html(card.promoted, texts)}</div>"
        f"<div><h3>Suppressed tokens</h3>{logits_html(card.suppressed, texts)}</div></div>"
        f"<h3>n-gram explanation: precision {number(card.precision)}, recall {number(card.recall)}</h3>"
        f'<p class="explanation">{explanation_html(card, texts)}</p>'
        f'<h3>Top activations</h3><div class="top">{top}</div>{bands}</section>'
    )


def index_row(card: LatentCard, texts: dict[int, str]) -> str:
    """The index's row of a latent; nan sorts as −1."""
    def key(value: float) -> str:
        return number(-1.0 if math.isnan(value) else value)

    promoted = " ".join(f'<span class="k">{token_html(texts[t])}</span>' for t, _ in card.promoted[:3])
    return (
        f'<tr data-latent="{card.latent}" data-density="{number(card.density)}" data-max="{number(card.max_value)}" '
        f'data-precision="{key(card.precision)}" data-recall="{key(card.recall)}">'
        f'<td><a href="#latent-{card.latent}">{card.latent}</a></td><td>{number(card.density)}</td>'
        f"<td>{number(card.max_value)}</td><td>{number(card.precision)}</td><td>{number(card.recall)}</td>"
        f"<td>{explanation_html(card, texts)}</td><td>{promoted}</td></tr>"
    )


def render(browser: Browser) -> str:
    """The whole page."""
    title = f"Feature browser: {html.escape(browser.cell)} ({html.escape(browser.site)})"
    marks = [math.log10(card.density) for card in browser.latents]
    rows = "".join(index_row(card, browser.token_text) for card in browser.latents)
    sections = "".join(latent_section(card, browser) for card in browser.latents)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{browser.live} of {browser.n_latents} latents fire on the {browser.tokens} held-out tokens "
        f"({browser.windows} windows); {browser.n_latents - browser.live} never do. Shown: {len(browser.latents)} "
        "latents, the most frequent ones and a spread over the frequency range of the others (ticks below the "
        "histogram of log10 density of the live latents).</p>"
        f"{histogram_svg(browser.density_edges, browser.density_counts, 'log10 density', marks)}"
        '<p class="note">Each context shows the latent\'s value z on every token (shading ∝ z / its largest '
        "value; the outlined token is the context's own). The n-gram explanation is made on the first half of "
        "the windows and scored on the second (precision and recall of predicting where the latent fires). "
        f"Promoted and suppressed tokens: {html.escape(browser.logit_note)}.</p>"
        '<table id="index"><thead><tr><th data-key="latent">latent</th><th data-key="density">density</th>'
        '<th data-key="max">max z</th><th data-key="precision">precision</th><th data-key="recall">recall</th>'
        f"<th>explanation</th><th>promotes</th></tr></thead><tbody>{rows}</tbody></table>"
        f"{sections}<script>{SCRIPT}</script></body></html>\n"
    )


def size_bound(settings: FeatureSettings) -> int:
    """An upper bound on the page's bytes for these settings: the parts that do not depend on
    the data, plus per latent its fixed parts and, for each of its at most
    top_contexts + quantile_bands · band_contexts contexts, before + 1 + after token spans of
    the longest form (``WORST_TEXT``, ``WORST_NUMBER``); explanation patterns, logit tokens
    and histogram bars likewise at their longest."""
    worst_span = len(token_span(WORST_TEXT, WORST_NUMBER, 1.0, True).encode())
    worst_box = len(f'<span class="k">{token_html(WORST_TEXT)}</span>'.encode())
    worst_number = len(number(WORST_NUMBER))
    bins = settings.histogram_bins
    histogram = len(histogram_svg([WORST_NUMBER] * (bins + 1), [10**9] * bins, "log10 density", [WORST_NUMBER] * settings.latents).encode())
    contexts = settings.top_contexts + settings.quantile_bands * settings.band_contexts
    context = 200 + 3 * worst_number + 20 * 2 + (settings.context_before + 1 + settings.context_after) * worst_span
    explanation = MAX_PATTERNS * (MAX_PATTERN_TOKENS * worst_box + 6) + 40
    logits = 2 * settings.logit_tokens * (worst_box + worst_number + 4)
    per_latent = (
        contexts * context + settings.quantile_bands * (100 + 3 * worst_number + 20)
        + 2 * explanation + logits + 3 * worst_box + histogram + 1500 + 12 * worst_number + 6 * 20
    )
    fixed = len(STYLE) + len(SCRIPT) + 3000 + 2 * (len(settings.cell) + len(settings.site)) * 6 + 6 * 20 + histogram
    return fixed + settings.latents * per_latent


def write_page(browser: Browser, path: Path) -> int:
    """Write the page atomically; its size in bytes."""
    text = render(browser).encode()
    with atomic_path(path) as temporary:
        temporary.write_bytes(text)
    return len(text)
