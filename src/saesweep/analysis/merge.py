"""Runs merged across machines and users (``saesweep merge``): the cells tables, training
logs and per-window sums of several runs joined into one run folder's ``scaling/`` tables, on
which the fits, figures, comparison and explorer run as on any run.

Rows are joined by what makes them comparable. At one site, every run's rows must agree on
``COMPARABILITY_KEYS``: the LM and its revision, the corpus, and the evaluation protocol (the
evaluation settings and held-out tokens, ``evaluation.comparability``). A run whose rows
differ from the first run's at a site is refused, naming the key and both values; with
``keep_apart`` its rows stay, under the site ``{site}@{run}``, so that every fit, figure
and comparison treats them as another site.

A cell (``KEY_COLUMNS``: site, architecture, setting, n, seed) that is in several runs is
one experiment repeated when its training settings hash is the same in each: the row of the
run named first is kept, with its training log and window sums, and the others are dropped (the first
named wins). With another training settings hash it is not the same experiment: that is a
difference of ``train_settings_hash``, refused or kept apart like the keys above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from saesweep.analysis.aggregate import KEY_COLUMNS, write_table
from saesweep.core.errors import UserError
from saesweep.core.files import atomic_path, write_json

COMPARABILITY_KEYS = ("model", "revision", "corpus_fingerprint", "eval_protocol_hash")
"""Columns on which two runs' rows of one site must agree to share its curves and fits."""
EXPERIMENT_KEY = "train_settings_hash"
"""The column that tells a repeated cell (same value) from another experiment of the same name."""
CELLS = Path("scaling/cells.parquet")
LOGS = Path("scaling/train_logs.parquet")
WINDOWS = Path("scaling/windows.parquet")
"""Where a run folder (``results/{run}``) holds the tables merged here."""
SOURCE_COLUMN = "merged_from"
"""The column of the merged tables naming the run folder each row came from."""


