"""Build a Simulation from a RunConfig: the composition of task, estimators, cohort and engine.

Worker ids 0 … h−1 are honest and h … n−1 Byzantine; server rows equal worker ids. The honest
workers share one batched estimator, the Byzantine members one cohort — the same classes a worker
daemon runs with a single row.
"""

from __future__ import annotations

import torch

from byzps.common.attacks import build_attack
from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.components import (
    build_run_aggregator,
    build_run_compressor,
    build_run_estimator,
    build_run_task,
)
from byzps.common.config import ConfigError, RunConfig
from byzps.common.devices import resolve_device
from byzps.common.tasks.base import Task
from byzps.server.engine import build_engine
from byzps.server.validation import Door
from byzps.sim.simulation import Simulation


def build_simulation(config: RunConfig, task: Task | None = None) -> Simulation:
    """Everything a simulated run needs, wired as the distributed system would be; on
    `run.device`, where the task (moved there, in place), the estimators, the cohort and the
    engine all compute."""
    task = task if task is not None else build_run_task(config)
    try:
        task.to(resolve_device(config.run.device))
    except ValueError as exc:
        raise ConfigError(f"run.device: {exc}") from None
    n = config.cluster.workers
    h = config.honest_workers
    seed = config.run.seed
    compressor = build_run_compressor(config, task)
    honest_ids = list(range(h))
    honest = build_run_estimator(config, task, compressor, honest_ids)
    # No downlink in one process: the change of ĝ would be computed for nobody.
    engine = build_engine(config, task, honest, sparse_downlink=False)
    honest_part = {
        "door": Door(
            task.dim, config.compressor.name, honest.max_nnz, config.run.rounds, compressor
        ),
        "honest": honest,
        "honest_oracle": task.oracle(honest_ids, seed),
        "honest_rows": torch.tensor(honest_ids, dtype=torch.long),
        "inference": task.analytic_gradients,
    }
    if h == n:
        return Simulation(engine=engine, **honest_part)
    byz_ids = list(range(h, n))
    try:
        attack = build_attack(config.attack.name, **config.attack.params)
    except ValueError as exc:
        raise ConfigError(f"attack: {exc}") from None
    cohort = ByzantineCohort(
        attack,
        build_run_estimator(config, task, compressor, byz_ids),
        worker_ids=byz_ids,
        num_workers=n,
        dim=task.dim,
        seed=seed,
        knowledge=config.attack.knowledge,  # type: ignore[arg-type]
        # Its own copy (searches never touch the engine's), sharded as the engine's is.
        aggregator=build_run_aggregator(config, task.dim),
    )
    return Simulation(
        engine=engine,
        cohort=cohort,
        cohort_oracle=task.oracle(byz_ids, seed, flip_labels=attack.flips_labels),
        byzantine_rows=torch.tensor(byz_ids, dtype=torch.long),
        **honest_part,
    )
