"""The worker-side estimator interface and the gradient oracle it consumes.

Estimators are batched over a leading worker axis of size w: a worker daemon runs w = 1, the
simulator runs all honest workers (and the Byzantine cohort's shadow computations) as one w > 1
instance, so one piece of code serves both and the trajectories agree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

from torch import Tensor

from byzps.common.compressors import Compressor
from byzps.common.registry import Registry
from byzps.common.sparse import SparseBatch

ESTIMATORS: Registry[Estimator] = Registry(
    "algorithm",
    supplied=("dim", "compressor", "num_workers", "worker_ids", "seed", "dtype", "device"),
)


class Batch(Protocol):
    """An opaque mini-batch handle, one per worker row (drawn by `GradientOracle.sample`)."""


class GradientOracle(Protocol):
    """Stochastic and full local gradients for w workers at a shared model x of dimension d."""

    num_workers: int
    dim: int

    def sample(self, round: int) -> Batch:
        """The mini-batches of round `round` (a pure function of the oracle's seed and `round`)."""
        ...

    def grad(self, x: Tensor, batch: Batch, out: Tensor | None = None) -> Tensor:
        """(w, d): ∇f_i(x; ξ_i) for every worker row i on its part of `batch`.

        `out`, when given, is a buffer this oracle returned from an earlier call, which the
        caller no longer reads: the oracle may write the result into it and return it (a large-d
        worker then makes no fresh d-sized buffer a round), or ignore it."""
        ...

    def full_grad(self, x: Tensor) -> Tensor:
        """(w, d): ∇f_i(x), the full local gradient of every worker row."""
        ...


class Estimator(ABC):
    """A worker-side state machine: gradients in, one k-sparse message per worker out.

    The protocol per round t is: `message(x_t, oracle, t)` computes the message (and advances the
    purely local state such as momenta), then `commit(message)` advances the state that mirrors the
    server (e.g. g ← g + c) — only after the server acknowledged the message, so a lost message
    never desynchronises the two sides.
    """

    name: ClassVar[str]
    #: The compressor every message goes through (its k is the server's k_max, except where
    #: `max_nnz` says otherwise).
    compressor: Compressor
    #: Name of the ServerRule (byzps.common.server_rules) the server must run for this estimator.
    server_rule: ClassVar[str]

    @abstractmethod
    def message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        """The messages of round `round` for every worker row, at model `x` (shape (d,))."""

    @abstractmethod
    def commit(self, message: SparseBatch) -> None:
        """Advance the server-mirroring state once `message` has been acknowledged."""

    def server_rule_params(self) -> dict[str, Any]:
        """Keyword arguments the server rule `server_rule` needs (e.g. DIANA's a, MARINA's p)."""
        return {}

    def max_nnz(self, round: int) -> int:
        """The most non-zeros a message of round `round` may carry (the server's k_max)."""
        raise NotImplementedError

    @abstractmethod
    def state_dict(self, *, copy: bool = True) -> dict[str, Any]:
        """The state to checkpoint. `copy=False` returns the live tensors, for a caller that
        writes them out before the estimator moves again (the worker's per-round checkpoint)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
