"""Mid-run checkpoints of simulated runs, so that a long run killed part-way (a session's end,
an OOM kill, a reboot) resumes from its last evaluation instead of from round 0.

Why at evaluations: each run's metrics.jsonl then ends on the checkpoint's round (a record
written after it, before a crash, is dropped on resume and written again), so a resumed run's
files are the uninterrupted run's, bit for bit but for the wall times. What is saved is every
piece of state a round reads (the `state_dict` of a Simulation or a BatchedSimulation: models,
server states and aggregators, the honest estimators, the Byzantine cohort) and torch's global
generator, under a digest of the run configs: a checkpoint of other configs is never resumed,
the runs start over instead. Each run's last record is the last line its cut metrics file keeps.

One run keeps OUT/checkpoint.pt; a batch of a sweep keeps one file for the whole batch beside
its cells (`batch_path`). Either is written atomically (a crash leaves the old checkpoint or
the new one) and removed once the results are written; a finished run is recognised by its
summary.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from byzps.common.config import RunConfig
from byzps.server.checkpoint import save_atomic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = "byzps-sim-2"
_KEYS = ("format", "digest", "state", "rng", "elapsed")


class Stateful(Protocol):
    """A Simulation or a BatchedSimulation: its state, and the round it stands at."""

    @property
    def round(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run stands: its last evaluation's record (the round it ended on, for a
    run of a batch that stopped early) and the seconds it had run (its wall clock goes on)."""

    record: dict[str, Any]
    elapsed: float


def digest(configs: Sequence[RunConfig]) -> str:
    """What a checkpoint must match: the configs' digests, in order."""
    return hashlib.sha256("|".join(c.digest() for c in configs).encode()).hexdigest()


def batch_path(directory: Path, configs: Sequence[RunConfig]) -> Path:
    """The checkpoint of a batch of runs whose cells live in `directory`."""
    return directory / f"batch-{digest(configs)[:16]}.pt"


def save(path: Path, configs: Sequence[RunConfig], target: Stateful, elapsed: float) -> None:
    """Checkpoint `target` right after its runs' evaluations were written (`elapsed` seconds
    into the run)."""
    state = {
        "format": FORMAT,
        "digest": digest(configs),
        "state": target.state_dict(),
        "rng": torch.get_rng_state(),
        "elapsed": elapsed,
    }
    save_atomic(state, path)


def resume(
    path: Path,
    configs: Sequence[RunConfig],
    target: Stateful,
    outs: Sequence[Path | None],
) -> list[Resumed] | None:
    """Load `path` into `target` and cut each run's metrics.jsonl (in `outs`) back to the
    round the loaded target stands at, the last record kept being where that run stands; None
    (nothing changed) when there is no checkpoint of these configs."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a cut or foreign file raises anything (IndexError, …)
        log.warning("%s: unreadable (%s); starting over", path, exc)
        return None
    if not isinstance(state, dict) or any(key not in state for key in _KEYS):
        log.warning("%s: not a checkpoint of format %s; starting over", path, FORMAT)
        return None
    if state["format"] != FORMAT or state["digest"] != digest(configs):
        log.warning("%s: another run's checkpoint; starting over", path)
        return None
    target.load_state_dict(state["state"])
    torch.set_rng_state(state["rng"])
    elapsed = float(state["elapsed"])
    return [
        Resumed({} if out is None else _cut_metrics(out / "metrics.jsonl", target.round), elapsed)
        for out in outs
    ]


def discard(path: Path) -> None:
    """Remove the checkpoint of runs whose results are written."""
    path.unlink(missing_ok=True)


def _cut_metrics(path: Path, round: int) -> dict[str, Any]:
    """Keep the records up to `round` (the checkpoint's), and no cut last line; the last one
    kept ({} when none is)."""
    kept, last = [], {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record["round"] > round:
            break
        kept.append(line + "\n")
        last = record
    path.write_text("".join(kept))
    return last
