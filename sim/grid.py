"""Experiment grids: expand a grid file into cells, name them, and decide which still need a run.

A grid file is TOML:

    base = "run.toml"                         # relative to the grid file
    [fixed]                                   # overrides applied to every cell
    "run.rounds" = 2000
    [axes]                                    # the cartesian product of these is the set of cells
    "algorithm.name" = ["byz-dm21", { "algorithm.name" = "br-csgd", "compressor.name" = "randk" }]
    "run.seed" = [0, 1, 2]

An axis value that is a table changes several keys together (a baseline that needs its own
unbiased compressor), so the product never pairs a method with a compressor it cannot use.

Why the whole grid is validated before anything runs: a typo in the last cell of a ten-hour sweep
should cost seconds, not ten hours. Why cells are resumed by config digest rather than by name: the
name only encodes the axis values, so a changed base file or [fixed] table must still rerun them.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byzps.common.config import ConfigError, RunConfig
from byzps.common.runlock import RunLock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: One setting of an axis: dotted config key → value (one entry, or several linked ones).
Assignment = dict[str, Any]
Checker = Callable[[RunConfig], None]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_LABEL = 96
_SECTIONS = frozenset(RunConfig.__dataclass_fields__)


class GridError(ValueError):
    """A grid problem; the message names the grid key or the cell and config key at fault."""


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: the base config's data, fixed overrides and the axes in file order."""

    source: Path
    base: Path
    base_data: dict[str, Any]
    fixed: Assignment
    axes: dict[str, list[Assignment]]


@dataclass(frozen=True)
class Cell:
    """One point of the product: its directory name, the axis values that make it, its config."""

    name: str
    assignment: Assignment
    config: RunConfig


@dataclass(frozen=True)
class CellOutcome:
    """What running a cell gave: status "run" with its final record, or "failed" with the error."""

    name: str
    status: str
    seconds: float = 0.0
    final: dict[str, Any] | None = None
    error: str | None = None
    #: How many runs shared the cell's batch (`run_batch_of_cells`); `seconds` is the batch's.
    batch: int = 1


def load_grid(path: str | Path) -> Grid:
    """Read a grid file and its base config; every structural problem names its grid key."""
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise GridError(f"{source}: cannot read grid: {exc}") from None
    unknown = sorted(set(data) - {"base", "fixed", "axes"})
    if unknown:
        raise GridError(f"{unknown[0]}: unknown grid key (known: axes, base, fixed)")
    if not isinstance(data.get("base"), str):
        raise GridError("base: expected the path of a config file (relative to the grid file)")
    base = (source.parent / data["base"]).resolve()
    try:
        base_data = tomllib.loads(base.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise GridError(f"base: cannot read {base}: {exc}") from None
    fixed = _flatten(data.get("fixed", {}), "fixed")
    raw_axes = data.get("axes", {})
    if not isinstance(raw_axes, dict):
        raise GridError("axes: expected a table of key = [values]")
    axes = {key: _axis_values(key, values) for key, values in raw_axes.items()}
    _check_disjoint(axes)
    return Grid(source=source, base=base, base_data=base_data, fixed=fixed, axes=axes)


def _flatten(table: Any, where: str) -> Assignment:
    """`{"run.seed" = 1}` and `{run = {seed = 1}}` (TOML's unquoted dotted key) both become
    `{"run.seed": 1}`."""
    if not isinstance(table, dict):
        raise GridError(f"{where}: expected a table of section.key = value")
    flat: Assignment = {}
    for key, value in table.items():
        if key in _SECTIONS and isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}.{sub}"] = inner
        else:
            _check_key(key, where)
            flat[key] = value
    return flat


def _check_key(key: str, where: str) -> None:
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise GridError(f"{where}.{key}: expected a dotted config key such as algorithm.lr")


def _is_linked(value: Any) -> bool:
    """A table of config keys changed together, as opposed to a table-valued setting such as
    `algorithm.params = {p = 0.1}`."""
    return (
        isinstance(value, dict) and bool(value) and all("." in k or k in _SECTIONS for k in value)
    )


def _axis_values(key: str, values: Any) -> list[Assignment]:
    """Normalise an axis to a list of assignments; a table of config keys links several keys."""
    where = f"axes.{key}"
    _check_key(key, "axes")
    if not isinstance(values, list) or not values:
        raise GridError(f"{where}: expected a non-empty list of values")
    return [
        _flatten(value, f"{where}[{i}]") if _is_linked(value) else {key: value}
        for i, value in enumerate(values)
    ]


