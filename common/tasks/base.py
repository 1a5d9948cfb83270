"""The task interface: a model, its data and its loss behind flat-vector gradients."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from byzps.common.estimators.base import GradientOracle
from byzps.common.registry import Registry

#: Every task constructor takes the run's DataSpec as `data` (byzps.common.tasks.spec).
TASKS: Registry[Task] = Registry("task", supplied=("data",))


class Task(ABC):
    """A learning problem over a flat parameter vector x ∈ R^d, split among n workers."""

    name: ClassVar[str]
    #: Number of label classes C (2 for binary tasks); the label-flip attack maps y → (C − 1) − y.
    num_classes: ClassVar[int]
    #: True when the task's oracles stack (`Oracle.stack`: the rows of several runs, each with
    #: its own model) — what a batched simulation of several runs needs (sim/batched.py).
    stacks_oracles: ClassVar[bool] = False

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def layer_sizes(self) -> tuple[int, ...]:
        """Sizes of the parameter tensors in flattening order (layer-wise Top-k uses them)."""

    @abstractmethod
    def init_params(self, seed: int) -> Tensor:
        """The starting point x⁰ (shape (d,))."""

    @abstractmethod
    def oracle(
        self, workers: Sequence[int], seed: int, *, flip_labels: bool = False
    ) -> GradientOracle:
        """A batched gradient oracle for the given worker ids (their own shards).

        `flip_labels` maps y → (C − 1) − y on those shards (the label-flip attack).
        """

    @abstractmethod
    def evaluate(self, x: Tensor) -> dict[str, float]:
        """Metrics at x: at least train_loss and grad_norm_sq; test_loss, test_accuracy if known."""
