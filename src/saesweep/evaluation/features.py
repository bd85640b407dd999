"""The data of a cell's feature browser (what ``analysis.feature_page`` draws), from held-out
tokens only.

The tokens are the T = W · (C − skip) kept positions of the first W held-out windows; z_j(t)
is latent j's code at token t, and j *fires* at t when z_j(t) > 0. Codes are computed
``batch_size`` rows at a time, twice (as in ``analysis``): no (T, n) matrix is formed.

1. First pass: per latent, its firing count f_j = #{t : z_j(t) > 0}; density ρ_j = f_j / T.
2. Choice (``select_latents``): the ``most_frequent`` live latents of largest f_j, then the
   other live latents sorted by f_j, taken at evenly spaced ranks (the rarest and the most
   frequent of them included), so that the sample covers the frequency range.
3. Second pass: the chosen latents' values z_j(t) over all T tokens, (T, m) float32.

Per chosen latent:

- top contexts: the ``top_contexts`` tokens of largest z_j (ties: the earlier token), each
  shown with ``before`` tokens before it and ``after`` after it in its window, every shown
  token with its z_j;
- quantile contexts: the firing values cut at their quantiles q_b = Q(b / B), b = 0 … B
  (B = ``quantile_bands``); band b holds the firing tokens with q_b < z ≤ q_{b+1} (band 0
  also q_0 itself); ``band_contexts`` of each band drawn uniformly without replacement
  (CPU generator seeded with the settings' seed);
- the histogram of its firing values over ``histogram_bins`` equal bins of [0, max z_j];
- its n-gram explanation (``explain.explainability``): made on the first half of the
  windows, its precision and recall measured on the second half;
- logit effects: e_j = W_U (γ ⊙ u_j) with u_j = W_dec[j] / ‖W_dec[j]‖ the decoder direction
  (its scale s > 0 only scales e_j), γ the final norm's scale and W_U the unembedding
  (``data.lm.unembedding``); the ``logit_tokens`` tokens of largest and of smallest e_j are
  the ones the direction promotes and suppresses most. This is the direct path: the
  direction as if written into the final residual stream, the blocks after the site
  skipped. ``resid``, ``mlp`` and ``attn`` outputs are all added to the residual stream, so
  the same e_j is shown for each; ``LOGIT_NOTES`` says what it means for each kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saesweep.core.devices import resolve_device
from saesweep.core.job_settings import FeatureSettings
from saesweep.core.sites import parse_site
from saesweep.data.activations import ActivationStore
from saesweep.data.lm import load_lm, unembedding
from saesweep.evaluation.analysis import ColumnGather, code_chunks, count_firing
from saesweep.evaluation.evaluate import DEVICE_KEY
from saesweep.evaluation.explain import explainability
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.export import load_sae

LOGIT_NOTES = {
    "resid": (
        "W_U (γ ⊙ u): the unit decoder direction u through the final norm's scale γ and the "
        "unembedding W_U, as if written into the last residual stream (the direct path; the "
        "blocks after this one are skipped)"
    ),
    "mlp": (
        "W_U (γ ⊙ u) of the MLP output's direction u: the MLP output is added to the residual "
        "stream, so this is its direct effect on the logits (the later blocks skipped)"
    ),
    "attn": (
        "W_U (γ ⊙ u) of the attention output's direction u: the attention output is added to the "
        "residual stream, so this is its direct effect on the logits (the later blocks skipped)"
    ),
}
"""What the logit effects of a site kind's decoder directions mean (shown on the page)."""


@dataclass(frozen=True)
class Context:
    """A shown stretch of one held-out window around one token of a latent."""

    window: int
    """The window (from 0, among the browser's W)."""
    position: int
    """The token's kept position in the window (from 0: the first kept position)."""
    start: int
    """The first shown kept position."""
    token_ids: list[int]
    """The shown tokens, positions start … start + len − 1."""
    values: list[float]
    """The latent's value z_j at each shown token."""

    @property
    def value(self) -> float:
        """z_j at the context's own token."""
        return self.values[self.position - self.start]


