"""The server's round engine: per-worker states, aggregation and the model step, transport-free.

The gRPC service (and the in-process simulator) hand it messages; it knows nothing about sockets,
sequence numbers or authentication — those are checked at the door before a message gets here.
One engine object is the whole learning state of a server, which is why it is also the unit of
checkpointing (`state_dict` / `load_state_dict`).

The change of ĝ. The step x ← x − γ ĝ touches every coordinate where ĝ ≠ 0 (dense once ĝ
is), so what can be sparse per round is the change of ĝ, not the change of x: `last_delta`
records it (the coordinates where ĝ's bits changed, and their new values) whenever it has at most
`delta_limit` · d entries. A worker that holds x and ĝ of the previous round reproduces the
server's x bit for bit by setting ĝ[indices] = values and applying the same float32 step
(`apply_step`); that is the sparse downlink (byzps.common.downlink). It is exact for every
aggregator; it pays off where ĝ moves on few coordinates — the coordinate-wise rules, whose ĝ
can only change on the columns the round's messages touched.

Incremental aggregation. Most rounds change the candidates only on U = the union of the
messages' supports (`ServerRule.touched`). For a coordinate-wise aggregator (mean, cm, cwtm;
`Aggregator.coordinatewise`) ĝ_t depends on column t alone, so the new aggregate equals the old
one outside U and only the |U| columns need recomputing — the same operations on the same values,
hence bit-identical to a full recompute. Reading scattered columns costs more per column than
one contiguous pass, so this is done only when |U| ≤ `incremental_limit` · d, by default the
rule's measured break-even (`Aggregator.column_share`): the band rules read the columns in
place and gain up to |U| ≈ 40–60 % of d (n = 20: cm on 18 % of the columns of 1e7 took about
half of the full pass's time), so they take it up to 0.4–0.5 · d; the mean gathers them, which
costs more than its whole (memory-bound) sum beyond ~1 %. Otherwise the delta is found by
comparing ĝ with its predecessor (~0.5 ms per 1e6 entries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common._state_kernels import (
    changed_entries,
    mark_columns,
    rewrite_columns,
    take_marked,
)
from byzps.common.aggregators.base import Aggregator
from byzps.common.aggregators.verdict import Verdict
from byzps.common.components import (
    build_run_aggregator,
    build_run_task,
    build_server_estimator,
)
from byzps.common.config import RunConfig
from byzps.common.devices import resolve_device
from byzps.common.downlink import AggregateDelta, apply_step
from byzps.common.estimators.base import Estimator
from byzps.common.server_rules import ServerRule, build_server_rule
from byzps.common.shards import ShardLayout, ShardRange
from byzps.common.sparse import INDEX_DTYPE, SparseBatch
from byzps.common.tasks.base import Task
from byzps.server.suspicion import SuspicionScores

_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_differ(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise a ≠ b on the bit patterns (unlike `!=`, tells −0.0 from +0.0)."""
    bits = _SAME_WIDTH_INT[a.element_size()]
    return a.view(bits) != b.view(bits)


@dataclass(frozen=True)
class Aggregated:
    """A round's aggregation done outside its engine — a batched simulation aggregates all its
    runs in one call (`RowsAggregator.aggregate_runs`) — bitwise what the engine would compute:
    ĝ of the round's candidates, the rule's verdict, and the discounts that verdict gives them
    (None: the engine asks the verdict itself)."""

    aggregate: Tensor
    verdict: Verdict | None
    discount: np.ndarray | None = None


