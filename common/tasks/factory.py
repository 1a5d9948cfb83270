"""Build a task by name from configuration (the CLI, the simulator and the worker daemon)."""

from __future__ import annotations

from typing import Any

from byzps.common.tasks.base import TASKS, Task


def build_task(
    name: str,
    *,
    num_workers: int,
    seed: int,
    batch_size: int,
    split: str = "iid",
    alpha: float = 0.5,
    **params: Any,
) -> Task:
    """The registered task `name`; unknown names or task parameters raise a ValueError naming them.

    `seed` keys the data partition; `split` is a partitioner ("iid", "sorted-mix", "dirichlet")
    and `alpha` the Dirichlet concentration; `params` are the task's own (e.g. a9a's
    `regularizer`, `lam`).
    """
    return TASKS.build(
        name,
        num_workers=num_workers,
        seed=seed,
        batch_size=batch_size,
        split=split,
        alpha=alpha,
        **params,
    )
