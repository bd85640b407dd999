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

Extraction streams: documents → token windows → one shard's windows → batches, so its
memory is one shard's worth whatever the token count. It may be split over J jobs
(one per ``settings.part_files``): part j owns a contiguous range of shard indices,
writes those shards of every site and then its record ``settings.part_files[j]``; one
last step writes the manifests from the records. A killed part resumes: shards already
written with the same settings are kept.

With ``settings.synthetic`` the parts generate the rows instead (``data.generate``): one row
per window (context 1, no skipped position, no ``windows`` dataset), the planted dictionary
beside the manifest and the true support in the held-out shards (``data.synthetic``).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saesweep import __version__
from saesweep.data.corpus import read_split, window_blocks
from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, read_json, sha256_file, write_json
from saesweep.data.lm import capture_sites, load_lm
from saesweep.core.progress import Progress
from saesweep.core.provenance import provenance
from saesweep.core.devices import resolve_device
from saesweep.core.job_settings import ExtractionSettings, to_json
from saesweep.data import synthetic

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
HASHED = "hashed.json"
"""Beside a manifest: each shard's modification time (ns) when the manifest job hashed it;
a shard still at that time (and size) is not hashed again when a job opens the folder."""
REEXTRACT = "delete the folder and extract again"
"""What to do about a damaged or disagreeing shard or manifest."""
# Settings keys that say how the extraction is split over jobs, not what it writes.
JOB_KEYS = ("part_files",)


def shard_name(index: int) -> str:
    """``shard-00042.h5``."""
    return f"shard-{index:05d}.h5"


def extract(settings: ExtractionSettings, loaded: tuple[torch.nn.Module, Any] | None = None) -> None:
    """Every part of the extraction in this process, then the manifests: what the
    workflow's part jobs (one per ``settings.part_files``) and its manifest job do together.
    ``loaded``: the (model, tokenizer) when already in memory."""
    if settings.synthetic is None:
        loaded = loaded or load_lm(settings.model, resolve_device(settings.device, "extraction settings: device"))
    for part in range(len(settings.part_files)):
        extract_part(settings, part, loaded)
    write_manifests(settings)


def content_settings(settings: ExtractionSettings) -> dict[str, Any]:
    """The settings (as JSON) that decide what the shards hold: all but how the work is split
    over jobs (``JOB_KEYS``), so that the shards and manifest of J jobs are those of one job."""
    return {key: value for key, value in to_json(settings).items() if key not in JOB_KEYS}


