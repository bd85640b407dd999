"""The feature browser on the tiny LM: its numbers against the codes computed here, its size
bound, its config and DAG, and the page in a real browser (Chromium through Playwright)."""

from __future__ import annotations

import html
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import CPU, make_text, snakemake, tiny_config, write_config
from saesweep.analysis.feature_page import render, size_bound, token_html, write_page
from saesweep.cli import main as cli_main
from saesweep.core.errors import UserError
from saesweep.core.files import write_json
from saesweep.core.job_settings import FeatureSettings, ModelSettings, to_json
from saesweep.data.activations import ActivationStore, extract
from saesweep.data.corpus import prepare_corpus
from saesweep.data.lm import capture_sites, load_lm, unembedding
from saesweep.evaluation.features import Browser, build_browser, select_latents
from saesweep.plan.config import validate_config
from saesweep.plan.settings import corpus_dir, extraction_settings, feature_settings
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.export import save_sae
from saesweep.sae.registry import build_sae, resolve_params

SITE, SKIP, WINDOWS, CONTEXT = "resid1", 1, 12, 24


def tiny_settings(model: Path, **changes: object) -> FeatureSettings:
    """Settings small enough for the tiny LM's 12 × 23 tokens."""
    settings = FeatureSettings(
        latents=7, most_frequent=2, windows=WINDOWS, top_contexts=4, quantile_bands=3, band_contexts=2,
        context_before=5, context_after=2, logit_tokens=5, histogram_bins=8, batch_size=37, site=SITE,
        cell="topk-n96-k6-s0", seed=0, model=ModelSettings(str(model), None, None, "float32", False, None),
        eval_activations="unused", device="cpu",
    )
    return replace(settings, **changes)


def make_sae(arch: str, activations: torch.Tensor) -> SparseAutoencoder:
    """A 96-latent SAE initialised from the activations (no training: the browser only reads codes)."""
    d = activations.shape[1]
    sae = build_sae(arch, d, 96, resolve_params(arch, {"k": 6} if arch == "topk" else {"l1_coef": 0.01}, "test"))
    sae.set_normalisation(activations.mean(dim=0), float(activations.std()))
    sae.initialise(sae.normalise(activations), torch.Generator().manual_seed(2))
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def lm_and_tokens(tiny_model: Path):
    lm, tokenizer = load_lm(ModelSettings(str(tiny_model), None, None, "float32", False, None), CPU)
    ids = torch.tensor(tokenizer(make_text(3, 80))["input_ids"][: WINDOWS * CONTEXT]).reshape(WINDOWS, CONTEXT)
    activations = capture_sites(lm, ids, [SITE])[SITE][:, SKIP:].float().reshape(-1, lm.config.hidden_size)
    return lm, tokenizer, ids[:, SKIP:], activations


def browse(lm_and_tokens, arch: str, model: Path) -> tuple[Browser, torch.Tensor, FeatureSettings, SparseAutoencoder]:
    """The browser of a fresh SAE on the tiny tokens, the codes (T, n) computed here at once,
    the settings and the SAE."""
    lm, tokenizer, windows, activations = lm_and_tokens
    sae = make_sae(arch, activations)
    settings = tiny_settings(model)
    browser = build_browser(
        sae, activations, windows, settings, unembedding(lm), lambda ids: [tokenizer.decode([t]) for t in ids],
    )
    return browser, sae.encode(sae.normalise(activations)).to_dense(), settings, sae


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_contexts_densities_and_histograms_are_the_codes(lm_and_tokens, tiny_model: Path, arch: str) -> None:
    """Every shown value is the latent's code at that token; the top contexts are the largest
    codes in order; random contexts lie in their quantile band; density is the firing fraction."""
    browser, codes, settings, _ = browse(lm_and_tokens, arch, tiny_model)
    windows, width = lm_and_tokens[2], lm_and_tokens[2].shape[1]
    assert len(browser.latents) == settings.latents and browser.tokens == len(codes) == WINDOWS * width
    assert browser.live == int((codes > 0).any(dim=0).sum())
    for card in browser.latents:
        column = codes[:, card.latent]
        assert card.count == int((column > 0).sum()) and card.density == pytest.approx((column > 0).float().mean().item())
        assert card.max_value == pytest.approx(column.max().item(), rel=1e-5)
        expected_top = torch.sort(column, descending=True, stable=True)
        assert [c.value for c in card.top] == pytest.approx(expected_top.values[: settings.top_contexts].tolist(), rel=1e-5)
        assert [c.window * width + c.position for c in card.top] == expected_top.indices[: settings.top_contexts].tolist()
        contexts = card.top + [c for band in card.bands for c in band.contexts]
        for context in contexts:
            rows = [context.window * width + p for p in range(context.start, context.start + len(context.values))]
            assert context.values == pytest.approx(column[rows].tolist(), rel=1e-5, abs=1e-6)
            assert context.token_ids == windows[context.window, context.start : context.start + len(rows)].tolist()
            assert context.start == max(0, context.position - settings.context_before)
        for band in card.bands:
            assert all(band.low - 1e-6 <= c.value <= band.high + 1e-6 and c.value > 0 for c in band.contexts)
            assert len(band.contexts) == min(settings.band_contexts, band.size)
        assert sum(band.size for band in card.bands) >= card.count  # every firing token is in a band
        assert sum(card.histogram_counts) == card.count


