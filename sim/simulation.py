"""One simulated run: honest workers, a Byzantine cohort and the server engine, round by round."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.common.sparse import SparseBatch
from byzps.server.engine import RoundEngine
from byzps.server.results import message_bytes, uplink_per_worker


class NonFiniteMessage(RuntimeError):
    """An honest worker's message holds NaN or ±Inf: the run diverged. (A gRPC server refuses
    such an update at its door, INVALID_ARGUMENT, and the honest worker stops; the simulator stops
    the run the same way, before the values reach the engine's states.)"""

    def __init__(self, round: int, worker: int, value: float, rows: int) -> None:
        more = f" ({rows - 1} other worker(s) too)" if rows > 1 else ""
        super().__init__(
            f"round {round}: honest worker {worker} sent a non-finite message value "
            f"({value}){more}: the run diverged"
        )
        self.round = round
        self.worker = worker


def nonfinite_rows(messages: SparseBatch) -> Tensor:
    """Indices of the rows of `messages` holding a NaN or ±Inf (one reduction when none do)."""
    values = messages.values
    if bool(torch.isfinite(values).all()):
        return torch.empty(0, dtype=torch.long)
    return (~torch.isfinite(values.reshape(messages.num_rows, -1))).any(dim=1).nonzero().flatten()


def check_finite(messages: SparseBatch, rows: Tensor, round: int) -> None:
    """Raise NonFiniteMessage naming the first row of `messages` (engine row `rows[i]`) that
    holds a NaN or ±Inf."""
    bad = nonfinite_rows(messages)
    if bad.numel():
        i = int(bad[0])
        row_values = messages.row(i).values
        first = float(row_values[~torch.isfinite(row_values)][0])
        raise NonFiniteMessage(round, int(rows[i]), first, int(bad.numel()))


@dataclass
class Simulation:
    """Drives one round at a time, in the order a real cluster would see it:

    1. every honest worker computes its message at x^t and the server absorbs it (acknowledged,
       so the workers commit);
    2. the Byzantine cohort, which may observe the honest candidates (omniscient) or only its own
       shadows, computes its messages and the server absorbs them;
    3. the server closes the round: ĝ = ARAgg(candidates), x ← x − γ ĝ.

    Non-finite messages are handled as the gRPC server's door handles them: a Byzantine member's
    is refused (its state stays stale, its cohort does not commit it), an honest worker's stops
    the run with NonFiniteMessage before it is absorbed.
    """

    engine: RoundEngine
    honest: Estimator
    honest_oracle: GradientOracle
    honest_rows: Tensor
    cohort: ByzantineCohort | None = None
    cohort_oracle: GradientOracle | None = None
    byzantine_rows: Tensor | None = None
    #: Payload bytes of every message the server absorbed, honest and Byzantine.
    bytes_total: int = 0

    def __post_init__(self) -> None:
        if (self.cohort is None) != (self.cohort_oracle is None):
            raise ValueError("a cohort needs its oracle and vice versa")

    @property
    def x(self) -> Tensor:
        return self.engine.x

    @property
    def bytes_uplink(self) -> float:
        """Uplink bytes per worker, defined as the gRPC server reports it (all messages / n)."""
        return uplink_per_worker(self.bytes_total, self.engine.num_workers)

    def step(self) -> Tensor:
        """Run one round; returns the aggregate ĝ."""
        t = self.engine.round
        x = self.engine.x
        honest_messages = self.honest.message(x, self.honest_oracle, t)
        check_finite(honest_messages, self.honest_rows, t)
        self.engine.absorb(self.honest_rows, honest_messages)
        self.honest.commit(honest_messages)
        self.bytes_total += message_bytes(honest_messages.nnz) * honest_messages.num_rows
        if self.cohort is not None:
            assert self.cohort_oracle is not None and self.byzantine_rows is not None
            honest_now = self.engine.rule.candidates[self.honest_rows]
            byz_messages = self.cohort.messages(x, self.cohort_oracle, t, honest=honest_now)
            bad = nonfinite_rows(byz_messages)
            rows, members, accepted = self.byzantine_rows, None, byz_messages
            if bad.numel():  # refused at the door, as the server does: those states stay stale
                members, accepted = _finite_part(byz_messages, bad)
                rows = rows[members]
            if accepted is not None:
                self.engine.absorb(rows, accepted)
                self.cohort.commit(accepted, rows=None if members is None else members.tolist())
                self.bytes_total += message_bytes(accepted.nnz) * accepted.num_rows
        aggregate = self.engine.close_round()
        if self.cohort is not None:
            self.cohort.close_round(aggregate, t)
        return aggregate


def _finite_part(messages: SparseBatch, bad: Tensor) -> tuple[Tensor, SparseBatch | None]:
    """(member rows kept, their messages or None if none is kept): the rows of `messages` not
    in `bad`, which the server's door would accept."""
    every = torch.arange(messages.num_rows)
    keep = every[~torch.isin(every, bad)]
    if not keep.numel():
        return keep, None
    return keep, SparseBatch.stack([messages.row(int(i)) for i in keep])
