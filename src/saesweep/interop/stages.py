"""Exchanging SAEs with other tools: a trained cell out to SAELens or sparsify
(``export_cells``), an SAE from either into saesweep's own format (``import_external``), so
the unchanged evaluation stage reads it. Both go through the raw-space form of
``interop.raw_form``; the file formats are ``interop.saelens_format`` and ``interop.sparsify_format``.

An imported SAE's ``cfg.json`` has ``arch`` (saesweep's architecture with the same inference
rule, which loads it), only the parameters the other tool reported (k), μ = 0 and s = 1, no
seed and no training facts, and an ``external`` block: its name, format, architecture there,
the cells-table ``arch`` (``{format}-{architecture}``, e.g. ``saelens-jumprelu``), source and
the other tool's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saesweep.core.errors import UserError
from saesweep.core.job_settings import ImportSettings, to_json
from saesweep.core.files import read_json
from saesweep.core.provenance import provenance
from saesweep.plan.settings import interop_metadata
from saesweep.interop import saelens_format, sparsify_format
from saesweep.sae.export import load_sae, save_sae
from saesweep.interop.raw_form import RawSAE, finite, raw_form, to_saesweep

FORMATS = ("saelens", "sparsify")
# Exports are files: the SAE is read onto the CPU, whatever device trained it.
EXPORT_DEVICE = torch.device("cpu")


def export_cells(config: dict[str, Any], cells: list[Path], fmt: str, out: Path) -> list[Path]:
    """Write each cell folder of ``cells`` as a ``fmt`` folder ``out/{cell folder name}``,
    with the metadata of the run ``config`` (model, hook, context, prepend_bos, dataset).
    Every cell is checked before anything is written."""
    targets = {}
    for folder in cells:
        target = Path(out) / Path(folder).name
        if target in targets:
            raise UserError(f"cells {targets[target]} and {folder} would both be exported to {target}")
        targets[target] = Path(folder)
    prepared = [(target, *prepare_export(config, folder, fmt)) for target, folder in targets.items()]
    for target, raw, metadata in prepared:
        target.mkdir(parents=True, exist_ok=True)
        if fmt == "saelens":
            saelens_format.write_saelens(raw, target, metadata)
        else:
            sparsify_format.write_sparsify(raw, target, metadata)
    return list(targets)


def prepare_export(config: dict[str, Any], folder: Path, fmt: str) -> tuple[RawSAE, dict[str, Any]]:
    """(raw-space form, metadata) of one cell, checked against the run's config and the format."""
    if fmt not in FORMATS:
        raise UserError(f"export format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    sae, cfg = load_sae(folder, EXPORT_DEVICE)
    where = f"cell {folder}"
    model, sites = config["model"]["id"], config["activations"]["sites"]
    if cfg["model"] != model or cfg["site"] not in sites:
        raise UserError(
            f"{where} (model {cfg['model']}, site {cfg['site']}) is not from this config "
            f"(model.id {model}, activations.sites {sites}): pass the run's own config"
        )
    raw = raw_form(sae, where)
    if fmt == "sparsify" and raw.family != "topk":
        raise UserError(f"{where}: sparsify has TopK coders only; a {sae.name} cell exports to SAELens")
    metadata = {
        **interop_metadata(config, cfg["site"]),
        "saesweep_cell": Path(folder).name,
        "saesweep_arch": sae.name,
        "saesweep_params": cfg["params"],
        "saesweep_activation_scale": float(sae.act_scale),
    }
    return raw, metadata


def import_external(settings: ImportSettings, out: Path) -> dict[str, Any]:
    """Read the external SAE of ``settings`` (name, site, source, format, activations: the
    site's held-out activation folder, model), check it against the site, and write it in
    saesweep's format to ``out``; returns its ``cfg.json``. Any problem is one UserError
    naming the file and what is wrong, and nothing is written."""
    source, name = settings.source, settings.name
    where = f"external SAE {name!r} ({describe(source)})"
    fmt = detect_format(source, settings.format, where)
    reader = saelens_format.read_saelens if fmt == "saelens" else sparsify_format.read_sparsify
    raw, metadata, architecture = reader(source, where)
    raw = finite(raw, where)
    manifest_path = Path(settings.activations) / "manifest.json"
    d = read_json(manifest_path, "activation manifest")["d"]
    if raw.d != d:
        cfg_file = f"{Path(source['path']) / 'cfg.json'}" if "path" in source else where
        raise UserError(
            f"{cfg_file}: d_in is {raw.d}, but site {settings.site} of {settings.model} has "
            f"d = {d} ({manifest_path}): the SAE is for another site or model"
        )
    sae, reported = to_saesweep(raw)
    cfg = {
        "arch": raw.family,
        "params": reported,
        "d": raw.d,
        "n_latents": raw.n,
        "seed": None,
        "site": settings.site,
        "model": settings.model,
        "normalisation": {"formula": "x = (a - act_mean) / act_scale", "act_mean": 0.0, "scale": 1.0},
        "external": {
            "name": name,
            "format": fmt,
            "architecture": architecture,
            "arch": f"{fmt}-{architecture}",
            "source": source,
            "metadata": json.loads(json.dumps(metadata, default=str)),
        },
        "provenance": provenance(to_json(settings)),
    }
    save_sae(sae, out, cfg)
    return cfg


def describe(source: dict[str, str]) -> str:
    """``path /x``, ``release r, sae_id i`` or ``hub h, hookpoint p``."""
    return ", ".join(f"{key} {value}" for key, value in source.items())


def detect_format(source: dict[str, str], stated: str, where: str) -> str:
    """``saelens`` or ``sparsify``: from the source's kind (release: SAELens, hub: sparsify),
    ``stated`` when not ``auto``, else from the folder's weights file."""
    if "release" in source:
        return "saelens"
    if "hub" in source:
        return "sparsify"
    folder = Path(source["path"])
    if not folder.is_dir():
        raise UserError(f"{where}: folder {folder} does not exist")
    if stated != "auto":
        return stated
    if (folder / saelens_format.WEIGHTS).is_file():
        return "saelens"
    if (folder / sparsify_format.WEIGHTS).is_file():
        return "sparsify"
    if not (folder / "cfg.json").is_file():
        raise UserError(f"{where}: {folder / 'cfg.json'} does not exist")
    raise UserError(
        f"{where}: missing weights file: {folder} has neither {saelens_format.WEIGHTS} (SAELens) "
        f"nor {sparsify_format.WEIGHTS} (sparsify)"
    )
