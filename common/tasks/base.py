"""The task interface: a model, its data and its loss behind flat-vector gradients."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
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
    #: True when the task's oracles compute their gradients in closed form, never through
    #: autograd: a simulated round then runs under `torch.inference_mode`, which skips autograd's
    #: bookkeeping on each of its few hundred small ops (~8 % of an a9a round; sim/simulation.py).
    #: An oracle that calls `torch.autograd.grad` fails there, hence the default.
    analytic_gradients: ClassVar[bool] = False
    #: Where the task's data lives and its oracles compute (`to`); the estimators built for it
    #: keep their states there too (`components.build_run_estimator`).
    device: torch.device = torch.device("cpu")
    #: False for tasks whose data or noise is drawn on the CPU per call (their oracles would mix
    #: devices): `to` refuses to move them.
    movable: ClassVar[bool] = True

    def to(self, device: torch.device) -> Task:
        """Move the task's tensors to `device`, in place (the simulator on a GPU), and return
        it. Every tensor attribute moves (data, labels, evaluation rows); the workers' shards,
        kept in a list, stay on the CPU, where the samplers draw their batches so every device
        draws alike (indexing a GPU tensor with a CPU index is allowed)."""
        if device == self.device:
            return self
        if not self.movable:
            raise ValueError(f"task {self.name!r} runs on the CPU only")
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        self.device = device
        return self

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
