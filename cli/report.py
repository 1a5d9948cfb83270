"""`byzps report`: tables and plots from a sweep directory (see byzps.sim.report)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import click

from byzps.sim.report import (
    LR,
    METRICS,
    SELECT_BY,
    Objective,
    ReportError,
    Selection,
    settings_were_chosen,
    write_report,
)


def select_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options that say how each row's setting is chosen; shared with `byzps confirm`, which
    must choose exactly as the report will."""
    for option in reversed(_SELECT_OPTIONS):
        command = option(command)
    return command


_SELECT_OPTIONS = [
    click.option(
        "--metric",
        type=click.Choice(METRICS),
        default="train_loss",
        show_default=True,
        help="The metric tabulated, plotted and used to choose each method's lr.",
    ),
    click.option(
        "--select-by",
        type=click.Choice(SELECT_BY),
        default="final",
        show_default=True,
        help="Choose each method's lr by the final value of the metric or the best value reached.",
    ),
    click.option(
        "--tune",
        multiple=True,
        metavar="KEY",
        help=f"A config key chosen per row besides {LR} (repeatable), e.g. algorithm.eta.",
    ),
    click.option(
        "--selection-seeds",
        type=int,
        multiple=True,
        metavar="SEED",
        help="Seeds whose runs choose the tuned keys (repeatable); the table then reports only "
        "the other seeds. Without it, the same seeds choose and are reported (biased).",
    ),
]


def selection_from(
    metric: str, select_by: str, tune: tuple[str, ...], selection_seeds: tuple[int, ...]
) -> tuple[Objective, Selection]:
    """The objective and selection those options describe (ReportError on a bad one)."""
    objective = Objective(metric, select_by)
    selection = Selection(
        (LR, *dict.fromkeys(k for k in tune if k != LR)), frozenset(selection_seeds)
    )
    return objective, selection


@click.command()
@click.argument("sweep_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report directory [default: SWEEP_DIR/report].",
)
@select_options
@click.option(
    "--partial",
    is_flag=True,
    help="List rows whose chosen setting has no run on a reported seed yet (an unfinished "
    "second stage) as pending in the report, instead of refusing it.",
)
@click.option(
    "--versus",
    multiple=True,
    metavar="A:B",
    help="Add head-to-head verdicts of method A against method B in every aggregator x attack "
    "cell, or of aggregator A against B in every method x attack cell (repeatable), e.g. "
    "byz-dm21:byz-ef21-sgdm or nnm∘cm:bulyan (or nnm+cm:bulyan).",
)
def report(
    sweep_dir: Path,
    out: Path | None,
    partial: bool,
    versus: tuple[str, ...],
    metric: str,
    select_by: str,
    tune: tuple[str, ...],
    selection_seeds: tuple[int, ...],
) -> None:
    """Write report.md (a table per attack, best setting per method) and PNG curves for a sweep."""
    out = out if out is not None else sweep_dir / "report"
    # Relative to where it ran, so the command works in any checkout of the same tree.
    where = [os.path.relpath(sweep_dir), "--out", os.path.relpath(out)]
    options = ["--metric", metric, "--select-by", select_by]
    options += [arg for key in tune for arg in ("--tune", key)]
    options += [arg for seed in selection_seeds for arg in ("--selection-seeds", str(seed))]
    options += ["--partial"] if partial else []
    options += [arg for pair in versus for arg in ("--versus", pair)]
    pairs = []
    for pair in versus:
        # Aggregators as the docs write them (nnm∘cm) or as the rows name them (nnm+cm).
        a, sep, b = pair.replace("∘", "+").partition(":")
        if not (sep and a and b) or a == b:
            raise click.BadParameter(
                f"expected two methods or two aggregators as A:B, got {pair!r}",
                param_hint="--versus",
            )
        pairs.append((a, b))
    command = shlex.join(["byzps", "report", *where, *options])
    try:
        objective, selection = selection_from(metric, select_by, tune, selection_seeds)
        pending: list[str] | None = [] if partial else None
        rows = write_report(sweep_dir, out, objective, command, selection, pending, pairs)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    chosen = settings_were_chosen(rows, pending or [])
    click.echo(f"selection: {objective.rule()}; {selection.describe(chosen)}")
    if pending:
        click.echo(f"{len(pending)} rows left out, not yet run on a reported seed", err=True)
    click.echo(f"{len(rows)} rows from {sum(len(r.runs) for r in rows)} runs: {out / 'report.md'}")
