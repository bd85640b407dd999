"""Activation shards: extraction from the LM into HDF5, and reading them back.

Layout of one site's folder::

    shard-00000.h5   datasets  activations (tokens, d)  storage dtype
                               windows     (w, context) int32, the token ids of its windows
                     attributes model, revision, site, compute/storage dtype, context,
                                skip_positions, corpus fingerprint, code version,
                                tokens, sum (d,), sum_squares (Σ‖a‖²)
    manifest.json    shards (file, tokens, bytes, sha256), the statistics training
                     needs (mean μ, mean squared norm of a − μ, scale s), provenance

Row r of ``activations`` is position ``skip + r % (context − skip)`` of window
``r // (context − skip)``. Every file is written under a temporary name and renamed
when complete; the manifest comes last, so a folder with a manifest is complete.
An interrupted extraction resumes at the first shard index missing for some site.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saesweep import __version__
from saesweep.data.corpus import read_split, token_windows
from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, sha256_file, write_json
from saesweep.data.lm import capture_sites, load_lm
from saesweep.core.progress import Progress
from saesweep.core.provenance import provenance

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


def shard_name(index: int) -> str:
    """``shard-00042.h5``."""
    return f"shard-{index:05d}.h5"


def extract(settings: dict[str, Any], loaded: tuple[torch.nn.Module, Any] | None = None) -> None:
    """Run the LM over the split's token windows and write every site's shards and manifest.

    ``settings`` keys: model, sites, output_dirs (site → folder), corpus_file,
    corpus_summary, context, skip_positions, batch_size, tokens, shard_tokens,
    storage_dtype, device. ``loaded``: the (model, tokenizer) when already in memory."""
    device = resolve_device(settings["device"])
    lm, tokenizer = loaded or load_lm(settings["model"], device)
    kept = settings["context"] - settings["skip_positions"]
    documents = read_split(Path(settings["corpus_file"]))
    windows = token_windows(
        documents, tokenizer, settings["context"], settings["model"]["prepend_bos"], math.ceil(settings["tokens"] / kept)
    )
    if len(windows) * kept < settings["tokens"]:
        print(
            f"the corpus gives {len(windows) * kept} tokens, fewer than the {settings['tokens']} asked for; "
            "extracting all of them",
            file=sys.stderr,
        )
    fingerprint = read_json(settings["corpus_summary"], "corpus summary")["fingerprint"]
    windows_per_shard = max(1, settings["shard_tokens"] // kept)
    n_shards = math.ceil(len(windows) / windows_per_shard)
    folders = {site: Path(folder) for site, folder in settings["output_dirs"].items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    attributes = {
        "model": settings["model"]["id"],
        "revision": settings["model"].get("revision") or "",
        "compute_dtype": settings["model"]["dtype"],
        "storage_dtype": settings["storage_dtype"],
        "context": settings["context"],
        "skip_positions": settings["skip_positions"],
        "corpus_fingerprint": fingerprint,
        "code_version": __version__,
        "settings_hash": provenance(settings)["settings_hash"],
    }
    progress = Progress(f"extract {'/'.join(folders)}", len(windows) * kept)
    for index in range(n_shards):
        shard_windows = windows[index * windows_per_shard : (index + 1) * windows_per_shard]
        if all(shard_is_current(folder / shard_name(index), attributes) for folder in folders.values()):
            progress.update((index + 1) * windows_per_shard * kept)
            continue
        activations = forward_windows(lm, shard_windows, list(folders), settings, device)
        for site, folder in folders.items():
            write_shard(folder / shard_name(index), activations[site], shard_windows, {**attributes, "site": site})
        progress.update(min(len(windows), (index + 1) * windows_per_shard) * kept)
    progress.finish()
    for site, folder in folders.items():
        write_manifest(folder, n_shards, {**attributes, "site": site}, settings)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("config key train.device: cuda was asked for but no GPU is visible")
    return device


def forward_windows(
    lm: torch.nn.Module, windows: torch.Tensor, sites: list[str], settings: dict[str, Any], device: str
) -> dict[str, np.ndarray]:
    """Site activations of ``windows`` without the skipped positions, rows in window
    order, in the storage dtype: {site: (w · (context − skip), d)}."""
    skip = settings["skip_positions"]
    dtype = STORAGE_DTYPES[settings["storage_dtype"]]
    pieces: dict[str, list[np.ndarray]] = {site: [] for site in sites}
    for start in range(0, len(windows), settings["batch_size"]):
        batch = windows[start : start + settings["batch_size"]].to(device)
        captured = capture_sites(lm, batch, sites)
        for site in sites:
            values = captured[site][:, skip:].float().flatten(0, 1)
            pieces[site].append(values.cpu().numpy().astype(dtype))
    return {site: np.concatenate(parts) for site, parts in pieces.items()}


def shard_is_current(path: Path, attributes: dict[str, Any]) -> bool:
    """A finished shard from the same settings (it only exists under its name once complete)."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as shard:
            return shard.attrs.get("settings_hash") == attributes["settings_hash"]
    except OSError:
        return False


