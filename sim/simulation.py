"""One simulated run: honest workers, a Byzantine cohort and the server engine, round by round."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.server.engine import RoundEngine
from byzps.server.results import message_bytes, uplink_per_worker
from byzps.worker.byzantine.cohort import ByzantineCohort


@dataclass
class Simulation:
    """Drives one round at a time, in the order a real cluster would see it:

    1. every honest worker computes its message at x^t and the server absorbs it (acknowledged,
       so the workers commit);
    2. the Byzantine cohort, which may observe the honest candidates (omniscient) or only its own
       shadows, computes its messages and the server absorbs them;
    3. the server closes the round: ĝ = ARAgg(candidates), x ← x − γ ĝ.
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
        self.engine.absorb(self.honest_rows, honest_messages)
        self.honest.commit(honest_messages)
        self.bytes_total += message_bytes(honest_messages.nnz) * honest_messages.num_rows
        if self.cohort is not None:
            assert self.cohort_oracle is not None and self.byzantine_rows is not None
            honest_now = self.engine.rule.candidates[self.honest_rows]
            byz_messages = self.cohort.messages(x, self.cohort_oracle, t, honest=honest_now)
            self.engine.absorb(self.byzantine_rows, byz_messages)
            self.cohort.commit(byz_messages)
            self.bytes_total += message_bytes(byz_messages.nnz) * byz_messages.num_rows
        aggregate = self.engine.close_round()
        if self.cohort is not None:
            self.cohort.close_round(aggregate, t)
        return aggregate
