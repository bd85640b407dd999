"""The sweep's cells and their folder names.

A cell is (architecture, its parameters, n, seed); its folder name says all of them:

    {arch}-n{n_latents}-{knob tag}{value}[-{tag}{value} …]-s{seed}

e.g. ``topk-n4096-k32-s0`` or ``relu-n4096-l0.3-s0``. The sparsity knob is always named;
any other parameter only when it differs from its default, so adding a value to a grid,
or a new grid axis whose values include the default, renames no existing cell. Values are
written as the shortest text that reads back to the same number.

``sweep.archs`` maps each architecture to its grid (every parameter a list of values; the
cells are their product) or to a list of such grids (the union of their cells: e.g. a 2 × 2
ablation plus variants of one of its corners, without the whole product); ``sweep.k`` is
shorthand for ``archs: {topk: {k: …}}``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from saesweep.core.errors import UserError
from saesweep.plan.protocol import grid_defaults
from saesweep.sae.catalog import declaration, problem, resolve_params

CELL_PATTERN = re.compile(r"^[a-z0-9]+-n[0-9]+(-[a-z]+[0-9][0-9.e+-]*)+-s[0-9]+$")
SEPARATOR = re.compile(r"-(?=[a-z])")


@dataclass(frozen=True)
class Cell:
    """One SAE of the sweep."""

    arch: str
    n_latents: int
    params: tuple[tuple[str, int | float], ...]
    """Every parameter of the architecture, in its declared order."""
    seed: int

    @property
    def parameters(self) -> dict[str, int | float]:
        return dict(self.params)

    @property
    def k(self) -> int | None:
        """The cell's k when its architecture has one (TopK, Multi-TopK, BatchTopK, the Matryoshkas), else None."""
        return self.parameters.get("k")

    @property
    def setting(self) -> str:
        """The name without n and seed (``topk-k32``): the cells of one curve over n."""
        arch, _n, *params, _seed = SEPARATOR.split(self.name)
        return "-".join([arch, *params])

    @property
    def name(self) -> str:
        """The folder name (see the module docstring)."""
        declared = declaration(self.arch).all_parameters()
        values = self.parameters
        parts = [
            f"{parameter.tag}{format_value(values[parameter.name])}"
            for index, parameter in enumerate(declared)
            if index == 0 or values[parameter.name] != parameter.default
        ]
        return "-".join([self.arch, f"n{self.n_latents}", *parts, f"s{self.seed}"])


def format_value(value: int | float) -> str:
    """3 → ``3``, 0.25 → ``0.25``, 1e-05 → ``1e-05``: reads back with float() exactly."""
    text = repr(float(value)) if isinstance(value, float) else str(value)
    return text[:-2] if text.endswith(".0") else text


def make_cell(arch: str, n_latents: int, given: dict[str, Any], seed: int, key: str = "cell") -> Cell:
    """A cell with every parameter resolved (given values checked, defaults filled)."""
    params = resolve_params(arch, given, key)
    return Cell(arch, n_latents, tuple(params.items()), seed)


@cache
def parse_cell(name: str) -> Cell:
    """The inverse of ``Cell.name`` (cached: the workflow asks it for every job of a cell)."""
    if CELL_PATTERN.match(name) is None:
        raise UserError(f"cell {name!r} is not of the form {{arch}}-n{{n_latents}}-{{parameters}}-s{{seed}}")
    arch, n_part, *param_parts, seed_part = SEPARATOR.split(name)
    by_tag = {parameter.tag: parameter for parameter in declaration(arch, f"cell {name!r}").all_parameters()}
    given: dict[str, Any] = {}
    for part in param_parts:
        tag = re.match(r"[a-z]+", part).group()
        if tag not in by_tag:
            raise UserError(f"cell {name!r}: {arch} has no parameter tagged {tag!r}; tags: {', '.join(by_tag)}")
        try:
            given[by_tag[tag].name] = float(part[len(tag):])
        except ValueError:
            raise UserError(f"cell {name!r}: {part!r} is not a tag and a number") from None
    cell = make_cell(arch, int(n_part[1:]), given, int(seed_part[1:]), f"cell {name!r}")
    if cell.name != name:
        raise UserError(f"cell {name!r} is not written canonically; its name is {cell.name!r}")
    return cell


def arch_grids(sweep: dict[str, Any]) -> list[tuple[str, str, dict[str, list[Any]]]]:
    """``sweep.archs`` as (architecture, its config key, one grid) triples, a list of grids
    giving one triple each, with ``sweep.k`` as TopK's grid when given."""
    archs = sweep.get("archs", {})
    if "k" in sweep:
        if "topk" in archs:
            raise UserError("config key sweep.k: give TopK's k either as sweep.k or in sweep.archs.topk, not both")
        archs = {"topk": {"k": sweep["k"]}, **archs}
    if not archs:
        raise UserError("config key sweep.archs: no architecture; give sweep.archs (or sweep.k for TopK)")
    grids = []
    for arch, given in archs.items():
        key = "config key " + ("sweep.k" if arch == "topk" and "k" in sweep else f"sweep.archs.{arch}")
        if isinstance(given, list):
            grids += [(arch, f"{key}[{index}]", dict(grid)) for index, grid in enumerate(given)]
        else:
            grids.append((arch, key, dict(given)))
    return grids


def sweep_cells(config: dict[str, Any]) -> list[Cell]:
    """Every cell of the sweep: for each architecture's grid, its product × n_latents × seeds,
    where a grid's own ``n_latents`` list replaces ``sweep.n_latents`` and the protocol adds
    what it sets (``plan.protocol.grid_defaults``); a cell that two grids both give appears once. Unknown architectures or parameters, bad values and impossible
    cells (k ≥ n) name their key."""
    sweep = config["sweep"]
    cells: dict[str, Cell] = {}
    for arch, key, grid in arch_grids(sweep):
        sizes = grid.pop("n_latents", sweep["n_latents"])
        grid = {**grid_defaults(config, arch, key), **grid}
        names = list(grid)
        for values in itertools.product(*(grid[name] for name in names)):
            for n in sizes:
                for seed in sweep["seeds"]:
                    cell = make_cell(arch, n, dict(zip(names, values)), seed, key)
                    impossible = problem(n, cell.parameters)
                    if impossible:
                        raise UserError(f"{key}: {impossible}")
                    cells.setdefault(cell.name, cell)
    return list(cells.values())
