"""`byzps sweep`: run every cell of a grid file with the simulator, resuming finished cells."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import click

from byzps.common.catalog import check_components
from byzps.sim.grid import (
    Cell,
    CellOutcome,
    GridError,
    expand,
    is_done,
    load_grid,
    manifest,
    plan_batches,
    run_batch_of_cells,
)

#: How often a pool worker checks that the sweep that started it is still alive.
PARENT_CHECK_SECONDS = 1.0


def _set_threads(torch_threads: int, numba_threads: int) -> tuple[int, int]:
    """Run torch and numba on these many threads; returns their counts before.

    Every cell runs on one of each, whatever --jobs is: N processes each using every core would
    oversubscribe the machine, and a cell's records must not depend on --jobs. numba's kernels
    sum fixed chunks in a fixed order, so its thread count changes no bit, but torch's CPU
    reductions split by thread: on an Intel Xeon, a9a's full gradient at x = 0 gave
    ‖∇f‖² = 0.03285434 on one thread and 0.03285316 on two."""
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)
    return before


def _pool_worker(sweep_pid: int) -> None:
    """Pool initializer: one thread (`_set_threads`), and exit when the sweep dies.

    A sweep killed with SIGKILL cannot stop its pool, and the workers would go on running cells
    no one reads, holding their cells' locks against the next sweep; so each worker watches its
    parent and exits (as if killed: checkpoints and locks are made for that) once it is gone.
    """
    _set_threads(1, 1)
    threading.Thread(target=_exit_with, args=(sweep_pid,), daemon=True).start()


def _exit_with(sweep_pid: int) -> None:
    """Wait for the process `sweep_pid` to stop being this one's parent, then exit at once."""
    while os.getppid() == sweep_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _shown(path: Path) -> str:
    """`path` as the regenerate command in grid.json and the report shows it: relative to the
    working directory when inside it (so a committed report names no one's home), else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _run_all(batches: list[list[Cell]], out: Path, jobs: int) -> Iterator[CellOutcome]:
    """Outcomes in completion order, batch by batch; in-process for one job (no spawn cost)."""
    if jobs == 1:
        before = _set_threads(1, 1)
        try:
            for batch in batches:
                yield from run_batch_of_cells(batch, out)
        finally:
            _set_threads(*before)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_pool_worker, initargs=(os.getpid(),)
    ) as pool:
        futures = {pool.submit(run_batch_of_cells, batch, out): batch for batch in batches}
        for future in as_completed(futures):
            try:
                yield from future.result()
            except Exception as exc:  # the worker process itself died
                for cell in futures[future]:
                    yield CellOutcome(cell.name, "failed", error=repr(exc))


def manifest_path(out: Path, grid_path: Path) -> Path:
    """grid.json, unless a sweep of another grid wrote it: then grid.<stem>.json, so that a
    second stage swept into the same directory (`byzps confirm`) keeps the first's record and the
    report can name both commands."""
    first = out / "grid.json"
    try:
        recorded = json.loads(first.read_text())["grid"]
    except (OSError, ValueError, KeyError, TypeError):
        return first
    return first if recorded == str(grid_path.resolve()) else out / f"grid.{grid_path.stem}.json"


def _line(outcome: CellOutcome) -> str:
    if outcome.status == "failed":
        return f"failed  {outcome.name}: {outcome.error}"
    assert outcome.final is not None
    loss = outcome.final["train_loss"]
    shared = f" (batch of {outcome.batch})" if outcome.batch > 1 else ""
    return f"run     {outcome.name}  train_loss {loss:.6g}  {outcome.seconds:.2f} s{shared}"


@click.command()
@click.option(
    "--grid",
    "grid_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Grid file (TOML: base, [fixed], [axes]).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Sweep directory; one sub-directory per cell.",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Batches run at once, each in its own process with one thread.",
)
@click.option(
    "--batch",
    "batch_size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most runs advanced together by one batched simulation (cells that differ only in "
    "run.seed and algorithm.lr; bit-identical to running them alone); 1 runs every cell alone. "
    "Groups are cut into near-equal batches, and into smaller ones while there are fewer "
    "batches than --jobs.",
)
def sweep(grid_path: Path, out: Path, jobs: int, batch_size: int) -> None:
    """Run every cell of a grid; cells already finished with the same config are skipped."""
    try:
        grid = load_grid(grid_path)
        cells = expand(grid, check_components)
    except GridError as exc:
        raise click.ClickException(f"{grid_path}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    command = ["byzps", "sweep", "--grid", _shown(grid_path), "--out", _shown(out)]
    if jobs > 1:
        command += ["--jobs", str(jobs)]
    manifest_path(out, grid_path).write_text(
        json.dumps(manifest(grid, cells, command), indent=2, default=str) + "\n"
    )

    todo = [cell for cell in cells if not is_done(out / cell.name, cell.config)]
    skipped = len(cells) - len(todo)
    pending = {cell.name for cell in todo}
    for cell in cells:
        if cell.name not in pending:
            click.echo(f"skipped {cell.name}  (finished, same config)")
    failed = 0
    for outcome in _run_all(plan_batches(todo, batch_size, jobs), out, jobs):
        failed += outcome.status == "failed"
        click.echo(_line(outcome), err=outcome.status == "failed")
    click.echo(f"sweep {out}: {len(todo) - failed} run, {skipped} skipped, {failed} failed")
    if failed:
        raise click.exceptions.Exit(1)
