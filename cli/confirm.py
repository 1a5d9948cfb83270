"""`byzps confirm`: the stage-2 grid of a two-stage study (see byzps.sim.confirm)."""

from __future__ import annotations

from pathlib import Path

import click

from byzps.cli.report import select_options, selection_from
from byzps.sim.confirm import confirm as confirm_grid
from byzps.sim.grid import GridError, load_grid
from byzps.sim.report import ReportError


@click.command()
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--grid",
    "grid_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The stage-1 grid file that was swept into SWEEP_DIR.",
)
@click.option(
    "--seed",
    "seeds",
    type=int,
    multiple=True,
    required=True,
    metavar="SEED",
    help="A seed to run each chosen setting on (repeatable); none may be a selection seed.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the stage-2 grid file.",
)
@select_options
def confirm(
    sweep_dir: Path,
    grid_path: Path,
    seeds: tuple[int, ...],
    out: Path,
    metric: str,
    select_by: str,
    tune: tuple[str, ...],
    selection_seeds: tuple[int, ...],
) -> None:
    """Write the grid that runs each row's chosen setting (chosen on --selection-seeds, by the
    rule `byzps report` uses) on new seeds; sweep it into SWEEP_DIR, then report."""
    try:
        grid = load_grid(grid_path)
        objective, selection = selection_from(metric, select_by, tune, selection_seeds)
        text, done = confirm_grid(grid, sweep_dir, objective, selection, seeds, out.parent)
    except (GridError, ReportError) as exc:
        raise click.ClickException(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    click.echo(f"selection: {objective.rule()}; {selection.describe()}")
    waiting = f"; {done.waiting} rows still wait for stage-1 runs" if done.waiting else ""
    click.echo(f"{len(done.chosen)} rows chosen{waiting}: {out}")