def test_latent_choice_takes_the_most_frequent_then_spans_the_frequency_range() -> None:
    counts = torch.tensor([0, 5, 9, 1, 0, 9, 3, 2, 7, 4, 1, 6])
    chosen = select_latents(counts, 6, 2).tolist()
    assert chosen[:2] == [2, 5]  # the two largest counts, ties by the lower index
    rest = chosen[2:]  # of counts 1,1,2,3,4,5,6,7 (latents 3,10,7,6,9,1,11,8): ranks 0, 2, 5, 7
    assert rest == [3, 7, 1, 8]
    assert select_latents(counts, 20, 2).tolist()[2:] == [3, 10, 7, 6, 9, 1, 11, 8]  # every live latent once
    assert select_latents(torch.zeros(4, dtype=torch.int64), 3, 1).tolist() == []


def test_logit_effects_rank_tokens_like_the_final_norm_and_unembedding(lm_and_tokens, tiny_model: Path) -> None:
    """The promoted (suppressed) tokens are those of the largest (smallest) logits the LM's own
    final norm and head give its unit decoder direction (an RMSNorm scales a vector by a
    positive number, so the ranking is that of W_U (γ ⊙ u))."""
    lm = lm_and_tokens[0]
    original = lm.model.norm.weight.clone()
    with torch.no_grad():  # a norm scale γ that is not all ones, so that leaving it out shows
        lm.model.norm.weight.copy_(torch.rand(len(original), generator=torch.Generator().manual_seed(1)) + 0.2)
    try:
        browser, _, settings, sae = browse(lm_and_tokens, "topk", tiny_model)
    finally:
        with torch.no_grad():
            lm.model.norm.weight.copy_(original)
    for card in browser.latents[:3]:
        direction = sae.W_dec[card.latent]
        with torch.no_grad():
            lm.model.norm.weight.copy_(torch.rand(len(original), generator=torch.Generator().manual_seed(1)) + 0.2)
            logits = lm.lm_head(lm.model.norm(direction / direction.norm()))
            lm.model.norm.weight.copy_(original)
        assert [t for t, _ in card.promoted] == logits.topk(settings.logit_tokens).indices.tolist()
        assert [t for t, _ in card.suppressed] == (-logits).topk(settings.logit_tokens).indices.tolist()


def test_page_stays_within_its_size_bound(lm_and_tokens, tiny_model: Path) -> None:
    """The page is within ``size_bound`` for the tiny settings, and stays so when every token's
    text is of the longest kind; the default settings' bound is the one README states."""
    browser, _, settings, _ = browse(lm_and_tokens, "relu", tiny_model)
    page = render(browser).encode()
    assert len(page) <= size_bound(settings)
    worst = replace(browser, token_text={t: '"' * 40 for t in browser.token_text})
    assert len(page) < len(render(worst).encode()) <= size_bound(settings)
    config = validate_config(tiny_config(Path("m"), Path("c")))
    defaults = feature_settings(config, "resid2", "topk-n64-k4-s0")
    assert size_bound(defaults) < 2_600_000


def test_cli_writes_the_page_of_a_cell_from_its_held_out_shards(tmp_path: Path, tiny_model: Path, tiny_corpus: Path, monkeypatch) -> None:
    """``saesweep features`` on extracted held-out shards: the values on the page are the codes
    of the LM's activations at the tokens the page shows (windows and activations aligned)."""
    monkeypatch.chdir(tmp_path)
    config = validate_config(tiny_config(tiny_model, tiny_corpus, **{"features.windows": 8}))
    prepare_corpus(config["corpus"], Path(corpus_dir(config)))
    extract(extraction_settings(config, "eval", device="cpu"))
    settings = feature_settings(config, "resid2", "topk-n64-k4-s0")
    store = ActivationStore(settings.eval_activations)
    sae = make_sae("topk", store.head(2000, CPU))
    folder = tmp_path / "cell"
    save_sae(sae, folder, {"arch": "topk", "d": 32, "n_latents": 96, "params": dict(sae.params), "site": "resid2", "seed": 0})
    write_json(tmp_path / "features_settings.json", to_json(settings))
    out = tmp_path / "features" / "index.html"
    assert cli_main(["features", "--settings", "features_settings.json", "--cell", str(folder), "--out", str(out)]) == 0
    page = out.read_text()
    lm, tokenizer = load_lm(settings.model, CPU)
    skip = store.manifest["skip_positions"]
    windows = torch.from_numpy(store.read_windows(0)).long()
    for match in list(re.finditer(r'<section id="latent-(\d+)".*?<div class="top">(<div class="ctx".*?</div>)', page))[:3]:
        latent, first = int(match[1]), match[2]
        window, position = int(re.search(r'data-window="(\d+)"', first)[1]), int(re.search(r'data-position="(\d+)"', first)[1])
        activations = capture_sites(lm, windows[window : window + 1], ["resid2"])["resid2"][0, skip:]
        code = sae.encode(sae.normalise(activations.float())).to_dense()[position, latent]
        assert float(re.search(r'data-z="([^"]+)"', first)[1]) == pytest.approx(code.item(), rel=1e-4)
        hit = re.search(r'<span class="t hit"[^>]*>([^<]*)</span>', first)[1]
        assert hit == token_html(tokenizer.decode([windows[window, skip + position].item()]))
    assert len(page.encode()) <= size_bound(settings)