def _check_disjoint(axes: dict[str, list[Assignment]]) -> None:
    """Two axes setting one key would make the product depend on axis order: refuse it."""
    owner: dict[str, str] = {}
    for axis, values in axes.items():
        for key in {k for value in values for k in value}:
            if key in owner and owner[key] != axis:
                raise GridError(f"axes.{axis}: sets {key}, already set by axes.{owner[key]}")
            owner[key] = axis


def expand(grid: Grid, check: Checker | None = None) -> list[Cell]:
    """Every cell of the product, each config built and validated (plus `check`, e.g. the
    component registries). Raises one GridError listing every bad cell and its key."""
    cells: list[Cell] = []
    problems: list[str] = []
    names: dict[str, Assignment] = {}
    for combo in itertools.product(*grid.axes.values()):
        assignment: Assignment = {}
        for part in combo:
            assignment.update(part)
        name = cell_name(assignment)
        if name in names:
            problems.append(f"{name}: same settings as another cell ({names[name]})")
            continue
        names[name] = assignment
        try:
            config = build_config(grid.base_data, {**grid.fixed, **assignment})
            if check is not None:
                check(config)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
            continue
        cells.append(Cell(name=name, assignment=assignment, config=config))
    if problems:
        raise GridError(f"{len(problems)} bad cell(s):\n  " + "\n  ".join(problems))
    return cells


def build_config(base_data: Mapping[str, Any], settings: Assignment) -> RunConfig:
    """The base config with dotted-key `settings` written over it, validated."""
    data = copy.deepcopy(dict(base_data))
    for key, value in settings.items():
        *sections, leaf = key.split(".")
        node = data
        for part in sections:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        node[leaf] = copy.deepcopy(value)
    return RunConfig.from_dict(data)


def cell_name(assignment: Assignment) -> str:
    """Readable, filesystem-safe and deterministic: the axis values, then a short hash of them
    (so values that slug alike, or a truncated label, still give distinct names)."""
    tokens = [_token(key, value) for key, value in assignment.items()]
    label = _UNSAFE.sub("-", "_".join(tokens)).strip("-_.")[:_MAX_LABEL] or "cell"
    canonical = json.dumps(assignment, sort_keys=True, separators=(",", ":"))
    return f"{label}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def _token(key: str, value: Any) -> str:
    """`algorithm.name = "cm"` reads as `cm`; other keys carry their short name: `lr0.05`."""
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    leaf = key.rsplit(".", 1)[-1]
    return text if leaf == "name" else f"{leaf}{text}"


def manifest(grid: Grid, cells: list[Cell], command: list[str]) -> dict[str, Any]:
    """grid.json: what was swept and how, so a report can name the command that regenerates it."""
    return {
        "grid": str(grid.source.resolve()),
        "base": str(grid.base),
        "command": command,
        "fixed": grid.fixed,
        "axes": grid.axes,
        "cells": [
            {
                "name": cell.name,
                "assignment": cell.assignment,
                "config_digest": cell.config.digest(),
            }
            for cell in cells
        ],
    }


