"""`byzps simulate`: one run of the in-process simulator from a TOML config."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from byzps.cli.options import config_options, device_option, load_config
from byzps.cli.rundir import RESULT_FILES, claim, lock
from byzps.common.config import ConfigError


class ProgressLine:
    """Updates a click progress bar at every evaluation with round, loss and rounds/s — the
    rate since the previous evaluation, so that a resumed run (whose first call reports the
    round it resumed at) shows its own speed, not its resumed rounds over seconds."""

    def __init__(self, bar: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        self.bar = bar
        self.clock = clock
        self.last_time = clock()
        self.last_round = 0
        self.seen = False  # a rate needs an earlier evaluation to count from

    def __call__(self, round: int, record: dict[str, Any]) -> None:
        now = self.clock()
        parts = [f"loss {record['train_loss']:.5f}"]
        if "test_accuracy" in record:
            parts.append(f"acc {record['test_accuracy']:.4f}")
        if self.seen and round > self.last_round and now > self.last_time:
            parts.append(f"{(round - self.last_round) / (now - self.last_time):,.0f} rounds/s")
        self.bar.label = " | ".join(parts)
        self.bar.update(round - self.last_round)
        self.last_round, self.last_time, self.seen = round, now, True


@click.command()
@config_options
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace the results already in --out (else refused)."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last evaluation (a run is checkpointed at each "
    "one); a checkpoint of another config starts the run over.",
)
@device_option
def simulate(
    config_path: Path,
    overrides: tuple[str, ...],
    out: Path,
    overwrite: bool,
    resume: bool,
    device: str | None,
) -> None:
    """Run the whole cluster in one process and write metrics.jsonl, summary.json, params.npy."""
    from byzps.common.components import build_run_task
    from byzps.sim.build import build_simulation
    from byzps.sim.checkpoint import CHECKPOINT
    from byzps.sim.runner import run_simulation

    owned = (*RESULT_FILES, CHECKPOINT)
    config = load_config(config_path, overrides, device)
    if not overwrite:  # refuse at once, before the task's data is loaded
        claim(out, resume=resume, can_resume=True, owned=owned)
    try:
        task = build_run_task(config)
        simulation = build_simulation(config, task)
    except ConfigError as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    held = lock(out, "simulate")  # only now: a run that cannot start leaves nothing behind
    claim(out, resume=resume, overwrite=overwrite, can_resume=True, owned=owned)
    with click.progressbar(length=config.run.rounds, label="starting", show_pos=True) as bar:
        progress = ProgressLine(bar)
        result = run_simulation(config, task, simulation, out, progress, checkpoints=True)
    held.release()
    final = result.final
    if final.get("diverged"):
        raise click.ClickException(f"{config_path}: {final['diverged']} (results in {out})")
    click.echo(
        f"done: {result.rounds} rounds in {result.wall_seconds:.2f} s, "
        f"train_loss {final['train_loss']:.6f}, results in {out}"
    )