def test_config_checks_name_the_features_key(tiny_model: Path, tiny_corpus: Path) -> None:
    for overrides, message in [
        ({"features.cells": ["topk-n64-k4-s0", "topk-n999-k4-s0"]}, "features.cells: 'topk-n999-k4-s0'"),
        ({"features.most_frequent": 9, "features.latents": 8}, "features.most_frequent"),
        ({"features.windows": 65}, "features.windows"),  # 65 · 31 > 2000 held-out tokens
        ({"features.cells": "some"}, "features.cells"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            validate_config(tiny_config(tiny_model, tiny_corpus, **overrides))


def test_the_sweep_builds_the_chosen_browsers_and_any_other_on_demand(tmp_path: Path, tiny_model: Path, tiny_corpus: Path) -> None:
    """features.cells: the sweep plans exactly those cells' browsers; asking for another cell's
    features/index.html builds that one alone (its cell trained, nothing of the sweep after it)."""
    write_config(tmp_path / "config.yaml", tiny_config(tiny_model, tiny_corpus, **{"features.cells": ["topk-n256-k4-s0"]}))
    planned = set(re.findall(r"cells/resid2/([^/\s]+)/features/index\.html", snakemake(tmp_path, "-n").stdout))
    assert planned == {"topk-n256-k4-s0"}
    target = "results/tiny/cells/resid2/topk-n64-k16-s0/features/index.html"
    snakemake(tmp_path, target)
    built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("results/tiny/cells/*/*/features/index.html"))
    assert built == [target] and not (tmp_path / "results/tiny/scaling").exists()
    assert '<section id="latent-' in (tmp_path / target).read_text()


# --- in a real browser ---------------------------------------------------------------------


def test_page_in_a_browser_shows_each_latents_contexts_and_sorts(lm_and_tokens, tiny_model: Path, tmp_path: Path, browser_page) -> None:
    """In Chromium: no console or page errors; a latent's section shows its top contexts, whose
    values (``data-z``) are the codes computed here and whose text is their tokens'; clicking
    the precision header sorts the index by precision. Screenshots go to $SAESWEEP_SCREENSHOTS
    when it is set (docs/ for README), else beside the page."""
    browser, codes, _, _ = browse(lm_and_tokens, "topk", tiny_model)
    tokenizer, windows = lm_and_tokens[1], lm_and_tokens[2]
    width = windows.shape[1]
    path = tmp_path / "features" / "index.html"
    write_page(browser, path)
    page = browser_page.open(path)
    card = browser.latents[-1]
    page.goto(f"{path.resolve().as_uri()}#latent-{card.latent}")
    section = page.locator(f"#latent-{card.latent}")
    assert section.is_visible()
    top = section.locator(".top .ctx")
    assert top.count() == len(card.top)
    expected = torch.sort(codes[:, card.latent], descending=True, stable=True)
    for i in range(top.count()):
        row = int(top.nth(i).get_attribute("data-window")) * width + int(top.nth(i).get_attribute("data-position"))
        assert row == expected.indices[i].item()
        assert float(top.nth(i).get_attribute("data-z")) == pytest.approx(expected.values[i].item(), rel=1e-4)
        hit = top.nth(i).locator(".hit")
        assert hit.inner_text() == html.unescape(token_html(tokenizer.decode([windows.flatten()[row].item()])))
    latent_shot = browser_page.screenshot("feature-browser-latent")
    page.goto(path.resolve().as_uri())
    page.click("#index th[data-key=precision]")
    shown = [float(x) for x in page.locator("#index tbody tr").evaluate_all("rows => rows.map(r => r.dataset.precision)")]
    assert shown == sorted(shown, reverse=True) and len(shown) == len(browser.latents)
    index_shot = browser_page.screenshot("feature-browser-index")
    assert browser_page.errors == []
    for shot in (latent_shot, index_shot):
        assert 0 < shot.stat().st_size < 200_000
