"""Stage 2 of a two-stage study: the grid that runs each row's chosen setting on fresh seeds.

Why two stages: a report that chooses γ/η on seeds it does not show (`report.Selection.seeds`)
needs those other seeds only at the chosen setting. Running every setting on every seed spends
most of a study on settings nobody reports (a9a: 3–6 settings per row). So stage 1 sweeps every
setting on the selection seeds; this module reads its finished runs, applies the report's very
rule (`report.select_setting` under the same `Objective`) to each row, and writes a grid whose one
axis lists the chosen cells and whose other axis is the new seeds. Swept into the same directory,
the two stages are exactly what `byzps report --selection-seeds` reads: it picks the same setting
from the selection seeds and reports the new ones.

A row is chosen only when every one of its stage-1 cells on the selection seeds has finished: a
choice among the settings that happen to be done would depend on the order the sweep ran them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byzps.common.config import toml_value
from byzps.sim.grid import Cell, Grid, expand, is_done
from byzps.sim.report import (
    SEED,
    Objective,
    ReportError,
    Selection,
    flatten,
    group_key,
    load_run,
    select_setting,
)


@dataclass(frozen=True)
class Confirmation:
    """The chosen cells (one assignment per complete row) and the rows still waiting for runs."""

    chosen: list[dict[str, Any]]
    waiting: int


def axis_keys(grid: Grid) -> list[str]:
    """Every config key some axis of `grid` sets, in axis order (seed excluded)."""
    keys: dict[str, None] = {}
    for values in grid.axes.values():
        for assignment in values:
            keys.update(dict.fromkeys(k for k in assignment if k != SEED))
    return list(keys)


def choose(
    grid: Grid, cells: Sequence[Cell], sweep_dir: Path, objective: Objective, selection: Selection
) -> Confirmation:
    """Each row's chosen setting among stage 1's `cells` on the selection seeds, as the axis
    values that rebuild its config (every key the grid's axes set)."""
    if not selection.seeds:
        raise ReportError("selection seeds: at least one is needed to choose on")
    keys = axis_keys(grid)
    rows: dict[str, dict[tuple, list[Cell]]] = {}
    for cell in cells:
        config = flatten(cell.config.to_dict())
        if config[SEED] in selection.seeds:
            setting = tuple(config.get(k) for k in selection.keys)
            rows.setdefault(group_key(config, selection.keys), {}).setdefault(setting, []).append(
                cell
            )
    if not rows:
        raise ReportError("selection seeds: no cell of the grid has one")
    chosen, waiting = [], 0
    for by_setting in rows.values():
        if not all(is_done(sweep_dir / c.name, c.config) for cs in by_setting.values() for c in cs):
            waiting += 1
            continue
        runs = {s: [load_run(sweep_dir / c.name) for c in cs] for s, cs in by_setting.items()}
        best = runs[select_setting(runs, objective)][0]
        chosen.append({k: best.config[k] for k in keys if k in best.config})
    return Confirmation(chosen, waiting)


def confirm_grid_text(
    grid: Grid, chosen: list[dict[str, Any]], seeds: Sequence[int], where: Path
) -> str:
    """A grid file (TOML), to be written into directory `where`, with stage 1's base (as a path
    relative to `where`) and fixed keys, the chosen cells as one linked axis and `seeds` as the
    other."""
    if not seeds:
        raise ReportError("seeds: at least one new seed is needed")
    if not chosen:
        raise ReportError("no row has all its selection runs finished yet")
    lines = [
        f"# Stage 2 of {grid.source.name}: each row's chosen setting (byzps confirm) on new seeds.",
        f"base = {toml_value(os.path.relpath(grid.base, where))}",
        "",
        "[fixed]",
        *(f"{_key(k)} = {toml_value(v)}" for k, v in grid.fixed.items()),
        "",
        "[axes]",
        # An axis is named by a key it sets; its values set every axis key of stage 1 together.
        f"{_key(next(iter(chosen[0])))} = [",
        *(
            f"  {{ {', '.join(f'{_key(k)} = {toml_value(v)}' for k, v in cell.items())} }},"
            for cell in chosen
        ),
        "]",
        f"{_key(SEED)} = {toml_value(list(seeds))}",
    ]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    """A dotted config key as a quoted TOML key (one key, not nested tables)."""
    return json.dumps(key)


def confirm(
    grid: Grid,
    sweep_dir: Path,
    objective: Objective,
    selection: Selection,
    seeds: Sequence[int],
    where: Path,
) -> tuple[str, Confirmation]:
    """The stage-2 grid text for stage 1's `grid` swept into `sweep_dir` (to be written into
    directory `where`), and what it chose."""
    overlap = sorted(set(seeds) & selection.seeds)
    if overlap:
        raise ReportError(f"seeds: {overlap[0]} is a selection seed; the new seeds must differ")
    done = choose(grid, expand(grid), sweep_dir, objective, selection)
    return confirm_grid_text(grid, done.chosen, seeds, where), done
