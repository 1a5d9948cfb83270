"""One simulated run: honest workers, a Byzantine cohort and the server engine, round by round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from byzps.common.aggregators.ops import threads_for
from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.common.sparse import SparseBatch
from byzps.server.engine import RoundEngine
from byzps.server.results import uplink_per_worker
from byzps.server.validation import Door


class NonFiniteMessage(RuntimeError):
    """An honest worker's update is refused at the door — it holds NaN or ±Inf, or absorbing it
    would make the worker's state non-finite: the run diverged. (A gRPC server refuses such an
    update, INVALID_ARGUMENT, and the honest worker stops; the simulator stops the run the same
    way, before the values reach the engine's states.)"""

    def __init__(self, round: int, worker: int, what: str, rows: int) -> None:
        more = f" ({rows - 1} other worker(s) too)" if rows > 1 else ""
        super().__init__(f"round {round}: honest worker {worker} {what}{more}: the run diverged")
        self.round = round
        self.worker = worker

    def saved(self) -> list[Any]:
        """[round, worker, message], for a checkpoint (`restored` reads it back)."""
        return [self.round, self.worker, str(self)]

    @classmethod
    def restored(cls, round: int, worker: int, message: str) -> NonFiniteMessage:
        stopped = cls.__new__(cls)
        RuntimeError.__init__(stopped, message)
        stopped.round, stopped.worker = int(round), int(worker)
        return stopped


def check_finite(messages: SparseBatch, rows: Tensor, round: int, refused: Tensor) -> None:
    """Raise NonFiniteMessage naming the first refused row of `messages` (engine row `rows[i]`):
    its first non-finite value, or the state it would overflow."""
    if not refused.numel():
        return
    i = int(refused[0])
    values = messages.row(i).values
    bad = values[~torch.isfinite(values)]
    what = (
        f"sent a non-finite message value ({float(bad[0])})"
        if bad.numel()
        else "sent an update that would make its state non-finite"
    )
    raise NonFiniteMessage(round, int(rows[i]), what, int(refused.numel()))


@dataclass
class Simulation:
    """Drives one round at a time, in the order a real cluster would see it:

    1. every honest worker computes its message at x^t and the server absorbs it (acknowledged,
       so the workers commit);
    2. the Byzantine cohort, which may observe the honest candidates (omniscient) or only its own
       shadows, computes its messages and the server absorbs them;
    3. the server closes the round: ĝ = ARAgg(candidates), x ← x − γ ĝ.

    Every message passes the gRPC server's own door (`Door.refused_rows`: finite values, a state
    that stays finite): a Byzantine member's refused message is dropped (its state stays stale,
    its cohort does not commit it), an honest worker's stops the run with NonFiniteMessage
    before it is absorbed.
    """

    engine: RoundEngine
    door: Door
    honest: Estimator
    honest_oracle: GradientOracle
    honest_rows: Tensor
    cohort: ByzantineCohort | None = None
    cohort_oracle: GradientOracle | None = None
    byzantine_rows: Tensor | None = None
    #: Payload bytes of every message the server absorbed, honest and Byzantine.
    bytes_total: int = 0
    #: Byzantine messages the door refused (one per member and round).
    refused: int = 0
    #: Rounds run under `torch.inference_mode` (`Task.analytic_gradients`).
    inference: bool = False

    def __post_init__(self) -> None:
        if (self.cohort is None) != (self.cohort_oracle is None):
            raise ValueError("a cohort needs its oracle and vice versa")

    @property
    def x(self) -> Tensor:
        return self.engine.x

    @property
    def round(self) -> int:
        """The round the run stands at (its engine's)."""
        return self.engine.round

    def state_dict(self) -> dict[str, Any]:
        """Every piece of state a round reads, for a resumed run to go on bit for bit
        (sim/checkpoint.py); the oracles and the door keep none (a round's batches are a function
        of the seed and the round)."""
        return {
            "engine": self.engine.state_dict(),
            "honest": self.honest.state_dict(),
            "cohort": None if self.cohort is None else self.cohort.state_dict(),
            "bytes_total": self.bytes_total,
            "refused": self.refused,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.honest.load_state_dict(state["honest"])
        if self.cohort is not None:
            self.cohort.load_state_dict(state["cohort"])
        self.bytes_total = int(state["bytes_total"])
        self.refused = int(state["refused"])

    @property
    def bytes_uplink(self) -> float:
        """Uplink bytes per worker, defined as the gRPC server reports it (all messages / n)."""
        return uplink_per_worker(self.bytes_total, self.engine.num_workers)

    def step(self) -> Tensor:
        """Run one round; returns the aggregate ĝ."""
        with threads_for(self.engine.x.numel()), torch.inference_mode(self.inference):
            return self._step()

    def _step(self) -> Tensor:
        t = self.engine.round
        x = self.engine.x
        honest_messages = self.honest.message(x, self.honest_oracle, t)
        refused = self.door.refused_rows(self.engine.rule, self.honest_rows, honest_messages, t)
        check_finite(honest_messages, self.honest_rows, t, refused)
        self.engine.absorb(self.honest_rows, honest_messages)
        self.honest.commit(honest_messages)
        self.bytes_total += self.honest.compressor.payload_bytes(honest_messages)
        if self.cohort is not None:
            assert self.cohort_oracle is not None and self.byzantine_rows is not None
            candidates = self.engine.rule.candidates
            honest_now = candidates.index_select(0, self.honest_rows.to(candidates.device))
            searched = self.cohort.attack.uses_aggregator
            state = self.engine.aggregator.state_dict() if searched else None
            byz_messages = self.cohort.messages(
                x, self.cohort_oracle, t, honest=honest_now, aggregator_state=state
            )
            bad = self.door.refused_rows(self.engine.rule, self.byzantine_rows, byz_messages, t)
            rows, members, accepted = self.byzantine_rows, None, byz_messages
            self.refused += int(bad.numel())
            if bad.numel():  # refused at the door, as the server does: those states stay stale
                members, accepted = _admitted_part(byz_messages, bad)
                rows = rows[members]
            if accepted is not None:
                self.engine.absorb(rows, accepted)
                self.cohort.commit(accepted, rows=None if members is None else members.tolist())
                self.bytes_total += self.honest.compressor.payload_bytes(accepted)
        aggregate = self.engine.close_round()
        if self.cohort is not None:
            self.cohort.close_round(aggregate, t)
        return aggregate


def _admitted_part(messages: SparseBatch, bad: Tensor) -> tuple[Tensor, SparseBatch | None]:
    """(member rows kept, their messages or None if none is kept): the rows of `messages` not
    in `bad`, which the server's door admits."""
    every = torch.arange(messages.num_rows)
    keep = every[~torch.isin(every, bad)]
    if not keep.numel():
        return keep, None
    return keep, messages.take(keep)
