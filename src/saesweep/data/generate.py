"""The synthetic counterpart of an extraction part job: the part's shards generated from the
planted dictionary (``data.synthetic``) and written by ``data.activations``' writer, so the
manifest step, the loader and every cell read them as they read extracted shards.

A "window" is one row (context 1, no skipped position): part j owns the same shard range as
an extraction part would (``activations.part_shards``), shard i holds rows
[i·s, min((i+1)·s, T)) with s = ``shard_tokens`` and T = ``tokens``, drawn from the stream
``synthetic.shard_seed(seed, split, i)``. Part 0 also saves the planted dictionary beside
every site's manifest. Held-out shards carry the rows' true feature activations
(``synthetic.SUPPORT``).
"""

from __future__ import annotations

from pathlib import Path

from saesweep.core.devices import resolve_device
from saesweep.core.job_settings import ExtractionSettings
from saesweep.core.progress import Progress
from saesweep.data import synthetic
from saesweep.data.activations import (
    STORAGE_DTYPES, part_shards, shard_attributes, shard_is_current, shard_name, write_part_record, write_shard,
)


def generate_part(settings: ExtractionSettings, part: int) -> None:
    """Write every site's shards of part ``part`` from the planted dictionary, then its record.
    A shard already written with the same settings is kept (a killed part resumes)."""
    assert settings.synthetic is not None, "generate_part needs synthetic extraction settings"
    generator = settings.synthetic
    owned = part_shards(settings, part)
    device = resolve_device(settings.device, "extraction settings: device")
    model = synthetic.planted_model(generator, device)
    attributes = shard_attributes(settings)
    folders = {site: Path(folder) for site, folder in settings.output_dirs.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        if part == 0:
            synthetic.save_planted(model, folder)
    rows_of = {index: min(settings.shard_tokens, settings.tokens - index * settings.shard_tokens) for index in owned}
    progress = Progress(f"generate {'/'.join(folders)} part {part} of {len(settings.part_files)}", sum(rows_of.values()))
    done = 0
    for index, rows in rows_of.items():
        if not all(shard_is_current(folder / shard_name(index), attributes) for folder in folders.values()):
            seed = synthetic.shard_seed(generator.seed, settings.split, index)
            hidden, support = synthetic.draw_rows(model, rows, seed, generator.noise_std, device)
            extra = dict(zip(synthetic.SUPPORT, support)) if settings.split == "eval" else None
            values = hidden.astype(STORAGE_DTYPES[settings.storage_dtype])
            for site, folder in folders.items():
                write_shard(folder / shard_name(index), values, None, {**attributes, "site": site}, extra)
        done += rows
        progress.update(done)
    progress.finish()
    write_part_record(settings, part, attributes, list(owned), done)
