"""SAELens 6.x folders: writing a saesweep SAE as one, reading one (on disk or from the hub).

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc`` (d_in, d_sae),
``W_dec`` (d_sae, d_in), ``b_dec`` (d_in) and per architecture

    standard  b_enc                 z = ReLU(h),                      h = (a − b_dec) W_enc + b_enc
    topk      b_enc, cfg k          z = ReLU(TopK_k(h))
    jumprelu  b_enc, threshold      z = ReLU(h) ⊙ 1[h > θ]
    gated     b_gate, r_mag, b_mag  z = 1[h_gate > 0] ⊙ ReLU((a − b_dec)(W_enc ⊙ exp(r_mag)) + b_mag),
                                    h_gate = (a − b_dec) W_enc + b_gate

and â = z W_dec + b_dec: the families of ``interop.raw_form`` with the matrices transposed.
Writing needs no SAELens; reading uses SAELens' own loader (imported only there: it is slow
to import), so every variant it converts (pre-6 configs, ``rescale_acts_by_decoder_norm``,
``apply_b_dec_to_input: false``) arrives as the same four rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from saesweep import __version__
from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, write_json
from saesweep.core.weights import SAELENS_TENSORS, check_safetensors
from saesweep.interop.raw_form import RawSAE, without_input_bias

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"
"""The SAELens release whose format this writes (tests/test_interop.py loads it with that release)."""
ARCHITECTURE = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "gated": "gated"}
"""interop family → SAELens architecture."""
FAMILY = {name: family for family, name in ARCHITECTURE.items()}
"""SAELens architecture → interop family."""
IDENTITY_NORMALISATIONS = ("none", "expected_average_only_in")
"""SAELens input normalisations that are the identity in its inference forward (a norm
scaling factor of a hub release is folded into the weights by SAELens on loading)."""


def write_saelens(raw: RawSAE, folder: Path, metadata: dict[str, Any]) -> None:
    """Write ``raw`` as a SAELens folder: weights, then ``cfg.json`` (each atomically);
    ``metadata`` fills SAELens' metadata block (model_name, hook_name, context_size, …)."""
    tensors = dict(zip(SAELENS_TENSORS, (raw.W_enc.T, raw.W_dec, raw.b_dec)))
    if raw.family == "gated":
        tensors.update(b_gate=raw.b_enc, r_mag=raw.extra["r_mag"], b_mag=raw.extra["b_mag"])
    else:
        tensors["b_enc"] = raw.b_enc
    if raw.family == "jumprelu":
        tensors["threshold"] = raw.extra["threshold"]
    with atomic_path(Path(folder) / WEIGHTS) as temporary:
        save_file({name: value.contiguous() for name, value in tensors.items()}, str(temporary))
    cfg: dict[str, Any] = {
        "architecture": ARCHITECTURE[raw.family],
        "d_in": raw.d,
        "d_sae": raw.n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {**metadata, "sae_lens_version": SAELENS_VERSION, "saesweep_version": __version__},
    }
    if raw.family == "topk":
        cfg.update(k=raw.k, rescale_acts_by_decoder_norm=False)
    write_json(Path(folder) / CFG, cfg)


def check_folder(folder: Path) -> str:
    """The architecture named in a SAELens folder's ``cfg.json``, after checking that the
    folder has what loading needs; a UserError names the file and what is wrong."""
    cfg = read_json(Path(folder) / CFG, "SAELens config")
    if not (Path(folder) / WEIGHTS).is_file():
        raise UserError(f"SAELens weights {Path(folder) / WEIGHTS} do not exist")
    check_safetensors(Path(folder) / WEIGHTS, "SAELens weights")
    architecture = cfg.get("architecture", "standard")  # pre-6 configs without it are standard
    if architecture not in FAMILY:
        raise UserError(
            f"SAELens config {Path(folder) / CFG}: architecture {architecture!r} cannot be evaluated "
            f"here; supported: {', '.join(FAMILY)}"
        )
    return architecture


def read_saelens(source: dict[str, str], where: str) -> tuple[RawSAE, dict[str, Any], str]:
    """(raw-space SAE, SAELens' metadata, SAELens architecture) of ``source``: ``{"path": folder}`` or
    ``{"release": …, "sae_id": …}`` (SAELens' pretrained directory or a hub repo; needs a
    network). Errors name ``where``."""
    if "path" in source:
        check_folder(Path(source["path"]))
    try:
        from sae_lens import SAE
    except ImportError:
        raise UserError(f"{where}: reading SAELens SAEs needs sae-lens (pip install -e '.[peers]')") from None
    try:
        if "path" in source:
            sae = SAE.load_from_disk(source["path"], device="cpu", dtype="float32")
        else:
            sae = SAE.from_pretrained(source["release"], source["sae_id"], device="cpu", dtype="float32")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{where}: SAELens cannot load it ({type(error).__name__}: {error})") from None
    return raw_of(sae, where), sae.cfg.metadata.to_dict(), sae.cfg.architecture()


@torch.no_grad()
def raw_of(sae: Any, where: str) -> RawSAE:
    """The raw-space form of a loaded SAELens SAE (any of the four architectures)."""
    cfg = sae.cfg
    architecture = cfg.architecture()
    if architecture not in FAMILY:
        raise UserError(f"{where}: SAELens architecture {architecture!r} cannot be evaluated here; supported: {', '.join(FAMILY)}")
    if cfg.normalize_activations not in IDENTITY_NORMALISATIONS:
        raise UserError(
            f"{where}: normalize_activations={cfg.normalize_activations!r} normalises each token on its own; "
            f"only {' and '.join(IDENTITY_NORMALISATIONS)} can be evaluated here"
        )
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise UserError(f"{where}: reshape_activations={cfg.reshape_activations!r} (per-head inputs) is not a site's activation")
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        sae.fold_W_dec_norm()  # the same SAE with unit-norm decoder rows and no rescaling
    family = FAMILY[architecture]
    W_enc, W_dec, b_dec = sae.W_enc.detach().float().T.contiguous(), sae.W_dec.detach().float(), sae.b_dec.detach().float()
    bias = sae.b_gate if family == "gated" else sae.b_enc
    b_enc = bias.detach().float()
    extra: dict[str, torch.Tensor] = {}
    if family == "jumprelu":
        extra["threshold"] = sae.threshold.detach().float()
    elif family == "gated":
        extra.update(r_mag=sae.r_mag.detach().float(), b_mag=sae.b_mag.detach().float())
    if not cfg.apply_b_dec_to_input:
        b_enc = without_input_bias(W_enc, b_enc, b_dec)
        if family == "gated":  # the magnitude path's encoder is W_enc ⊙ exp(r_mag)
            extra["b_mag"] = without_input_bias(W_enc * extra["r_mag"].exp()[:, None], extra["b_mag"], b_dec)
    return RawSAE(family, W_enc, b_enc, W_dec, b_dec, int(cfg.k) if family == "topk" else None, extra)