@dataclass(frozen=True)
class Band:
    """Contexts drawn from one quantile band of a latent's firing values."""

    low: float
    """q_b: the band holds values above it (band 0: at or above)."""
    high: float
    """q_{b+1}: the band's largest value."""
    size: int
    """Firing tokens in the band."""
    contexts: list[Context]
    """Up to band_contexts of its tokens, drawn at random, in increasing order."""


@dataclass(frozen=True)
class LatentCard:
    """Everything the browser shows about one latent."""

    latent: int
    """j, the latent's index."""
    count: int
    """f_j: tokens it fires on."""
    density: float
    """ρ_j = f_j / T."""
    max_value: float
    """max_t z_j(t)."""
    mean_value: float
    """The mean of z_j over the tokens it fires on."""
    top: list[Context]
    """The contexts of its largest values, largest first."""
    bands: list[Band]
    """Random contexts from each quantile band of its firing values, lowest band first."""
    histogram_edges: list[float]
    """histogram_bins + 1 equal-width edges over [0, max z_j]."""
    histogram_counts: list[int]
    """Firing tokens per bin (the last bin includes its right edge)."""
    patterns: list[list[int]]
    """The n-gram explanation's patterns (token ids; the last one is the activating token)."""
    precision: float
    """The explanation's held-out precision (nan when it predicts nothing)."""
    recall: float
    """The explanation's held-out recall (nan when the latent never fires on the second half)."""
    promoted: list[tuple[int, float]]
    """(token id, e_j) of the tokens of largest logit effect, largest first."""
    suppressed: list[tuple[int, float]]
    """(token id, e_j) of the tokens of smallest logit effect, smallest first."""


@dataclass(frozen=True)
class Browser:
    """A cell's feature browser: the chosen latents and what the index says of the cell."""

    site: str
    """The cell's site."""
    cell: str
    """The cell's name."""
    n_latents: int
    """n, the SAE's latents."""
    tokens: int
    """T, held-out tokens read."""
    windows: int
    """W, held-out windows read."""
    live: int
    """Latents that fire on at least one of the T tokens."""
    density_edges: list[float]
    """Edges of the histogram of log10 ρ over the live latents."""
    density_counts: list[int]
    """Live latents per bin of log10 ρ."""
    latents: list[LatentCard]
    """The chosen latents, in the order of ``select_latents``."""
    token_text: dict[int, str]
    """The text of every token id the browser shows (the model folder's tokenizer)."""
    logit_note: str
    """What the logit effects mean for this site (``LOGIT_NOTES``)."""


def select_latents(counts: torch.Tensor, total: int, most_frequent: int) -> torch.Tensor:
    """Up to ``total`` live latents (counts > 0): the ``most_frequent`` of largest count (ties:
    the lower index), then, of the L other live latents in increasing count (ties: the lower
    index), those at ranks round(i · (L − 1) / (m − 1)), i = 0 … m − 1, m = min(L, total −
    most_frequent) (the rarest and the most frequent of them included). On the device of
    ``counts``."""
    live = counts.gt(0).nonzero().squeeze(1)
    by_count = live[torch.sort(counts[live], descending=True, stable=True).indices]
    first, rest = by_count[:most_frequent], by_count[most_frequent:]
    rest = rest[torch.sort(counts[rest], stable=True).indices]
    m = min(total - len(first), len(rest))
    if m <= 0:
        return first
    ranks = torch.linspace(0, len(rest) - 1, m, device=counts.device, dtype=torch.float64).round().long().unique()
    return torch.cat([first, rest[ranks]])


def top_tokens(values: torch.Tensor, count: int) -> torch.Tensor:
    """The ≤ ``count`` tokens (rows of ``values`` (T,)) with the largest values > 0, largest
    first (ties: the earlier row)."""
    firing = int(values.gt(0).sum())
    return torch.sort(values, descending=True, stable=True).indices[: min(count, firing)]