def is_done(cell_dir: Path, config: RunConfig) -> bool:
    """A finished run of this very config: summary.json is written last and carries the digest."""
    try:
        summary = json.loads((cell_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("config_digest") == config.digest()


def run_cell(cell: Cell, out: Path) -> CellOutcome:
    """Run one cell into out/<name>/ with the simulator, from its last evaluation when a run
    of it was killed part-way (sim/checkpoint.py), else from scratch; never raises, so one bad
    cell in a process pool cannot stop the others."""
    from byzps.common.components import build_run_task
    from byzps.sim.build import build_simulation
    from byzps.sim.checkpoint import CHECKPOINT
    from byzps.sim.runner import run_simulation

    cell_dir = out / cell.name
    started = time.perf_counter()
    try:
        with cell_locks(out, [cell]):
            if cell_dir.exists() and not (cell_dir / CHECKPOINT).exists():
                shutil.rmtree(cell_dir)  # a partial or stale run: nothing in it can be trusted
            task = build_run_task(cell.config)
            simulation = build_simulation(cell.config, task)
            result = run_simulation(cell.config, task, simulation, cell_dir, checkpoints=True)
    except Exception as exc:
        return CellOutcome(
            cell.name, "failed", time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"
        )
    return CellOutcome(cell.name, "run", time.perf_counter() - started, final=result.final)


@contextmanager
def cell_locks(out: Path, cells: list[Cell]) -> Iterator[None]:
    """Hold OUT/<name>.lock of every cell while they run (RunLockError, naming the holder's PID,
    when another process holds one): two processes never write one cell — a second sweep on the
    same directory, or a worker a killed sweep left behind, which goes on with its cell."""
    locks: list[RunLock] = []
    try:
        for cell in cells:
            locks.append(RunLock(out, cell.name))
        yield
    finally:
        for lock in locks:
            lock.release()


def plan_batches(cells: list[Cell], size: int, jobs: int = 1) -> list[list[Cell]]:
    """The cells grouped into batches of at most `size` runs that one batched simulation can
    advance together (sim/batched.py: equal configs but for seed and lr); a cell that cannot
    share a batch, or `size` 1, makes a batch of its own. Grid order is kept within a batch.

    A group is cut into near-equal batches (17 cells at `size` 16: 9 and 8, not 16 and 1), and
    into more of them while there are fewer batches than `jobs` (16 cells on 2 jobs: two of
    8). A batch runs in one process on one thread, and its round costs a fixed part plus a part
    per run (`benchmarks/bench_batch_slope.py`), so R runs split over J idle cores finish in
    about (o + R·c/J) per round instead of (o + R·c); on one core near-equal batches cost what
    full ones do. The plan depends on `jobs`: a sweep resumed with another --jobs may cut its
    unfinished cells differently, and redoes the unfinished runs of a batch it no longer has."""
    from byzps.sim.batched import batch_key, batchable, seeds_may_differ

    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        config = cell.config
        if size < 2 or not batchable(config):
            key = f"alone:{cell.name}"
        else:
            key = batch_key(config) + ("" if seeds_may_differ(config) else f"|{config.run.seed}")
        groups.setdefault(key, []).append(cell)
    members = list(groups.values())
    parts = [-(-len(group) // size) for group in members]  # ceil: no batch above `size`
    while members and sum(parts) < jobs:
        # One more batch for the group whose batches are largest, while any has two cells.
        widest = max(range(len(members)), key=lambda g: -(-len(members[g]) // parts[g]))
        if len(members[widest]) <= parts[widest]:
            break
        parts[widest] += 1
    return [batch for group, k in zip(members, parts, strict=True) for batch in _cut(group, k)]


def _cut(group: list[Cell], parts: int) -> list[list[Cell]]:
    """`group` in `parts` consecutive pieces whose sizes differ by at most one, larger first."""
    base, extra = divmod(len(group), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        pieces.append(group[start:end])
        start = end
    return pieces


def run_batch_of_cells(cells: list[Cell], out: Path) -> list[CellOutcome]:
    """Run `cells` as one batched simulation into out/<name>/ each (one cell: `run_cell`).
    Never raises: a batch that cannot be built or fails falls back to its cells one by one, so
    a batch costs no result that the cells alone would give."""
    if len(cells) == 1:
        return [run_cell(cells[0], out)]
    from byzps.common.components import build_run_task
    from byzps.sim.batched import build_batched_simulation
    from byzps.sim.checkpoint import batch_path
    from byzps.sim.runner import run_batch

    started = time.perf_counter()
    try:
        with cell_locks(out, cells):
            configs = [cell.config for cell in cells]
            checkpoint = batch_path(out, configs)
            for cell in cells:
                if (out / cell.name).exists() and not checkpoint.exists():
                    shutil.rmtree(out / cell.name)
            tasks = [build_run_task(config) for config in configs]
            batch = build_batched_simulation(configs, tasks)
            outs = [out / cell.name for cell in cells]
            results = run_batch(configs, tasks, batch, outs, checkpoint)
    except Exception as exc:
        names = ", ".join(cell.name for cell in cells)
        print(f"batch failed ({type(exc).__name__}: {exc}); alone: {names}", file=sys.stderr)
        return [run_cell(cell, out) for cell in cells]
    seconds = time.perf_counter() - started
    return [
        CellOutcome(cell.name, "run", seconds, final=result.final, batch=len(cells))
        for cell, result in zip(cells, results, strict=True)
    ]