def planned_windows(settings: ExtractionSettings) -> tuple[int, int]:
    """(windows asked for, windows per shard): W = ceil(tokens / kept), where kept =
    context − skip_positions, and max(1, shard_tokens // kept) windows per shard."""
    kept = settings.context - settings.skip_positions
    return math.ceil(settings.tokens / kept), max(1, settings.shard_tokens // kept)


def part_shards(settings: ExtractionSettings, part: int) -> range:
    """The shard indices part ``part`` of J = ``len(settings.part_files)`` owns: with S = ceil(W /
    windows per shard) planned shards, [⌊part·S/J⌋, ⌊(part+1)·S/J⌋). Shard i holds windows
    [i·w, (i+1)·w) of the one window stream, so the parts' shards together are exactly
    the shards of a single job."""
    jobs = len(settings.part_files)
    if not 0 <= part < jobs:
        raise UserError(f"extraction part {part} does not exist: config key activations.extract_jobs is {jobs}")
    windows, per_shard = planned_windows(settings)
    planned = math.ceil(windows / per_shard)
    return range(part * planned // jobs, (part + 1) * planned // jobs)


def shard_attributes(settings: ExtractionSettings) -> dict[str, Any]:
    """Attributes of every shard and manifest of the extraction (the site's name aside); a
    synthetic one's fingerprint is that of its generator's settings, and it names the folder
    of its planted dictionary."""
    if settings.synthetic is not None:
        fingerprint, source = synthetic.fingerprint(settings.synthetic), {synthetic.PLANTED_KEY: synthetic.PLANTED}
    else:
        fingerprint, source = read_json(settings.corpus_summary, "corpus summary")["fingerprint"], {}
    return {
        **source,
        "model": settings.model.id,
        "revision": settings.model.revision or "",
        "compute_dtype": settings.model.dtype,
        "storage_dtype": settings.storage_dtype,
        "context": settings.context,
        "skip_positions": settings.skip_positions,
        "corpus_fingerprint": fingerprint,
        "code_version": __version__,
        "settings_hash": provenance(content_settings(settings))["settings_hash"],
    }


def extract_part(settings: ExtractionSettings, part: int, loaded: tuple[torch.nn.Module, Any] | None = None) -> None:
    """Write every site's shards of part ``part`` (``part_shards``), then its record.

    The token windows are streamed one shard at a time (windows before the part's first
    shard are tokenized and dropped), so memory is one shard's windows and activations
    whatever the number of tokens. A shard already written with the same content
    settings is kept, so a killed part resumes where it stopped. The record lists the
    shards written; fewer than owned means the corpus ended inside this part."""
    if settings.synthetic is not None:
        from saesweep.data.generate import generate_part  # generate writes through this module

        return generate_part(settings, part)
    owned = part_shards(settings, part)
    device = resolve_device(settings.device, "extraction settings: device")
    lm, tokenizer = loaded or load_lm(settings.model, device)
    kept = settings.context - settings.skip_positions
    windows, per_shard = planned_windows(settings)
    last_window = min(windows, owned.stop * per_shard)
    attributes = shard_attributes(settings)
    folders = {site: Path(folder) for site, folder in settings.output_dirs.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    progress = Progress(
        f"extract {'/'.join(folders)} part {part} of {len(settings.part_files)}",
        max(0, last_window - owned.start * per_shard) * kept,
    )
    written, done = [], 0
    if owned:
        blocks = window_blocks(
            read_split(Path(settings.corpus_file)), tokenizer, settings.context,
            settings.model.prepend_bos, last_window, per_shard,
        )
        for index, shard_windows in enumerate(blocks):
            if index < owned.start:
                continue
            if not all(shard_is_current(folder / shard_name(index), attributes) for folder in folders.values()):
                activations = forward_windows(lm, shard_windows, list(folders), settings, device)
                for site, folder in folders.items():
                    write_shard(folder / shard_name(index), activations[site], shard_windows, {**attributes, "site": site})
            written.append(index)
            done += len(shard_windows) * kept
            progress.update(done)
    progress.finish()
    write_part_record(settings, part, attributes, written, done)


def write_part_record(settings: ExtractionSettings, part: int, attributes: dict[str, Any], written: list[int], tokens: int) -> None:
    """The record of part ``part``: the shards it wrote (indices) and their tokens."""
    owned = part_shards(settings, part)
    write_json(settings.part_files[part], {
        "part": part, "jobs": len(settings.part_files), "settings_hash": attributes["settings_hash"],
        "owned": [owned.start, owned.stop], "shards": written, "tokens": tokens,
    })


def write_manifests(settings: ExtractionSettings) -> None:
    """Every site's manifest from the records of the extraction's parts.

    The parts' shards must follow each other from shard 0 with no gap, and a part that
    stopped short (the corpus ended) must be followed by empty parts only. The
    statistics are then summed from the shards in index order, exactly as for one job."""
    attributes = shard_attributes(settings)
    n_shards, ended = 0, False
    for part, path in enumerate(settings.part_files):
        record = read_json(path, "extraction part record")
        if record["settings_hash"] != attributes["settings_hash"] or record["jobs"] != len(settings.part_files):
            raise UserError(f"extraction part record {path} comes from other settings; extract that part again")
        indices = record["shards"]
        owned = part_shards(settings, part)
        in_order = indices == list(range(owned.start, owned.start + len(indices))) and len(indices) <= len(owned)
        if not in_order or (ended and indices):
            raise UserError(f"extraction part record {path} lists shards {indices}, not the part's {list(owned)}")
        n_shards += len(indices)
        ended = ended or len(indices) < len(owned)
    if n_shards == 0:
        raise UserError(f"the corpus {settings.corpus_file} gives no window for the extraction")
    kept = settings.context - settings.skip_positions
    for site, folder in settings.output_dirs.items():
        manifest = write_manifest(Path(folder), n_shards, {**attributes, "site": site}, content_settings(settings))
    if manifest["tokens"] < settings.tokens:
        print(
            f"the corpus gives {manifest['tokens']} tokens ({manifest['tokens'] // kept} windows), fewer than the "
            f"{settings.tokens} asked for; extracted all of them",
            file=sys.stderr,
        )


def forward_windows(
    lm: torch.nn.Module, windows: torch.Tensor, sites: list[str], settings: ExtractionSettings, device: torch.device
) -> dict[str, np.ndarray]:
    """Site activations of ``windows`` without the skipped positions, rows in window
    order, in the storage dtype: {site: (w · (context − skip), d)}."""
    skip = settings.skip_positions
    dtype = STORAGE_DTYPES[settings.storage_dtype]
    rows_per_window = windows.shape[1] - skip
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(windows), settings.batch_size):
        batch = windows[start : start + settings.batch_size].to(device)
        captured = capture_sites(lm, batch, sites)
        rows = slice(start * rows_per_window, (start + len(batch)) * rows_per_window)
        for site in sites:
            values = captured[site][:, skip:].float().flatten(0, 1).cpu().numpy()
            if site not in out:
                out[site] = np.empty((len(windows) * rows_per_window, values.shape[1]), dtype=dtype)
            out[site][rows] = values
    return out


def shard_is_current(path: Path, attributes: dict[str, Any]) -> bool:
    """A finished shard from the same settings and the same corpus (it only exists under
    its name once complete)."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as shard:
            return all(shard.attrs.get(key) == attributes[key] for key in ("settings_hash", "corpus_fingerprint"))
    except OSError:
        return False


def write_shard(
    path: Path, activations: np.ndarray, windows: torch.Tensor | None, attributes: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """One shard file, atomically, with its token count and running sums as attributes; the
    windows' token ids unless None (synthetic rows have none), and ``extra`` datasets."""
    wide = activations.astype(np.float64)
    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as shard:
            shard.create_dataset("activations", data=activations)
            if windows is not None:
                shard.create_dataset("windows", data=windows.numpy().astype(np.int32))
            for name, values in (extra or {}).items():
                shard.create_dataset(name, data=values)
            shard.attrs.update(attributes)
            shard.attrs["tokens"] = len(activations)
            shard.attrs["sum"] = wide.sum(axis=0)
            shard.attrs["sum_squares"] = float(np.square(wide).sum())


def write_manifest(folder: Path, n_shards: int, attributes: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """Manifest of a site's folder: shards with sizes and sha256, and the statistics
    μ = Σa / N, m = Σ‖a‖² / N − ‖μ‖² (mean squared norm of a − μ), s = sqrt(m / d)."""
    shards, total, total_sum, total_squares = [], 0, None, 0.0
    hashed: dict[str, int] = {}
    for index in range(n_shards):
        path = folder / shard_name(index)
        with h5py.File(path, "r") as shard:
            tokens = int(shard.attrs["tokens"])
            shard_sum = np.asarray(shard.attrs["sum"])
            total_squares += float(shard.attrs["sum_squares"])
            width = shard["activations"].shape[1]
        total += tokens
        total_sum = shard_sum if total_sum is None else total_sum + shard_sum
        status = path.stat()
        shards.append({"file": path.name, "tokens": tokens, "bytes": status.st_size, "sha256": sha256_file(path)})
        hashed[path.name] = status.st_mtime_ns
    mean = total_sum / total
    mean_squared_norm = total_squares / total - float(mean @ mean)
    manifest = {
        **attributes,
        "d": int(width),
        "tokens": total,
        "shards": shards,
        "mean": mean.tolist(),
        "mean_squared_norm": mean_squared_norm,
        "scale": math.sqrt(mean_squared_norm / width),
        "provenance": provenance(content),
    }
    write_json(folder / HASHED, hashed)
    write_json(folder / "manifest.json", manifest)
    return manifest


@dataclass
class ShardInfo:
    """One shard as the manifest lists it."""

    path: Path
    tokens: int
    bytes: int
    sha256: str
    mtime_ns: int | None
    """The file's modification time when the manifest job hashed it (``HASHED``; None if unknown)."""


class ActivationStore:
    """A site's extracted activations, checked against the manifest: on opening, each
    shard's size, and its sha256 unless the file is unchanged since the manifest hashed it
    (``verify``); on every read, the shard's rows, width and dtype. A shard that is missing,
    damaged or disagrees is a UserError naming the file."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        self.manifest = read_json(path, "activation manifest")
        hashed = read_json(self.folder / HASHED, "shard hash times") if (self.folder / HASHED).exists() else {}
        try:
            self.shards = [
                ShardInfo(self.folder / s["file"], s["tokens"], s["bytes"], s["sha256"], hashed.get(s["file"]))
                for s in self.manifest["shards"]
            ]
            self.d: int = self.manifest["d"]
            self.tokens: int = self.manifest["tokens"]
            self.mean = torch.tensor(self.manifest["mean"], dtype=torch.float32)
            self.scale: float = self.manifest["scale"]
            storage = self.manifest["storage_dtype"]
        except KeyError as missing:
            raise UserError(f"activation manifest {path} has no key {missing}; {REEXTRACT}") from None
        if storage not in STORAGE_DTYPES:
            raise UserError(f"activation manifest {path}: storage_dtype {storage!r} is not one of {', '.join(STORAGE_DTYPES)}")
        self.storage_dtype = np.dtype(STORAGE_DTYPES[storage])
        if verify:
            self.verify()

    def verify(self) -> None:
        """Compare every shard's size with the manifest, and its sha256 unless the file's
        modification time is still the one recorded when the manifest hashed it: every job
        of a sweep opens the folder, and hashing 10⁸ tokens of shards (143 GiB at GPT-2
        small's width) takes minutes per job. A file rewritten or copied without its times
        is hashed; damage that keeps both size and modification time is not caught here.
        The times are in ``HASHED`` beside the manifest, not in it, so that the manifest
        stays a function of the shards' contents."""
        for shard in self.shards:
            if not shard.path.exists():
                raise UserError(f"activation shard {shard.path} is missing (listed in its manifest)")
            status = shard.path.stat()
            size = status.st_size
            if size == shard.bytes and status.st_mtime_ns == shard.mtime_ns:
                continue
            if size != shard.bytes:
                raise UserError(f"activation shard {shard.path} has {size} bytes, its manifest says {shard.bytes}: truncated or changed; {REEXTRACT}")
            if sha256_file(shard.path) != shard.sha256:
                raise UserError(f"activation shard {shard.path} does not match the sha256 in its manifest: changed or corrupt; {REEXTRACT}")

    def read(self, index: int) -> np.ndarray:
        """All activations of shard ``index`` (tokens, d) in the storage dtype: the shard's
        rows, width and dtype must be the manifest's tokens, d and storage_dtype."""
        shard = self.shards[index]
        with self.open_shard(index) as handle:
            values = self.dataset(index, handle, "activations")
            if values.shape != (shard.tokens, self.d) or values.dtype != self.storage_dtype:
                raise UserError(
                    f"activation shard {shard.path} holds activations of shape {values.shape} and dtype {values.dtype}; "
                    f"its manifest says ({shard.tokens}, {self.d}) and {self.storage_dtype}; {REEXTRACT}"
                )
            return self.whole(index, values)

    def read_windows(self, index: int) -> np.ndarray:
        """Token ids of shard ``index``'s windows (w, context)."""
        with self.open_shard(index) as handle:
            return self.whole(index, self.dataset(index, handle, "windows"))

    @contextlib.contextmanager
    def open_shard(self, index: int) -> Iterator[h5py.File]:
        """Shard ``index`` open for reading; a missing or unreadable file is a UserError naming it."""
        path = self.shards[index].path
        try:
            handle = h5py.File(path, "r")
        except FileNotFoundError:
            raise UserError(f"activation shard {path} is missing (listed in its manifest); {REEXTRACT}") from None
        except OSError as error:
            raise UserError(f"activation shard {path} cannot be read ({error}): truncated or corrupt; {REEXTRACT}") from None
        with handle:
            yield handle

    def dataset(self, index: int, handle: h5py.File, name: str) -> h5py.Dataset:
        """Dataset ``name`` of shard ``index``, open in ``handle``; an absent one is a UserError naming the file."""
        dataset = handle.get(name)
        if not isinstance(dataset, h5py.Dataset):
            raise UserError(f"activation shard {self.shards[index].path} has no {name} dataset; {REEXTRACT}")
        return dataset

    def whole(self, index: int, dataset: h5py.Dataset) -> np.ndarray:
        """Every value of a dataset of shard ``index``; a damaged chunk is a UserError naming the file."""
        try:
            return dataset[...]
        except OSError as error:
            raise UserError(f"activation shard {self.shards[index].path} cannot be read ({error}): corrupt; {REEXTRACT}") from None

    def head(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The first ``tokens`` activations in extraction order, float32 on ``device`` (fewer if
        fewer exist); moved in the storage dtype, converted there."""
        parts, have = [], 0
        for index in range(len(self.shards)):
            if have >= tokens:
                break
            parts.append(self.read(index)[: tokens - have])
            have += len(parts[-1])
        return torch.from_numpy(np.concatenate(parts)).to(device).float()
