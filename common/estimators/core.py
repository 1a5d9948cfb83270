"""Machinery every estimator shares: batching over worker rows, seeded compression, momenta,
the server mirror and its commit, the previous model, and generic state serialisation.

Each concrete estimator then writes only its update rule. Three layers:

* `BatchedEstimator`: rows, dtype, seeds, `_track` (momentum), `_remember` (x^{t−1}), state_dict;
* `MirroredEstimator`: a mirror of the server's per-worker state (g or h), message C(δ) for a
  subclass-defined δ, and `commit` = mirror ← mirror + scale·c — only after acknowledgement;
* `ErrorFeedbackEstimator`: the EF21 form δ = target − g with scale 1.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from byzps.common.compressors import COMPRESSORS, Compressor, Identity
from byzps.common.estimators.base import Batch, Estimator, GradientOracle
from byzps.common.server_rules import scatter_add_rows
from byzps.common.sparse import SparseBatch


def check_unit_interval(name: str, value: float) -> float:
    """A weight in (0, 1] (η, a, p), or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def require_unbiased(name: str, compressor: Compressor) -> None:
    """Baselines whose analysis needs E[Q(z)] = z (CSGD, DIANA, MARINA, DASHA) refuse the
    contractive compressors (Top-k, scaled sign)."""
    if not compressor.unbiased:
        ok = [n for n in COMPRESSORS.names() if getattr(COMPRESSORS.get(n), "unbiased", False)]
        raise ValueError(
            f"compressor: {name} needs an unbiased compressor ({', '.join(ok)}), "
            f"got {compressor.name!r}"
        )


class BatchedEstimator(Estimator):
    """Common state of w worker rows: (w, d) tensors named in `_state_names`, a message counter
    `steps` (0 means "no message yet": the initialisation round) and, for the variance-reduced
    estimators, the previous model x^{t−1}.

    Keyword arguments shared by every estimator: num_workers (default len(worker_ids) or 1),
    worker_ids (default 0..w−1; they key the Rand-k seeds derive_seed(seed, "randk", id, round)),
    seed (the run seed), dtype and device of the state.
    """

    _state_names: ClassVar[tuple[str, ...]] = ()
    #: True for estimators that evaluate the previous model (VR-DM21, MARINA, DASHA-PAGE).
    _keeps_prev_model: ClassVar[bool] = False
    #: True for estimators that draw one coin per round for the whole run (MARINA, DASHA-PAGE):
    #: rows of different runs cannot share one instance.
    _shared_coin: ClassVar[bool] = False

    def __init__(
        self,
        dim: int,
        compressor: Compressor,
        *,
        num_workers: int | None = None,
        worker_ids: Sequence[int] | None = None,
        seed: int | Sequence[int] = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if compressor.dim != dim:
            raise ValueError(f"compressor: its dim {compressor.dim} is not dim={dim}")
        if worker_ids is None:
            worker_ids = tuple(range(1 if num_workers is None else num_workers))
        worker_ids = tuple(int(i) for i in worker_ids)
        if num_workers is None:
            num_workers = len(worker_ids)
        if num_workers < 1:
            raise ValueError(f"num_workers must be positive, got {num_workers}")
        if len(worker_ids) != num_workers:
            raise ValueError(f"worker_ids has {len(worker_ids)} entries, num_workers={num_workers}")
        self.dim = dim
        self.compressor = compressor
        self.num_workers = num_workers
        self.worker_ids = worker_ids
        seeds = [int(seed)] * num_workers if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != num_workers:
            raise ValueError(f"seed: {len(seeds)} seeds for {num_workers} rows")
        if self._shared_coin and len(set(seeds)) > 1:
            raise ValueError(f"{self.name} draws one coin per run: its rows must share a seed")
        #: The run seed (of the first row; rows of a batched simulation's runs bring their own).
        self.seed = seeds[0]
        # Consecutive rows of one seed: the compressor keys each run's rows with its own seed.
        self._seed_groups = _runs_of_equal(seeds, worker_ids)
        self.dtype = dtype
        self.device = torch.device(device)
        self.steps = 0
        self.x_prev: Tensor | None = None
        self._grad_buffer: Tensor | None = None
        for name in self._state_names:
            setattr(self, name, torch.zeros(num_workers, dim, dtype=dtype, device=self.device))

    # --- the round template ----------------------------------------------------------------

    def message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        """Each call advances local state: a retry resends the returned batch, not a new call."""
        x = x.detach().to(dtype=self.dtype, device=self.device)
        msg = self._message(x, oracle, round)
        if self._keeps_prev_model:
            self.x_prev = x.clone()
        self.steps += 1
        return msg

    @abstractmethod
    def _message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        """The update rule: advance local state, return the messages."""

    def commit(self, message: SparseBatch, rows: Sequence[int] | None = None) -> None:
        """Estimators without a server mirror have nothing to commit."""
        del message, rows

    def max_nnz(self, round: int) -> int:
        return self.compressor.k

    # --- helpers for the update rules ---------------------------------------------------------

    @property
    def first(self) -> bool:
        """True while computing the first message (the t = 0 initialisation)."""
        return self.steps == 0

    def compress(self, z: Tensor, round: int, minus: Tensor | None = None) -> SparseBatch:
        """C(z − minus) (C(z) without `minus`) for every row; a seeded compressor gets its seeds
        for these workers and round (Compressor.row_seeds: derive_seed(seed, name, id, round), or
        Perm-K's shared one)."""
        c = self.compressor
        seeds = None
        if c.seeded:
            seeds = tuple(
                s for seed, ids in self._seed_groups for s in c.row_seeds(seed, ids, round)
            )
        return c.compress_difference(z, minus, seeds, self.worker_ids)

    def _cast(self, g: Tensor) -> Tensor:
        if g.shape != (self.num_workers, self.dim):
            raise ValueError(
                f"oracle returned shape {tuple(g.shape)}, expected ({self.num_workers}, {self.dim})"
            )
        return g.detach().to(dtype=self.dtype, device=self.device)

    def grad(
        self, oracle: GradientOracle, x: Tensor, batch: Batch, *, reuse: bool = False
    ) -> Tensor:
        """The rows' stochastic gradients at x, in the state's dtype. `reuse=True` promises that
        the caller no longer reads the last result it got with `reuse=True`, so the oracle may
        write this one into the same buffer (GradientOracle.grad's `out`): at d = 1e7 a fresh
        40 MB buffer a round cost its workers a tenth of their CPU in the kernel's page zeroing."""
        raw = oracle.grad(x, batch, out=self._grad_buffer if reuse else None)
        if reuse:
            self._grad_buffer = raw
        return self._cast(raw)

    def full_grad(self, oracle: GradientOracle, x: Tensor) -> Tensor:
        return self._cast(oracle.full_grad(x))

    def _track(self, name: str, new: Tensor, eta: float, init_scale: float = 1.0) -> Tensor:
        """Momentum: state ← init_scale·new on the first message, else (1 − η)·state + η·new."""
        state: Tensor = getattr(self, name)
        if self.first:
            state.copy_(new).mul_(init_scale)
        else:
            state.mul_(1.0 - eta).add_(new, alpha=eta)
        return state

    # --- serialisation -------------------------------------------------------------------------

    def state_dict(self, *, copy: bool = True) -> dict[str, Any]:
        def out(t: Tensor) -> Tensor:
            return t.clone() if copy else t

        state: dict[str, Any] = {name: out(getattr(self, name)) for name in self._state_names}
        state["steps"] = self.steps
        if self._keeps_prev_model:
            state["x_prev"] = None if self.x_prev is None else out(self.x_prev)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        needed = [*self._state_names, "steps", *(["x_prev"] if self._keeps_prev_model else [])]
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        for name in self._state_names:
            mine: Tensor = getattr(self, name)
            value = torch.as_tensor(state[name])
            if value.shape != mine.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, expected {tuple(mine.shape)}"
                )
            mine.copy_(value)
        self.steps = int(state["steps"])
        if self._keeps_prev_model:
            xp = state["x_prev"]
            self.x_prev = (
                None if xp is None else xp.detach().to(dtype=self.dtype, device=self.device).clone()
            )


