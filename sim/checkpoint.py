"""Mid-run checkpoints of a simulated run, so that a long cell killed part-way (a session's end,
an OOM kill, a reboot) resumes from its last evaluation instead of from round 0.

Why at evaluations: metrics.jsonl then ends on the checkpoint's round (a record written after
it, before a crash, is dropped on resume and written again), so a resumed run's files are the
uninterrupted run's, bit for bit but for the wall times. What is saved is every piece of state a
round reads (Simulation.state_dict: the engine's model, states and aggregator, the door, the
honest estimators, the Byzantine cohort, torch's global generator), under the run config's
digest: a checkpoint of another config is never resumed, the run starts over instead.

The file is written atomically (a crash leaves the old checkpoint or the new one) and removed
once the run's results are written; a finished run is recognised by its summary.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byzps.common.config import RunConfig
from byzps.server.checkpoint import save_atomic
from byzps.sim.simulation import Simulation

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = "byzps-sim-1"


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run stands: its last evaluation's round and record, and the seconds it
    had run (its wall clock goes on from there)."""

    round: int
    record: dict[str, Any]
    elapsed: float


def save(
    out: Path, config: RunConfig, simulation: Simulation, record: dict[str, Any], elapsed: float
) -> None:
    """Checkpoint `simulation` right after its evaluation `record` was written."""
    state = {
        "format": FORMAT,
        "digest": config.digest(),
        "simulation": simulation.state_dict(),
        "rng": torch.get_rng_state(),
        "record": json.dumps(record),
        "elapsed": elapsed,
    }
    save_atomic(state, out / CHECKPOINT)


def resume(out: Path, config: RunConfig, simulation: Simulation) -> Resumed | None:
    """Load out/checkpoint.pt into `simulation` and cut metrics.jsonl back to its round; None
    (nothing changed) when there is no checkpoint of this config."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        log.warning("%s: unreadable (%s); starting the run over", path, exc)
        return None
    if state.get("format") != FORMAT or state.get("digest") != config.digest():
        log.warning("%s: another run's checkpoint; starting the run over", path)
        return None
    simulation.load_state_dict(state["simulation"])
    torch.set_rng_state(state["rng"])
    record = json.loads(state["record"])
    _truncate_metrics(out / "metrics.jsonl", simulation.engine.round)
    return Resumed(simulation.engine.round, record, float(state["elapsed"]))


def discard(out: Path) -> None:
    """Remove the checkpoint of a run whose results are written."""
    (out / CHECKPOINT).unlink(missing_ok=True)


def _truncate_metrics(path: Path, round: int) -> None:
    """Keep the records up to `round` (the checkpoint's), and no cut last line."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record["round"] > round:
            break
        kept.append(line + "\n")
    path.write_text("".join(kept))