@dataclass
class RunTables:
    """One run's tables as read from its folder."""

    folder: Path
    label: str
    """The run's name, made unique among the merged runs (``{run}#2`` for a second of that name)."""
    cells: pd.DataFrame
    logs: pd.DataFrame
    windows: pd.DataFrame
    """The per-window sums of the validation and test parts (``analysis.window_bootstrap``)."""

    def rows_of(self, cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """This run's training logs and window sums of the cells ``cells``."""
        keys = cells[KEY_COLUMNS]
        return self.logs.merge(keys, on=KEY_COLUMNS), self.windows.merge(keys, on=KEY_COLUMNS)

    def relabel(self, site: str, apart: str) -> None:
        """Every table's rows of ``site`` as the site ``apart``."""
        for frame in (self.cells, self.logs, self.windows):
            frame.loc[frame["site"] == site, "site"] = apart


@dataclass
class MergeSummary:
    """What the merge did, written beside the tables as ``merge.json``."""

    sources: list[str]
    cells: int = 0
    dropped_repeats: list[dict[str, Any]] = field(default_factory=list)
    kept_apart: list[dict[str, str]] = field(default_factory=list)


def read_table(path: Path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    """The parquet file ``path`` with its ``required`` columns, or a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (is its folder a run folder, results/<run>?)")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{what} {path} cannot be read ({type(error).__name__}: {error})") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise UserError(f"{what} {path} has no column {', '.join(missing)} (written by an older saesweep: "
                        "re-evaluate and aggregate that run to merge it)")
    return frame


def read_run(folder: Path, taken: set[str]) -> RunTables:
    """A run folder's cells table and training logs, with a label no earlier run has."""
    cells = read_table(folder / CELLS, "cells table", ("run", *KEY_COLUMNS, *COMPARABILITY_KEYS, EXPERIMENT_KEY))
    logs = read_table(folder / LOGS, "training logs", KEY_COLUMNS)
    windows = read_table(folder / WINDOWS, "per-window sums", KEY_COLUMNS)
    name = str(cells["run"].iloc[0]) if len(cells) else folder.name
    label, copy = name, 1
    while label in taken:
        copy += 1
        label = f"{name}#{copy}"
    taken.add(label)
    tables = (frame.reset_index(drop=True).assign(**{SOURCE_COLUMN: str(folder)}) for frame in (cells, logs, windows))
    return RunTables(folder, label, *tables)


def as_text(value: Any) -> str:
    """A key's value as compared and shown: missing (None, NaN) and empty read alike."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def first_difference(row: pd.Series, reference: pd.Series, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` whose value differs between ``row`` and ``reference``."""
    return next((key for key in keys if as_text(row[key]) != as_text(reference[key])), None)


def conflict(run: RunTables, earlier: pd.DataFrame) -> tuple[str, str, pd.Series, pd.Series] | None:
    """The first site at which ``run`` is not comparable with the rows merged before it:
    (site, key, its row, the earlier row), or None. A site the earlier rows lack is no
    conflict; a cell both have must also agree on ``EXPERIMENT_KEY``."""
    for site, rows in run.cells.groupby("site", sort=True):
        before = earlier[earlier["site"] == site]
        if before.empty:
            continue
        key = first_difference(rows.iloc[0], before.iloc[0], COMPARABILITY_KEYS)
        if key:
            return str(site), key, rows.iloc[0], before.iloc[0]
        pairs = rows[KEY_COLUMNS].reset_index().merge(before[KEY_COLUMNS].reset_index(), on=KEY_COLUMNS)
        for mine, theirs in zip(pairs["index_x"], pairs["index_y"]):
            if as_text(run.cells.at[mine, EXPERIMENT_KEY]) != as_text(earlier.at[theirs, EXPERIMENT_KEY]):
                return str(site), EXPERIMENT_KEY, run.cells.loc[mine], earlier.loc[theirs]
    return None


def merge_runs(folders: list[Path], keep_apart: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, MergeSummary]:
    """The merged cells table, training logs, window sums and summary of the run ``folders``
    (in order of precedence: a repeated cell keeps the first folder's row)."""
    if len(folders) < 2:
        raise UserError("saesweep merge needs at least two run folders")
    taken: set[str] = set()
    runs = [read_run(Path(folder), taken) for folder in folders]
    summary = MergeSummary(sources=[str(run.folder) for run in runs])
    cells = runs[0].cells
    logs, windows = [runs[0].logs], [runs[0].windows]
    for run in runs[1:]:
        while (found := conflict(run, cells)) is not None:
            site, key, row, earlier = found
            message = (f"{run.folder} is not comparable with {earlier[SOURCE_COLUMN]} at site {site}: "
                       f"{key} is {as_text(row[key])!r} there and {as_text(earlier[key])!r} here")
            if not keep_apart:
                raise UserError(f"{message} (pass --keep-apart to keep its rows as site {site}@{run.label})")
            apart = f"{site}@{run.label}"
            run.relabel(site, apart)
            summary.kept_apart.append({"source": str(run.folder), "site": site, "as": apart, "key": key})
        repeated = run.cells.merge(cells[KEY_COLUMNS], on=KEY_COLUMNS, how="left", indicator=True)["_merge"] == "both"
        summary.dropped_repeats += [
            {"source": str(run.folder), **{key: as_text(row[key]) for key in KEY_COLUMNS}}
            for _, row in run.cells[repeated.to_numpy()].iterrows()
        ]
        new = run.cells[~repeated.to_numpy()]
        cells = pd.concat([cells, new], ignore_index=True)
        kept_logs, kept_windows = run.rows_of(new)
        logs.append(kept_logs)
        windows.append(kept_windows)
    merged_cells = cells.sort_values(KEY_COLUMNS, ignore_index=True)
    summary.cells = len(merged_cells)
    return merged_cells, pd.concat(logs, ignore_index=True), pd.concat(windows, ignore_index=True), summary


def write_merge(folders: list[Path], output: Path, keep_apart: bool = False) -> MergeSummary:
    """Merge the run ``folders`` into the run folder ``output``: ``scaling/cells.parquet`` (and
    its CSV), ``scaling/train_logs.parquet``, ``scaling/windows.parquet`` and ``merge.json``, each
    written atomically and only once every input was read and found comparable."""
    cells, logs, windows, summary = merge_runs(folders, keep_apart)
    write_table(cells, output / CELLS)
    with atomic_path(output / CELLS.with_suffix(".csv")) as temporary:
        cells.to_csv(temporary, index=False)
    write_table(logs, output / LOGS)
    write_table(windows, output / WINDOWS)
    write_json(output / "merge.json", summary.__dict__)
    return summary