def _runs_of_equal(seeds: Sequence[int], worker_ids: Sequence[int]) -> list[tuple[int, list[int]]]:
    """[(seed, worker ids of its consecutive rows)]: the rows grouped by run, in order."""
    groups: list[tuple[int, list[int]]] = []
    for seed, worker in zip(seeds, worker_ids, strict=True):
        if groups and groups[-1][0] == seed:
            groups[-1][1].append(worker)
        else:
            groups.append((seed, [worker]))
    return groups


class MirroredEstimator(BatchedEstimator):
    """Sends c = C(δ) and, once acknowledged, mirrors the server: mirror ← mirror + scale·c.

    `message` never touches the mirror, so an unacknowledged (lost) message leaves both sides
    equal and the next δ, computed against the unchanged mirror, carries what was lost.
    """

    #: Name of the (w, d) state tensor that mirrors the server's per-worker state.
    _mirror: ClassVar[str] = "g"
    commit_scale: float = 1.0

    def _message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        z, minus = self._delta(x, oracle, round)
        return self.compress(z, round, minus)

    @abstractmethod
    def _delta(self, x: Tensor, oracle: GradientOracle, round: int) -> tuple[Tensor, Tensor | None]:
        """The vector to compress this round as (a, b) meaning a − b, or (δ, None): the
        compressor may select from a and b without a (w, d) buffer for their difference."""

    def commit(self, message: SparseBatch, rows: Sequence[int] | None = None) -> None:
        """mirror[rows] ← mirror[rows] + scale·c for the acknowledged rows (default: all)."""
        mirror: Tensor = getattr(self, self._mirror)
        r = torch.arange(self.num_workers) if rows is None else torch.as_tensor(rows)
        r = r.to(dtype=torch.long, device=self.device).reshape(-1)
        if message.dim != self.dim or message.num_rows != r.numel():
            raise ValueError(
                f"message has {message.num_rows} rows of dim {message.dim}, "
                f"expected {r.numel()} of dim {self.dim}"
            )
        scatter_add_rows(mirror, r, message, alpha=self.commit_scale)


class ErrorFeedbackEstimator(MirroredEstimator):
    """EF21 form: δ = target − g, i.e. c = C(target − g), and g ← g + c at commit."""

    server_rule = "state"

    def _message(self, x: Tensor, oracle: GradientOracle, round: int) -> SparseBatch:
        """c = ef_factor · C(target − g): an unbiased C with ω ≥ 1 is scaled by 1/(ω + 1) so the
        state contracts to its target (Compressor.ef_factor); contractive ones are unscaled."""
        message = super()._message(x, oracle, round)
        factor = self.compressor.ef_factor
        return message if factor == 1.0 else self.compressor.scaled(message, factor)

    def _delta(self, x: Tensor, oracle: GradientOracle, round: int) -> tuple[Tensor, Tensor]:
        return self._target(x, oracle, round), self.g

    @abstractmethod
    def _target(self, x: Tensor, oracle: GradientOracle, round: int) -> Tensor:
        """(w, d): the vector g tracks (a gradient or a momentum)."""


def require_identity(name: str, compressor: Compressor) -> None:
    if not isinstance(compressor, Identity):
        raise ValueError(
            f"compressor: {name} sends dense vectors; use 'identity', got {compressor.name!r}"
        )
