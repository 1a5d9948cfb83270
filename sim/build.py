"""Build a Simulation from a RunConfig: the composition of task, estimators, cohort and engine.

Worker ids 0 … h−1 are honest and h … n−1 Byzantine; server rows equal worker ids. The honest
workers share one batched estimator, the Byzantine members one cohort — the same classes a worker
daemon runs with a single row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from byzps.common.aggregators import build_aggregator
from byzps.common.aggregators.base import Aggregator
from byzps.common.compressors import Compressor, build_compressor
from byzps.common.config import ConfigError, RunConfig
from byzps.common.estimators import build_estimator
from byzps.common.estimators.base import Estimator
from byzps.common.server_rules import build_server_rule
from byzps.common.tasks import build_task
from byzps.common.tasks.base import Task
from byzps.server.engine import RoundEngine
from byzps.sim.simulation import Simulation
from byzps.worker.byzantine import build_attack
from byzps.worker.byzantine.cohort import ByzantineCohort


def _accepted(factory: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `params` that `factory` takes (section keys that apply to some components
    only, such as a9a's regulariser or a momentum η)."""
    accepted = inspect.signature(factory).parameters
    return {k: v for k, v in params.items() if k in accepted and v is not None}


def build_run_task(config: RunConfig) -> Task:
    t = config.task
    extra = {"regularizer": t.regularizer, "lam": t.lam}
    try:
        from byzps.common.tasks import TASKS

        task_params = _accepted(TASKS.get(t.name), extra)
        return build_task(
            t.name,
            num_workers=config.cluster.workers,
            seed=config.run.seed,
            batch_size=t.batch_size,
            split=t.split,
            alpha=t.alpha,
            **task_params,
        )
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None


def build_run_compressor(config: RunConfig, task: Task) -> Compressor:
    c = config.compressor
    params = {"k": c.k, "ratio": c.ratio}
    if c.name == "topk":
        params["scope"] = c.scope
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return build_compressor(c.name, task.dim, layer_sizes=task.layer_sizes, **params)
    except ValueError as exc:
        raise ConfigError(f"compressor: {exc}") from None


def build_run_estimator(
    config: RunConfig, task: Task, compressor: Compressor, worker_ids: list[int]
) -> Estimator:
    from byzps.common.estimators import ESTIMATORS

    a = config.algorithm
    params = dict(a.params)
    params.update(_accepted(ESTIMATORS.get(a.name), {"eta": a.eta}))
    try:
        return build_estimator(
            a.name,
            task.dim,
            compressor,
            num_workers=len(worker_ids),
            worker_ids=worker_ids,
            seed=config.run.seed,
            **params,
        )
    except ValueError as exc:
        raise ConfigError(f"algorithm: {exc}") from None


def build_run_aggregator(config: RunConfig) -> Aggregator:
    try:
        return build_aggregator(
            config.aggregator.name,
            config.cluster.byzantine,
            pre=config.aggregator.pre,
            params=config.aggregator.params,
            seed=config.run.seed,
        )
    except ValueError as exc:
        raise ConfigError(f"aggregator: {exc}") from None


def build_server_estimator(config: RunConfig, task: Task) -> Estimator:
    """A one-row estimator of the run's algorithm, never stepped: the server asks it which
    server rule to run and how many non-zeros a message of a given round may carry."""
    return build_run_estimator(config, task, build_run_compressor(config, task), [0])


def build_engine(config: RunConfig, task: Task, estimator: Estimator | None = None) -> RoundEngine:
    """The server's round engine at x⁰: the rule `estimator` needs, the run's aggregator and lr.

    Shared by the simulator and the gRPC server, so both aggregate and step identically.
    """
    estimator = estimator if estimator is not None else build_server_estimator(config, task)
    rule = build_server_rule(
        estimator.server_rule,
        config.cluster.workers,
        task.dim,
        **estimator.server_rule_params(),
    )
    return RoundEngine(
        task.init_params(config.run.seed), rule, build_run_aggregator(config), config.algorithm.lr
    )


def build_simulation(config: RunConfig, task: Task | None = None) -> Simulation:
    """Everything a simulated run needs, wired as the distributed system would be."""
    task = task if task is not None else build_run_task(config)
    n = config.cluster.workers
    h = config.honest_workers
    seed = config.run.seed
    compressor = build_run_compressor(config, task)
    honest_ids = list(range(h))
    honest = build_run_estimator(config, task, compressor, honest_ids)
    engine = build_engine(config, task, honest)
    honest_part = {
        "honest": honest,
        "honest_oracle": task.oracle(honest_ids, seed),
        "honest_rows": torch.tensor(honest_ids, dtype=torch.long),
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
    )
    return Simulation(
        engine=engine,
        cohort=cohort,
        cohort_oracle=task.oracle(byz_ids, seed, flip_labels=attack.flips_labels),
        byzantine_rows=torch.tensor(byz_ids, dtype=torch.long),
        **honest_part,
    )
