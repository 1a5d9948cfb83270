"""The server's round engine: per-worker states, aggregation and the model step, transport-free.

The gRPC service (and the in-process simulator) hand it messages; it knows nothing about sockets,
sequence numbers or authentication — those are checked at the door before a message gets here.
One engine object is the whole learning state of a server, which is why it is also the unit of
checkpointing (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from byzps.common.aggregators.base import Aggregator
from byzps.common.components import build_run_aggregator, build_server_estimator
from byzps.common.config import RunConfig
from byzps.common.estimators.base import Estimator
from byzps.common.server_rules import ServerRule, build_server_rule
from byzps.common.sparse import SparseBatch
from byzps.common.tasks.base import Task


class RoundEngine:
    """Runs rounds:  absorb messages → ĝ = ARAgg(candidates) → x ← x − γ ĝ.

    A worker that sent nothing in a round keeps its stale candidate (its error-feedback state), so
    a late or missing worker is harmless rather than fatal. A late message still lands on its
    worker's state and counts for the next round.
    """

    def __init__(self, x0: Tensor, rule: ServerRule, aggregator: Aggregator, lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.x = x0.clone()
        self.rule = rule
        self.aggregator = aggregator
        self.lr = lr
        self.round = 0
        self.last_aggregate = torch.zeros_like(self.x)

    @property
    def num_workers(self) -> int:
        return int(self.rule.candidates.shape[0])

    def absorb(self, rows: Tensor, messages: SparseBatch) -> None:
        """Apply one message per listed worker row to the current round's states, exactly once."""
        self.rule.absorb(rows, messages, self.round)

    def close_round(self) -> Tensor:
        """Aggregate, step the model, advance the round; returns the aggregate ĝ."""
        aggregate = self.aggregator(self.rule.candidates)
        self.x.sub_(aggregate, alpha=self.lr)
        self.rule.close_round(aggregate, self.round)
        self.last_aggregate = aggregate
        self.round += 1
        return aggregate

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self.x.clone(),
            "round": self.round,
            "lr": self.lr,
            "last_aggregate": self.last_aggregate.clone(),
            "rule": self.rule.state_dict(),
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x = state["x"].clone()
        self.round = int(state["round"])
        self.lr = float(state["lr"])
        self.last_aggregate = state["last_aggregate"].clone()
        self.rule.load_state_dict(state["rule"])
        self.aggregator.load_state_dict(state["aggregator"])


def build_engine(config: RunConfig, task: Task, estimator: Estimator | None = None) -> RoundEngine:
    """The server's round engine at x⁰: the rule `estimator` needs, the run's aggregator and lr.

    Shared by the simulator and the gRPC server, so both aggregate and step identically.
    """
    estimator = estimator if estimator is not None else build_server_estimator(config, task)
    rule = build_server_rule(
        estimator.server_rule,
        config.cluster.workers,
        task.dim,
        **estimator.server_rule_params(),
    )
    return RoundEngine(
        task.init_params(config.run.seed), rule, build_run_aggregator(config), config.algorithm.lr
    )