def quantile_bands(values: torch.Tensor, bands: int, per_band: int, generator: torch.Generator) -> list[tuple[float, float, torch.Tensor, int]]:
    """(q_b, q_{b+1}, sampled rows in increasing order, band size) for b = 0 … bands − 1 over
    the firing values of a live latent's ``values`` (T,) as the module docstring defines them;
    empty bands (equal quantiles) are kept with no rows."""
    rows = values.gt(0).nonzero().squeeze(1)
    firing = values[rows]
    levels = torch.linspace(0, 1, bands + 1, device=values.device, dtype=torch.float64)
    edges = torch.quantile(firing.double(), levels).float()
    out = []
    for b in range(bands):
        low, high = edges[b], edges[b + 1]
        inside = (firing <= high) & ((firing > low) | (b == 0))
        members = rows[inside]
        pick = torch.randperm(len(members), generator=generator)[:per_band].to(members.device)
        out.append((low.item(), high.item(), members[pick].sort().values, len(members)))
    return out


def context_of(values: torch.Tensor, windows: torch.Tensor, row: int, before: int, after: int) -> Context:
    """The context of flat token ``row`` in ``values`` (W, C') and token ids ``windows`` (W, C'):
    positions max(0, c − before) … min(C' − 1, c + after) of its window."""
    width = windows.shape[1]
    window, position = divmod(row, width)
    start, stop = max(0, position - before), min(width, position + after + 1)
    return Context(
        window, position, start, windows[window, start:stop].tolist(), values[window, start:stop].tolist(),
    )


def value_histogram(values: torch.Tensor, bins: int) -> tuple[list[float], list[int]]:
    """Counts of the firing values of a live latent's ``values`` over ``bins`` equal bins of
    [0, max]."""
    firing = values[values > 0].float()
    top = firing.max().item()
    counts = torch.histc(firing, bins=bins, min=0.0, max=top)
    return [top * i / bins for i in range(bins + 1)], [int(c) for c in counts.tolist()]


def density_histogram(counts: torch.Tensor, tokens: int, bins: int) -> tuple[list[float], list[int]]:
    """Counts of log10 ρ_j = log10(f_j / T) over ``bins`` equal bins of [log10(1/T), 0], live
    latents only."""
    live = counts[counts > 0].double()
    low = -float(np.log10(tokens))
    counts_per_bin = torch.histc((live / tokens).log10(), bins=bins, min=low, max=0.0)
    return [low * (bins - i) / bins + 0.0 for i in range(bins + 1)], [int(c) for c in counts_per_bin.tolist()]


