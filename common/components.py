"""Build a run's components from its RunConfig: task, compressor, estimator, aggregator.

Every process of a run — the simulator, the server daemon, each worker daemon and the Byzantine
cohort — builds its parts through these functions, so they agree on every parameter. Problems
are ConfigErrors prefixed with the config section at fault.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from byzps.common.aggregators import build_aggregator
from byzps.common.aggregators.base import Aggregator
from byzps.common.aggregators.collective import ColumnSharded
from byzps.common.compressors import Compressor, build_compressor
from byzps.common.config import ConfigError, RunConfig
from byzps.common.estimators import ESTIMATORS, build_estimator
from byzps.common.estimators.base import Estimator
from byzps.common.shards import ShardLayout
from byzps.common.tasks import TASKS, build_task
from byzps.common.tasks.base import Task
from byzps.common.tasks.spec import DataSpec


def _accepted(factory: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `params` that `factory` takes (section keys that apply to some components
    only, such as a9a's regulariser or a momentum η)."""
    accepted = inspect.signature(factory).parameters
    return {k: v for k, v in params.items() if k in accepted and v is not None}


def run_data_spec(config: RunConfig) -> DataSpec:
    """The run's DataSpec: n, the seed, the task section's split and sampling keys, and the
    honest ids 0 … h − 1 (`config.honest_workers`). Every process builds its task from this one
    object, so the simulator, the worker daemons and the cohort map worker ids to the same
    shards."""
    t = config.task
    return DataSpec(
        num_workers=config.cluster.workers,
        seed=config.run.seed,
        batch_size=t.batch_size,
        split=t.split,
        alpha=t.alpha,
        sampling=t.sampling,
        split_over=t.split_over,
        honest_workers=config.honest_workers,
    )


def build_run_task(config: RunConfig) -> Task:
    t = config.task
    extra = {"regularizer": t.regularizer, "lam": t.lam}
    try:
        task_params = _accepted(TASKS.get(t.name), extra) | t.params
        return build_task(t.name, run_data_spec(config), **task_params)
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None


def build_run_compressor(config: RunConfig, task: Task) -> Compressor:
    c = config.compressor
    params = {"k": c.k, "ratio": c.ratio}
    if c.name == "topk":
        params["scope"] = c.scope
    params = {k: v for k, v in params.items() if v is not None} | c.params
    try:
        return build_compressor(
            c.name,
            task.dim,
            layer_sizes=task.layer_sizes,
            num_workers=config.cluster.workers,
            **params,
        )
    except ValueError as exc:
        raise ConfigError(f"compressor: {exc}") from None


def build_run_estimator(
    config: RunConfig,
    task: Task,
    compressor: Compressor,
    worker_ids: list[int],
    seeds: Sequence[int] | None = None,
) -> Estimator:
    """The run's estimator over `worker_ids`; `seeds`, one per row, when the rows belong to
    several runs (a batched simulation), else every row has the run seed."""
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
            seed=config.run.seed if seeds is None else list(seeds),
            device=task.device,
            **params,
        )
    except ValueError as exc:
        raise ConfigError(f"algorithm: {exc}") from None


def build_run_aggregator(config: RunConfig, dim: int | None = None) -> Aggregator:
    """The run's aggregator. Given the model's `dim`, a run of cluster.shards = S > 1 gets the
    rule as S column shards in this process (ColumnSharded: a sharded server's arithmetic, for
    the simulator); a shard server, which holds its own columns only, asks without `dim`."""

    def build() -> Aggregator:
        return build_aggregator(
            config.aggregator.name,
            config.cluster.byzantine,
            pre=config.aggregator.pre,
            params=config.aggregator.params,
            seed=config.run.seed,
            n=config.cluster.workers,
        )

    widths = None
    if dim is not None and config.cluster.shards > 1:
        widths = ShardLayout(dim, config.cluster.shards).widths
    try:
        return build() if widths is None else ColumnSharded(build, widths)
    except ValueError as exc:
        raise ConfigError(f"aggregator: {exc}") from None


def build_server_estimator(config: RunConfig, task: Task) -> Estimator:
    """A one-row estimator of the run's algorithm, never stepped: the server asks it which
    server rule to run and how many non-zeros a message of a given round may carry."""
    return build_run_estimator(config, task, build_run_compressor(config, task), [0])