class _DirtyColumns:
    """The union U of the columns a round's messages touched (`ServerRule.touched`), as a
    bitset kept from round to round: each absorb marks its columns (O(k), no copy of the
    message), and reading U clears it again (`_state_kernels.mark_columns`, `take_marked`).
    Tracking stops for the round once U cannot stay within `limit` · d: a message touching
    more than that alone, or more touches than 4 · limit · d (repeats counted)."""

    def __init__(self, dim: int, limit: float) -> None:
        self.dim = dim
        self.limit = limit
        #: False: U is unknown this round (or too large), aggregate in full.
        self.tracking = False
        self._bits: np.ndarray | None = None
        self._touches = 0
        self._stale = False  # marks not taken by `union` (an abandoned or unread round)

    def restart(self, tracking: bool) -> None:
        """A new round: track its columns or not."""
        self.tracking = tracking
        self._touches = 0
        if self._stale and self._bits is not None:
            self._bits.fill(0)
        self._stale = False
        if tracking and self._bits is None:
            self._bits = np.zeros((self.dim + 63) // 64, dtype=np.uint64)

    def add(self, touched: Tensor | None) -> None:
        """Mark the columns one absorb changed (None: it does not say, so U is unknown)."""
        assert self._bits is not None
        count = -1 if touched is None else touched.numel()
        self._touches += count
        if count < 0 or count > self.limit * self.dim or self._touches > 4 * self.limit * self.dim:
            self.tracking = False
            return
        self._stale = True
        if not mark_columns(self._bits, touched.cpu().numpy(), self.dim):
            raise IndexError(f"a touched column outside [0, {self.dim})")

    def union(self) -> Tensor | None:
        """U, sorted (a CPU tensor), when tracked and within the limit; None otherwise."""
        if not self.tracking or self._bits is None:
            return None
        if self._touches == 0:
            return torch.empty(0, dtype=torch.long)
        # A bitset, not unique(): one cheap pass where sorting n·k indices is not.
        columns = take_marked(self._bits)
        self._stale = False
        if columns.size > self.limit * self.dim:
            return None
        return torch.from_numpy(columns)


class RoundEngine:
    """Runs rounds:  absorb messages → ĝ = ARAgg(candidates) → x ← x − γ ĝ.

    A worker that sent nothing in a round keeps its stale candidate (its error-feedback state), so
    a late or missing worker is harmless rather than fatal. A late message still lands on its
    worker's state and counts for the next round.

    `delta_limit` is the largest |Δ| / d for which the change of ĝ is recorded in `last_delta`
    (8 bytes per changed entry against 4 per dense entry, hence 0.5); a negative value turns the
    sparse downlink off. `incremental_limit` is the largest |U| / d aggregated on the dirty
    columns only (see the module doc); negative: never; None: the aggregator's own measured
    break-even (`Aggregator.column_share`).
    """

    DELTA_LIMIT = 0.5

    def __init__(
        self,
        x0: Tensor,
        rule: ServerRule,
        aggregator: Aggregator,
        lr: float,
        *,
        delta_limit: float = DELTA_LIMIT,
        incremental_limit: float | None = None,
        suspicion: SuspicionScores | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.delta_limit = delta_limit
        self.incremental_limit = (
            aggregator.column_share if incremental_limit is None else incremental_limit
        )
        self.x = x0.clone()
        self.rule = rule
        self.aggregator = aggregator
        self.lr = lr
        self.round = 0
        #: Per-worker suspicion scores, updated as each round closes (server/suspicion.py).
        self.suspicion = (
            suspicion
            if suspicion is not None
            else SuspicionScores(self.num_workers, halflife=0.0, columns=1)
        )
        self.last_aggregate = torch.zeros_like(self.x)
        # The ĝ of the close before last, whose memory an incremental round writes the next ĝ
        # into (`_next_aggregate`); only a tensor the engine made itself, never an aggregator's
        # output, which may be a view of something else (a selected candidate row).
        self._spare: Tensor | None = None
        self._made_last = False
        #: The change of ĝ in the last closed round; None when not recorded (too large, or off).
        self.last_delta: AggregateDelta | None = None
        # Coordinates touched since the last aggregation (off until a round has closed in full).
        self._dirty = _DirtyColumns(self.x.numel(), self.incremental_limit)

    @property
    def device(self) -> torch.device:
        """Where x, the states and the aggregation live (`run.device`); messages arriving on the
        CPU are moved here by the rule that absorbs them."""
        return self.x.device

    @property
    def num_workers(self) -> int:
        return int(self.rule.candidates.shape[0])

    def absorb(self, rows: Tensor, messages: SparseBatch) -> None:
        """Apply one message per listed worker row to the current round's states, exactly once.

        The rule applies them with the round open now (`self.round`), late ones too: the door
        checked each message against that (`ServerRule.late_refusal`, then `admissible`)."""
        if self._dirty.tracking:
            self._dirty.add(self.rule.touched(rows, messages))
        self.rule.absorb(rows, messages, self.round)

    def close_round(self, aggregated: Aggregated | None = None) -> Tensor:
        """Aggregate, step the model, advance the round; returns the aggregate ĝ.
        `aggregated`: this round's aggregation, when it was done elsewhere (`Aggregated`).

        The returned tensor stays ĝ until two more rounds have closed: an incremental round
        reuses the memory of the ĝ before last (`_next_aggregate`), so a caller that keeps ĝ
        longer clones it (the server rules and the coordinator's snapshots do)."""
        columns = self._dirty_columns() if aggregated is None else None
        if columns is not None:
            aggregate, delta = self._aggregate_columns(columns)
        else:
            if aggregated is None:
                aggregate = self.aggregator(self.rule.candidates)
            else:
                aggregate, self.aggregator.last_verdict = aggregated.aggregate, aggregated.verdict
            delta = self._changes(aggregate) if self.delta_limit >= 0 else None
        discount = None if aggregated is None else aggregated.discount
        self.suspicion.observe(
            self.aggregator.last_verdict, self.rule.candidates, self.round, discount
        )
        apply_step(self.x, aggregate, self.lr)
        self.rule.close_round(aggregate, self.round)
        self._spare = self.last_aggregate if self._made_last else None
        self.last_aggregate, self._made_last = aggregate, columns is not None
        self.round += 1
        if delta is not None and delta[0].numel() > self.delta_limit * self.x.numel():
            delta = None
        self.last_delta = (
            None if delta is None else AggregateDelta(self.round, self.x.numel(), *delta, self.lr)
        )
        # Dirty columns are tracked only when they can be used: with incremental aggregation off
        # (a negative limit), or absorbs that bypass `absorb` (a batched simulation writes the
        # states of all its runs at once), every round aggregates in full.
        self._dirty.restart(self.aggregator.coordinatewise and self.incremental_limit >= 0)
        return aggregate

    def _dirty_columns(self) -> Tensor | None:
        """The sorted dirty columns when an incremental aggregation applies, else None."""
        if not self.aggregator.coordinatewise:
            return None
        columns = self._dirty.union()
        return None if columns is None else columns.to(self.x.device)

    def _aggregate_columns(self, columns: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """ĝ with only `columns` recomputed, and (indices, values) where its bits changed."""
        values = self.aggregator.aggregate_columns(self.rule.candidates, columns)
        aggregate = self._next_aggregate()
        if aggregate.device.type == "cpu" and values.dtype == aggregate.dtype:
            bits = _SAME_WIDTH_INT[aggregate.element_size()]  # one compiled pass
            new, old = values.view(bits).numpy(), aggregate.view(bits).numpy()
            indices, changed = rewrite_columns(old, columns.numpy(), new)
            return aggregate, (
                torch.from_numpy(indices),
                torch.from_numpy(changed).view(values.dtype),
            )
        differ = _bits_differ(values, aggregate[columns])
        indices, values = columns[differ], values[differ]
        aggregate[indices] = values
        return aggregate, (indices.to(INDEX_DTYPE), values)

    def _next_aggregate(self) -> Tensor:
        """A copy of the last ĝ, for an incremental round to rewrite: written over the ĝ before
        last where that is still ours to reuse. A fresh tensor of 40 MB (d = 1e7) cost 12 ms,
        most of it the kernel zeroing its pages on first touch; a copy into memory already
        mapped, 3-4 ms."""
        spare, self._spare = self._spare, None
        return self.last_aggregate.clone() if spare is None else spare.copy_(self.last_aggregate)

    def _changes(self, aggregate: Tensor) -> tuple[Tensor, Tensor] | None:
        """(indices, values) where `aggregate`'s bits differ from the last ĝ's, or None when
        more than `delta_limit` · d do (counted before the indices are built)."""
        if aggregate.device.type != "cpu":
            changed = _bits_differ(aggregate, self.last_aggregate)
            if int(changed.sum()) > self.delta_limit * aggregate.numel():
                return None
            indices = changed.nonzero().flatten()
        else:  # one compiled pass, ~4x numpy's mask + flatnonzero + gather here
            bits = _SAME_WIDTH_INT[aggregate.element_size()]
            limit = int(self.delta_limit * aggregate.numel())
            new, old = aggregate.view(bits).numpy(), self.last_aggregate.view(bits).numpy()
            fits, indices, values = changed_entries(new, old, limit)
            if not fits:
                return None
            return torch.from_numpy(indices), torch.from_numpy(values).view(aggregate.dtype)
        return indices.to(INDEX_DTYPE), aggregate[indices]

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self.x.clone(),
            "round": self.round,
            "lr": self.lr,
            "last_aggregate": self.last_aggregate.clone(),
            "rule": self.rule.state_dict(),
            "aggregator": self.aggregator.state_dict(),
            "suspicion": self.suspicion.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints are read onto the CPU (map_location), whatever device wrote them.
        self.x = state["x"].to(self.device, copy=True)
        self.round = int(state["round"])
        self.lr = float(state["lr"])
        self.last_aggregate = state["last_aggregate"].to(self.device, copy=True)
        self._spare, self._made_last = None, False
        self.last_delta = None
        self._dirty.restart(False)  # the next aggregation re-establishes ĝ in full
        self.rule.load_state_dict(state["rule"])
        self.aggregator.load_state_dict(state["aggregator"])
        if "suspicion" in state:  # checkpoints written before the scores existed start them anew
            self.suspicion.load_state_dict(state["suspicion"])


def build_engine(
    config: RunConfig,
    task: Task,
    estimator: Estimator | None = None,
    *,
    sparse_downlink: bool = True,
    shard: ShardRange | None = None,
) -> RoundEngine:
    """The server's round engine at x⁰ on `run.device`: the rule `estimator` needs, the run's
    aggregator and lr. On one shard of a sharded server (`shard`) it holds that shard's
    columns only — of x⁰ and of every state — and aggregates inside a collective
    (byzps.common.aggregators.collective), which the coordinator supplies.

    Shared by the simulator and the gRPC server, so both aggregate and step identically.
    `sparse_downlink=False` records no change of ĝ and aggregates every column every round (the
    dense baseline of the benchmarks; the results are bit-identical either way).
    """
    estimator = estimator if estimator is not None else build_server_estimator(config, task)
    device = resolve_device(config.run.device)
    x0 = task.init_params(config.run.seed)
    if shard is not None:
        x0 = x0[shard.offset : shard.end].clone()
    rule = build_server_rule(
        estimator.server_rule,
        config.cluster.workers,
        int(x0.numel()),
        device=device,
        **estimator.server_rule_params(),
    )
    return RoundEngine(
        x0.to(device),
        rule,
        build_run_aggregator(config, dim=None if shard is not None else task.dim),
        config.algorithm.lr,
        delta_limit=RoundEngine.DELTA_LIMIT if sparse_downlink else -1.0,
        incremental_limit=None if sparse_downlink else -1.0,
        suspicion=SuspicionScores(
            config.cluster.workers,
            config.aggregator.suspicion_halflife,
            config.aggregator.suspicion_columns,
            config.run.seed,
        ),
    )


def build_server_parts(
    config: RunConfig, *, sparse_downlink: bool = True, shard: int | None = None
) -> tuple[Task, RoundEngine, Callable[[int], int]]:
    """What a server needs from its run config: the task, the engine at x⁰ (of shard rank
    `shard` of cluster.shards, when given) and the per-round k_max (the door's bound on a
    message of each round), built exactly as the simulator builds them."""
    task = build_run_task(config)
    estimator = build_server_estimator(config, task)
    span = None if shard is None else ShardLayout(task.dim, config.cluster.shards).shard(shard)
    engine = build_engine(config, task, estimator, sparse_downlink=sparse_downlink, shard=span)
    return task, engine, estimator.max_nnz