def write_shard(path: Path, activations: np.ndarray, windows: torch.Tensor, attributes: dict[str, Any]) -> None:
    """One shard file, atomically, with its token count and running sums as attributes."""
    wide = activations.astype(np.float64)
    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as shard:
            shard.create_dataset("activations", data=activations)
            shard.create_dataset("windows", data=windows.numpy().astype(np.int32))
            shard.attrs.update(attributes)
            shard.attrs["tokens"] = len(activations)
            shard.attrs["sum"] = wide.sum(axis=0)
            shard.attrs["sum_squares"] = float(np.square(wide).sum())


def write_manifest(folder: Path, n_shards: int, attributes: dict[str, Any], settings: dict[str, Any]) -> None:
    """Manifest of a site's folder: shards with sizes and sha256, and the statistics
    μ = Σa / N, m = Σ‖a‖² / N − ‖μ‖² (mean squared norm of a − μ), s = sqrt(m / d)."""
    shards, total, total_sum, total_squares = [], 0, None, 0.0
    for index in range(n_shards):
        path = folder / shard_name(index)
        with h5py.File(path, "r") as shard:
            tokens = int(shard.attrs["tokens"])
            shard_sum = np.asarray(shard.attrs["sum"])
            total_squares += float(shard.attrs["sum_squares"])
            width = shard["activations"].shape[1]
        total += tokens
        total_sum = shard_sum if total_sum is None else total_sum + shard_sum
        shards.append({"file": path.name, "tokens": tokens, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    mean = total_sum / total
    mean_squared_norm = total_squares / total - float(mean @ mean)
    write_json(
        folder / "manifest.json",
        {
            **attributes,
            "d": int(width),
            "tokens": total,
            "shards": shards,
            "mean": mean.tolist(),
            "mean_squared_norm": mean_squared_norm,
            "scale": math.sqrt(mean_squared_norm / width),
            "provenance": provenance(settings),
        },
    )


@dataclass
class ShardInfo:
    """One shard as the manifest lists it."""

    path: Path
    tokens: int
    bytes: int
    sha256: str


class ActivationStore:
    """A site's extracted activations, checked against the manifest on opening:
    each shard's size and sha256 must match, else a UserError names the file."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = read_json(self.folder / "manifest.json", "activation manifest")
        self.shards = [
            ShardInfo(self.folder / s["file"], s["tokens"], s["bytes"], s["sha256"]) for s in self.manifest["shards"]
        ]
        self.d: int = self.manifest["d"]
        self.tokens: int = self.manifest["tokens"]
        self.mean = torch.tensor(self.manifest["mean"], dtype=torch.float32)
        self.scale: float = self.manifest["scale"]
        if verify:
            self.verify()

    def verify(self) -> None:
        """Compare every shard's size and sha256 with the manifest."""
        for shard in self.shards:
            if not shard.path.exists():
                raise UserError(f"activation shard {shard.path} is missing (listed in its manifest)")
            size = os.path.getsize(shard.path)
            if size != shard.bytes:
                raise UserError(f"activation shard {shard.path} has {size} bytes, its manifest says {shard.bytes}: truncated or changed; delete the folder and extract again")
            if sha256_file(shard.path) != shard.sha256:
                raise UserError(f"activation shard {shard.path} does not match the sha256 in its manifest: changed or corrupt; delete the folder and extract again")

    def read(self, index: int) -> np.ndarray:
        """All activations of shard ``index`` (tokens, d) in the storage dtype."""
        with h5py.File(self.shards[index].path, "r") as shard:
            return shard["activations"][...]

    def read_windows(self, index: int) -> np.ndarray:
        """Token ids of shard ``index``'s windows (w, context)."""
        with h5py.File(self.shards[index].path, "r") as shard:
            return shard["windows"][...]

    def head(self, tokens: int) -> torch.Tensor:
        """The first ``tokens`` activations in extraction order, float32 (fewer if fewer exist)."""
        parts, have = [], 0
        for index in range(len(self.shards)):
            if have >= tokens:
                break
            parts.append(self.read(index)[: tokens - have])
            have += len(parts[-1])
        return torch.from_numpy(np.concatenate(parts)).float()