def logit_effects(unembed: torch.Tensor, gamma: torch.Tensor, directions: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E = (γ ⊙ U) W_Uᵀ with U the rows of ``directions`` (m, d) scaled to unit norm: (m, V)
    logit effects e_j in float32, and their (top, bottom) token ids as a pair of (m, count)
    tensors (largest first; smallest first)."""
    units = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    effects = (units * gamma.float()) @ unembed.float().t()
    count = min(count, effects.shape[1])
    return effects, torch.stack([effects.topk(count, dim=1).indices, (-effects).topk(count, dim=1).indices])


@torch.no_grad()
def build_browser(
    sae: SparseAutoencoder, activations: torch.Tensor, windows: torch.Tensor, settings: FeatureSettings,
    unembed: tuple[torch.Tensor, torch.Tensor], token_text: Callable[[list[int]], list[str]],
) -> Browser:
    """The browser of ``sae`` on raw ``activations`` (T, d), the kept positions of token
    ``windows`` (W, C'), T = W · C', by the steps of the module docstring. ``unembed`` is
    (W_U (V, d), γ (d,)); ``token_text`` maps a list of token ids to their texts."""
    device, tokens = sae.W_enc.device, len(activations)
    counts = torch.zeros(sae.n, dtype=torch.int64, device=device)
    for chunk in code_chunks(sae, activations, settings.batch_size):
        count_firing(counts, chunk, tokens)
    chosen = select_latents(counts, settings.latents, settings.most_frequent)
    gather = ColumnGather(chosen, sae.n, tokens)
    for chunk in code_chunks(sae, activations, settings.batch_size):
        gather.update(chunk)
    columns = gather.columns()
    grid = columns.reshape(len(windows), windows.shape[1], len(chosen))
    half = len(windows) // 2
    explained = explainability(windows[:half], grid[:half], windows[half:], grid[half:])
    effects, (promoted, suppressed) = logit_effects(*unembed, sae.W_dec[chosen], settings.logit_tokens)
    generator = torch.Generator().manual_seed(settings.seed)
    cards = []
    for i, latent in enumerate(chosen.tolist()):
        values, plane = columns[:, i], grid[:, :, i]

        def around(row: int, plane: torch.Tensor = plane) -> Context:
            return context_of(plane, windows, row, settings.context_before, settings.context_after)

        edges, histogram = value_histogram(values, settings.histogram_bins)
        fires = values > 0
        cards.append(LatentCard(
            latent=latent, count=int(counts[latent]), density=int(counts[latent]) / tokens,
            max_value=values.max().item(), mean_value=values[fires].mean().item(),
            top=[around(row) for row in top_tokens(values, settings.top_contexts).tolist()],
            bands=[
                Band(low, high, size, [around(row) for row in rows.tolist()])
                for low, high, rows, size in quantile_bands(values, settings.quantile_bands, settings.band_contexts, generator)
            ],
            histogram_edges=edges, histogram_counts=histogram,
            patterns=[list(p) for p in explained["explanations"][i].patterns],
            precision=float(explained["precision"][i]), recall=float(explained["recall"][i]),
            promoted=[(t, effects[i, t].item()) for t in promoted[i].tolist()],
            suppressed=[(t, effects[i, t].item()) for t in suppressed[i].tolist()],
        ))
    shown = sorted({t for card in cards for t in shown_tokens(card)})
    density_edges, density_counts = density_histogram(counts, tokens, settings.histogram_bins)
    return Browser(
        site=settings.site, cell=settings.cell, n_latents=sae.n, tokens=tokens, windows=len(windows),
        live=int(counts.gt(0).sum()), density_edges=density_edges, density_counts=density_counts,
        latents=cards, token_text=dict(zip(shown, token_text(shown))),
        logit_note=LOGIT_NOTES[parse_site(settings.site).kind],
    )


def shown_tokens(card: LatentCard) -> set[int]:
    """Every token id a latent's card shows."""
    contexts = card.top + [context for band in card.bands for context in band.contexts]
    return (
        {t for context in contexts for t in context.token_ids}
        | {t for pattern in card.patterns for t in pattern}
        | {t for t, _ in card.promoted + card.suppressed}
    )


def browse_cell(settings: FeatureSettings, cell_folder: Path) -> Browser:
    """The browser of a trained cell: its SAE, the first ``windows`` held-out windows' kept
    positions and their activations, and the LM's unembedding, each read onto the settings'
    device; token texts from the model folder's tokenizer (each id decoded alone)."""
    device = resolve_device(settings.device, DEVICE_KEY)
    sae, _ = load_sae(cell_folder, device)
    store = ActivationStore(settings.eval_activations)
    skip = store.manifest["skip_positions"]
    stored = np.concatenate([store.read_windows(index) for index in range(len(store.shards))])
    windows = torch.from_numpy(stored[: settings.windows, skip:]).to(device).long()
    activations = store.head(windows.numel(), device)
    windows = windows[: len(activations) // windows.shape[1]]
    lm, tokenizer = load_lm(settings.model, device)
    unembed = unembedding(lm)
    del lm
    return build_browser(
        sae, activations[: windows.numel()], windows, settings, unembed,
        lambda ids: [tokenizer.decode([t]) for t in ids],
    )
