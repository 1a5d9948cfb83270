"""The Byzantine cohort: m colluding Byzantine workers, batched over one member axis.

Why shadows: in a real deployment the cohort cannot see honest workers' states. Each member
therefore runs the honest estimator on its own data shard (labels flipped for label flipping) —
its *shadow* — and the pooled shadow candidates stand in for the honest ones when the attack's
knowledge is "cohort". In simulation the attack may instead be "omniscient" and be handed the true
honest candidates.

When the shadows are skipped: an omniscient attack that uses the true honest candidates and never
reads its members' own (`Attack.uses_shadow`) cannot be affected by them, so the cohort does not run
them (`runs_shadows`); they stay at their initial state, which is what its checkpoint then holds, so
a resumed run still equals an uninterrupted one. In the paper's a9a setting (omniscient ALIE) they
were a fifth of a simulated round.

Why mirrors: the cohort knows every message it sent, so it tracks its members' server-side bases
b_j exactly with a copy of the server rule, and a target t_j becomes the message C(t_j − b_j) —
through the same compressor and k_max as honest messages.

Why an aggregator copy: the attacks that search against the run's aggregator (alie-opt, ipm-opt)
evaluate it many times per round. They get the cohort's own instance, built as the server builds
its own (`build_run_aggregator`), reset before every evaluation to the state it started the
round with, so a stateful rule (cclip's centre, bucketing's call counter) is never advanced by
the search — least of all the server's. Its round-start state is the server's own when the
attack is omniscient and the simulator hands it over (`aggregator_state`); otherwise the cohort
keeps its copy in step by applying it once per round to the rows it believes the server sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators.base import Aggregator
from byzps.common.attacks.base import Attack, RunsView
from byzps.common.compressors import dense_batch
from byzps.common.estimators.base import GradientOracle
from byzps.common.estimators.core import BatchedEstimator
from byzps.common.server_rules import ServerRule, build_server_rule
from byzps.common.sparse import SparseBatch

Knowledge = Literal["omniscient", "cohort"]


class ByzantineCohort:
    """Produces the Byzantine members' messages round by round.

    Per round t: `messages(x, oracle, t, honest)` → SparseBatch (m rows), then `commit(messages)`
    once the server acknowledged them, then `close_round(aggregate, t)` like every worker.
    """

    def __init__(
        self,
        attack: Attack,
        shadow: BatchedEstimator,
        *,
        worker_ids: Sequence[int],
        num_workers: int,
        dim: int,
        seed: int,
        knowledge: Knowledge = "omniscient",
        aggregator: Aggregator | None = None,
        run_seeds: Sequence[int] | None = None,
    ) -> None:
        """`run_seeds`: for a batched simulation, the seeds of the R runs whose cohorts this one
        stacks — `worker_ids` and the shadow's rows then hold R groups of members, one per run,
        each attacking its own run's honest rows with its own run's random source."""
        if knowledge not in ("omniscient", "cohort"):
            raise ValueError(f"knowledge must be 'omniscient' or 'cohort', got {knowledge!r}")
        if attack.uses_aggregator and aggregator is None:
            raise ValueError(
                f"attack {attack.name!r} searches against the run's aggregator: pass aggregator="
            )
        self.run_seeds = [int(seed)] if run_seeds is None else [int(s) for s in run_seeds]
        if len(worker_ids) % len(self.run_seeds):
            runs = len(self.run_seeds)
            raise ValueError(f"{len(worker_ids)} members do not split over {runs} runs")
        if len(self.run_seeds) > 1 and attack.uses_aggregator:
            raise ValueError(f"attack {attack.name!r} searches one run's aggregator: not batched")
        #: The cohort's own copy of the run's aggregator (never the server's instance).
        self.aggregator = aggregator
        self.attack = attack
        self.shadow = shadow
        self.worker_ids = tuple(worker_ids)
        self.num_workers = num_workers
        self.dim = dim
        self.seed = seed
        self.knowledge = knowledge
        m = len(self.worker_ids)
        rule_params = shadow.server_rule_params()
        device = shadow.device
        self._sent: ServerRule = build_server_rule(
            shadow.server_rule, m, dim, device=device, **rule_params
        )
        self._shadow_rule: ServerRule = build_server_rule(
            shadow.server_rule, m, dim, device=device, **rule_params
        )
        self._rows = torch.arange(m, device=device)
        self._round: int | None = None

    @property
    def size(self) -> int:
        """f: the members of one run."""
        return len(self.worker_ids) // len(self.run_seeds)

    @property
    def runs_shadows(self) -> bool:
        """False when no message can depend on the shadows: the attack is omniscient, is handed
        the true honest candidates (`uses_honest`) and never reads its own (`uses_shadow`)."""
        attack = self.attack
        return self.knowledge != "omniscient" or not attack.uses_honest or attack.uses_shadow

    def _advance_shadows(self, x: Tensor, oracle: GradientOracle, round: int) -> None:
        """Run the honest shadows one round; their messages never leave the cohort."""
        message = self.shadow.message(x, oracle, round)
        self.shadow.commit(message)
        self._shadow_rule.absorb(self._rows, message, round)

    def messages(
        self,
        x: Tensor,
        oracle: GradientOracle,
        round: int,
        honest: Tensor | None = None,
        aggregator_state: dict[str, Any] | None = None,
    ) -> SparseBatch:
        """The members' messages for round `round`.

        `honest` (h, d) are the true honest candidates; required when knowledge is "omniscient"
        and the attack uses honest statistics, ignored otherwise. `aggregator_state` is the
        server aggregator's `state_dict()` at this round (simulator only), used by attacks that
        search against the aggregator when knowledge is "omniscient", ignored otherwise.
        """
        if self.runs_shadows:
            self._advance_shadows(x, oracle, round)
            shadow = self._shadow_rule.candidates
        else:  # nothing reads them (`runs_shadows`): an empty (0, d) stand-in
            shadow = self._shadow_rule.candidates[:0]
        if self.knowledge == "omniscient" and self.attack.uses_honest:
            if honest is None:
                raise ValueError(f"omniscient attack {self.attack.name!r} needs honest candidates")
        else:
            honest = shadow
        bases = self._sent.bases(self._rows)
        start = self._aggregator_start(aggregator_state)
        runs = RunsView(
            honest=honest,
            shadow=shadow,
            bases=bases,
            seeds=self.run_seeds,
            round=round,
            n=self.num_workers,
            f=self.size,
            gain=self._gain(round),
            aggregate=None if start is None else self._evaluator(start),
        )
        targets = self.attack.targets_runs(runs)
        if start is not None and (self.knowledge != "omniscient" or aggregator_state is None):
            # the copy steps once, as the server's aggregator does
            self._evaluator(start)(runs.view(0).rows(targets))
        delta = _deviation(targets, bases)
        self._round = round
        message = self._compress(delta, round)
        if message.values.dtype != bases.dtype:  # float64 targets (overflow): state dtype
            message = SparseBatch(
                message.indices, message.values.to(bases.dtype), message.dim, message.seeds
            )
        return message

    def _aggregator_start(self, server_state: dict[str, Any] | None) -> dict[str, Any] | None:
        """The aggregator state this round's evaluations start from (None: the attack does not
        evaluate the aggregator): the server's when omniscient and given, else the copy's own."""
        if self.aggregator is None or not self.attack.uses_aggregator:
            return None
        if self.knowledge == "omniscient" and server_state is not None:
            return copy.deepcopy(server_state)
        return copy.deepcopy(self.aggregator.state_dict())

    def _evaluator(self, start: dict[str, Any]) -> Callable[[Tensor], Tensor]:
        """The copy's aggregate of some rows, reset to `start` first (see the module doc)."""
        aggregator = self.aggregator
        assert aggregator is not None

        def aggregate(rows: Tensor) -> Tensor:
            aggregator.load_state_dict(start)
            return aggregator(rows)

        return aggregate

    def _gain(self, round: int) -> float:
        """The factor `_compress` applies to a kept coordinate of t − b (see AttackView.gain)."""
        compressor = self.shadow.compressor
        if self.shadow.max_nnz(round) == self.dim or not compressor.unbiased:
            return 1.0
        if self.shadow.server_rule == "state":
            return 1.0  # Rand-k's d/k, undone by the 1/(ω + 1) of `_compress`
        return compressor.omega + 1.0

    def _compress(self, delta: Tensor, round: int) -> SparseBatch:
        """Byzantine messages obey the round's honest limit: dense only when honest ones are
        (MARINA's full rounds), otherwise the honest compressor with the members' own seeds.

        Under the accumulating "state" rule (b ← b + c) with an unbiased compressor Q, tracking a
        target with c = Q(t − b) is unstable: e ← e − Q(e) has E‖e′‖² = ω‖e‖², which grows for
        ω > 1 (ω = 122 for Rand-1 on a9a). The cohort then sends Q(t − b)/(ω + 1), the
        contractive scaled Rand-k, so its members' states converge to their targets instead.
        """
        if self.shadow.max_nnz(round) == self.dim:
            return dense_batch(delta)
        message = self.shadow.compress(delta, round)
        compressor = self.shadow.compressor
        if self.shadow.server_rule == "state" and compressor.unbiased:
            scaled = message.values / (compressor.omega + 1.0)
            message = SparseBatch(message.indices, scaled, message.dim, message.seeds)
        return message

    def commit(self, messages: SparseBatch, rows: Sequence[int] | None = None) -> None:
        """Mirror the server: the acknowledged messages move the members' bases.

        `rows` lists the member rows (0 … m−1) that `messages` holds, in order, when only some
        members were acknowledged (a worker daemon whose push was refused); default: all.
        """
        if self._round is None:
            raise RuntimeError("commit() before messages()")
        members = self._rows if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        if messages.num_rows != members.numel():
            raise ValueError(f"{messages.num_rows} messages for {members.numel()} rows")
        if members.numel():
            self._sent.absorb(members, messages, self._round)

    def close_round(self, aggregate: Tensor, round: int) -> None:
        self._sent.close_round(aggregate, round)
        self._shadow_rule.close_round(aggregate, round)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": self.shadow.state_dict(),
            "sent": self._sent.state_dict(),
            "shadow_rule": self._shadow_rule.state_dict(),
            "round": self._round,
            "aggregator": None if self.aggregator is None else self.aggregator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self._sent.load_state_dict(state["sent"])
        self._shadow_rule.load_state_dict(state["shadow_rule"])
        self._round = state["round"]
        if self.aggregator is not None and state.get("aggregator") is not None:
            self.aggregator.load_state_dict(state["aggregator"])


def _deviation(targets: Tensor, bases: Tensor) -> Tensor:
    """t − b, computed in the wider of the two dtypes, and 0 where a base is not finite.

    Why the zeros: a server that accepted an overflowing message (one that predates the door's
    finiteness check of the state) holds ±inf for that member, and no finite message can move
    an infinite entry; t − b would be NaN there and poison the whole row at the wire's finite
    check. Targets that are themselves non-finite still give non-finite messages (the door
    refuses those, as it must).
    """
    delta = targets - bases
    if bases.device.type == "cpu" and bases.dtype in (torch.float32, torch.float64):
        finite = bool(np.isfinite(bases.numpy()).all())  # numpy: a fraction of torch's call cost
    else:
        finite = bool(torch.isfinite(bases).all())
    if not finite:
        delta = delta.masked_fill(~torch.isfinite(bases), 0.0)
    return delta
