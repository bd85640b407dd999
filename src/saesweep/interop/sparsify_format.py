"""EleutherAI sparsify folders: writing a saesweep TopK SAE as one, reading one (on disk or
from the hub).

A folder (one hookpoint) holds ``cfg.json`` (``SparseCoderConfig`` fields and ``d_in``) and
``sae.safetensors`` with ``encoder.weight`` (n, d), ``encoder.bias`` (n), ``W_dec`` (n, d)
and ``b_dec`` (d). Its rule is

    pre = encoder.weight (a − b_dec) + encoder.bias,   z = TopK_k(ReLU(pre)),   â = W_dec z + b_dec,

the ``topk`` family of ``interop.raw_form`` (TopK of ReLU and ReLU of TopK keep the same values).
sparsify has no metadata fields, so the model, hook and data go to ``metadata.json`` beside
``cfg.json``. Writing needs no sparsify; reading uses its own loader (imported only there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, write_json
from saesweep.core.weights import SPARSIFY_TENSORS, check_safetensors
from saesweep.interop.raw_form import RawSAE

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
METADATA = "metadata.json"


def write_sparsify(raw: RawSAE, folder: Path, metadata: dict[str, Any]) -> None:
    """Write ``raw`` (a ``topk`` SAE) as a sparsify folder: weights, then ``metadata.json``
    and ``cfg.json`` (each atomically). ``normalize_decoder`` is false: the folded decoder
    rows have the norm s of saesweep's normalisation (``interop.raw_form``), not 1. ``multi_topk``
    is false even for a Multi-TopK cell: with it, sparsify's forward returns the reconstruction
    from 4k latents instead of k (the metadata names the architecture)."""
    tensors = dict(zip(SPARSIFY_TENSORS, (raw.W_enc, raw.b_enc, raw.W_dec, raw.b_dec)))
    with atomic_path(Path(folder) / WEIGHTS) as temporary:
        save_file({name: value.contiguous() for name, value in tensors.items()}, str(temporary), metadata={"format": "pt"})
    write_json(Path(folder) / METADATA, metadata)
    write_json(Path(folder) / CFG, {
        "activation": "topk",
        "expansion_factor": max(1, raw.n // raw.d),
        "normalize_decoder": False,
        "num_latents": raw.n,
        "k": raw.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": raw.d,
    })


def check_folder(folder: Path) -> dict[str, Any]:
    """A sparsify folder's ``cfg.json``, after checking that the folder holds a TopK coder of
    a site's activations that loading can read; a UserError names the file and what is wrong."""
    path = Path(folder) / CFG
    cfg = read_json(path, "sparsify config")
    if not (Path(folder) / WEIGHTS).is_file():
        raise UserError(f"sparsify weights {Path(folder) / WEIGHTS} do not exist")
    check_safetensors(Path(folder) / WEIGHTS, "sparsify weights")
    check_cfg(cfg, str(path))
    return cfg


def check_cfg(cfg: Any, where: str) -> None:
    """A UserError naming ``where`` unless ``cfg`` describes a plain TopK coder with a d_in."""
    if not isinstance(cfg, dict) or "d_in" not in cfg:
        raise UserError(f"{where}: no key 'd_in': not a sparsify config")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{where}: activation {cfg['activation']!r} cannot be evaluated here; supported: topk")
    for key in ("transcode", "skip_connection"):
        if cfg.get(key):
            raise UserError(f"{where}: {key} is true: not an autoencoder of one site's activations")


def read_sparsify(source: dict[str, str], where: str) -> tuple[RawSAE, dict[str, Any], str]:
    """(raw-space SAE, its metadata: ``metadata.json`` when the folder has one, ``topk``) of
    ``source``: ``{"path": folder}`` or ``{"hub": repo, "hookpoint": …}`` (needs a network).
    Errors name ``where``."""
    metadata: dict[str, Any] = {}
    if "path" in source:
        check_folder(Path(source["path"]))
        if (Path(source["path"]) / METADATA).is_file():
            metadata = read_json(Path(source["path"]) / METADATA, "sparsify metadata")
    try:
        from sparsify import SparseCoder
    except ImportError:
        raise UserError(f"{where}: reading sparsify SAEs needs eai-sparsify (pip install -e '.[peers]')") from None
    try:
        if "path" in source:
            coder = SparseCoder.load_from_disk(source["path"], device="cpu")
        else:
            coder = SparseCoder.load_from_hub(source["hub"], source.get("hookpoint"), device="cpu")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{where}: sparsify cannot load it ({type(error).__name__}: {error})") from None
    check_cfg({**coder.cfg.to_dict(), "d_in": coder.d_in}, where)
    with torch.no_grad():
        raw = RawSAE(
            "topk",
            coder.encoder.weight.detach().float().contiguous(),
            coder.encoder.bias.detach().float(),
            coder.W_dec.detach().float().contiguous(),
            coder.b_dec.detach().float(),
            int(coder.cfg.k),
        )
    return raw, metadata, "topk"
