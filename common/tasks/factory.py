"""Build a task by name from configuration (the CLI, the simulator and the worker daemon)."""

from __future__ import annotations

from typing import Any

from byzps.common.tasks.base import TASKS, Task
from byzps.common.tasks.spec import DataSpec


def build_task(name: str, data: DataSpec, /, **params: Any) -> Task:
    """The registered task `name` over the workers and split of `data`; unknown names or task
    parameters raise a ValueError naming them. `params` are the task's own (e.g. a9a's
    `regularizer`, `lam`)."""
    return TASKS.build(name, data=data, **params)
