"""R simulated runs advanced as one: the runs of a sweep that differ only in seed and γ.

Why: on the paper's a9a task a round is a few hundred small tensor operations on 20 × 123 floats,
so a run's time is almost all per-operation overhead. Runs that share a task and its shapes can
share those operations: every per-worker (row-wise) part of a round — gradients, estimators,
compression, the server's per-worker states, the door's checks, the cohort's shadows and
messages — runs once over the R·n rows of all runs, stacked run after run. Only what mixes rows
runs per run: the attack's choice of targets (from its own run's honest rows) and the server's
aggregation, suspicion scores and step (one `RoundEngine` per run, whose rule is a view of that
run's rows of the stacked states).

Bit for bit: each run of a batch computes exactly what it computes alone (`tests/test_batched.py`
checks every record and the final model). Row-wise operations give the same bits whatever the
number of rows; the oracles evaluate a shared model through the same batched products as a
model per row; and each run's draws are keyed by its own (seed, worker, round).

What a batch may hold (`batch_key`): configs equal but for `run.seed` and `algorithm.lr`, on a
task whose oracles stack (a9a, quadratic), an estimator whose server rule is row-wise ("state",
"message"; MARINA's and DIANA's rules use the run's aggregate), runs of one seed when the
estimator draws a run-wide coin (DASHA-PAGE), and an attack that does not
search the run's aggregator. Anything else runs alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from byzps.common.aggregators.ops import threads_for
from byzps.common.aggregators.runs import NotBatched
from byzps.common.aggregators.verdict import band_discounts
from byzps.common.attacks import build_attack
from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.components import (
    build_run_aggregator,
    build_run_compressor,
    build_run_estimator,
)
from byzps.common.config import ConfigError, RunConfig
from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.common.server_rules import ServerRule, build_server_rule
from byzps.common.sparse import SparseBatch
from byzps.common.tasks.base import Task
from byzps.server.engine import Aggregated, RoundEngine, build_engine
from byzps.server.results import uplink_per_worker
from byzps.server.validation import Door
from byzps.sim.simulation import NonFiniteMessage, check_finite

#: Server rules whose absorb and close read only a worker's own row.
ROW_WISE_RULES = frozenset({"state", "message"})
#: Keys a batch's runs may differ in.
PER_RUN_KEYS = (("run", "seed"), ("algorithm", "lr"))


def batch_key(config: RunConfig) -> str:
    """The config without its per-run keys: runs with equal keys may share a batch."""
    data = config.to_dict()
    for section, key in PER_RUN_KEYS:
        data[section].pop(key)
    return json.dumps(data, sort_keys=True)


def batchable(config: RunConfig) -> bool:
    """Whether `config`'s run can share a batch at all (module doc): a task whose oracles stack,
    a row-wise server rule, an attack that does not search the run's aggregator, on the CPU (a
    GPU run is simulated alone: the batch's stacked oracles and rows are built on the CPU)."""
    from byzps.common.attacks import ATTACKS
    from byzps.common.estimators import ESTIMATORS
    from byzps.common.tasks import TASKS

    return (
        config.run.device == "cpu"
        and config.cluster.shards == 1  # a sharded run aggregates through ColumnSharded alone
        and TASKS.get(config.task.name).stacks_oracles
        and ESTIMATORS.get(config.algorithm.name).server_rule in ROW_WISE_RULES
        and not ATTACKS.get(config.attack.name).uses_aggregator
    )


def seeds_may_differ(config: RunConfig) -> bool:
    """False when the run's estimator draws one coin per round for the whole run (DASHA-PAGE,
    MARINA): its batches then hold one seed, several γ. (Seeded compressors are keyed per run
    already: each run's rows get their own run seed's streams, Perm-K's shared one included.)"""
    from byzps.common.estimators import ESTIMATORS

    return not ESTIMATORS.get(config.algorithm.name)._shared_coin


def _stacked(oracles: Sequence[GradientOracle]) -> GradientOracle:
    """One oracle over the rows of `oracles` (the task's oracle class must define `stack`)."""
    kind = type(oracles[0])
    if not hasattr(kind, "stack"):
        raise ConfigError(f"task: its oracle ({kind.__name__}) cannot be batched")
    return kind.stack(oracles)


def _rule_views(rule: ServerRule, runs: int) -> list[ServerRule]:
    """R rules over n rows each whose state tensors are views of `rule`'s R·n rows: an engine
    aggregates its run's view while the batch writes all runs' rows at once."""
    n = rule.num_workers // runs
    views = []
    for r in range(runs):
        view = copy.copy(rule)
        view.num_workers = n
        for name in rule._tensors:
            setattr(view, name, getattr(rule, name)[r * n : (r + 1) * n])
        views.append(view)
    return views


@dataclass
class RunState:
    """What a batch keeps per run besides its engine."""

    #: Payload bytes of every message the server absorbed.
    bytes_total: int = 0
    #: Byzantine messages the door refused.
    refused: int = 0
    #: Why the run stopped (an honest message refused at the door), or None while it runs.
    stopped: NonFiniteMessage | None = None


@dataclass
class BatchedSimulation:
    """R runs of one shape, stepped together (module doc). Rows of the stacked states are run
    after run: run r's worker i is row r·n + i; honest ids first in each run, as alone."""

    engines: list[RoundEngine]
    rule: ServerRule
    door: Door
    honest: Estimator
    honest_oracle: GradientOracle
    honest_rows: Tensor
    cohort: ByzantineCohort | None = None
    cohort_oracle: GradientOracle | None = None
    byzantine_rows: Tensor | None = None
    runs: list[RunState] = field(default_factory=list)
    #: The round the batch is in (a stopped run's engine stays at the round it stopped in).
    round: int = 0
    #: Rounds run under `torch.inference_mode` (`Task.analytic_gradients`).
    inference: bool = False

    def __post_init__(self) -> None:
        self.runs = [RunState() for _ in self.engines]
        #: Whether every run's suspicion scores read every column of a band's discount, so the
        #: batch computes the discounts at once (`_aggregate_runs`). Fixed by the runs' shared
        #: config and d, so decided once here, not per run each round.
        self.scores_every_column = all(
            e.suspicion.enabled and e.suspicion.scores_every_column(e.x.numel())
            for e in self.engines
        )

    @property
    def size(self) -> int:
        return len(self.engines)

    def state_dict(self) -> dict[str, Any]:
        """Every piece of state a round of the batch reads (sim/checkpoint.py): the stacked
        rule, each engine (its rule a view of the stacked one, so loading writes through it),
        the stacked estimators and cohort, and each run's counters and stop."""
        return {
            "rule": self.rule.state_dict(),
            "engines": [engine.state_dict() for engine in self.engines],
            "honest": self.honest.state_dict(),
            "cohort": None if self.cohort is None else self.cohort.state_dict(),
            "runs": [
                {
                    "bytes_total": run.bytes_total,
                    "refused": run.refused,
                    "stopped": None if run.stopped is None else run.stopped.saved(),
                }
                for run in self.runs
            ],
            "round": self.round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        for engine, saved in zip(self.engines, state["engines"], strict=True):
            engine.load_state_dict(saved)
        self.honest.load_state_dict(state["honest"])
        if self.cohort is not None:
            self.cohort.load_state_dict(state["cohort"])
        for run, saved in zip(self.runs, state["runs"], strict=True):
            run.bytes_total = int(saved["bytes_total"])
            run.refused = int(saved["refused"])
            stopped = saved["stopped"]
            run.stopped = None if stopped is None else NonFiniteMessage.restored(*stopped)
        self.round = int(state["round"])

    def x(self, run: int) -> Tensor:
        return self.engines[run].x

    def bytes_uplink(self, run: int) -> float:
        return uplink_per_worker(self.runs[run].bytes_total, self.engines[run].num_workers)

    def _models(self) -> Tensor:
        """(R, d): each run's model, stacked once a round for the rows that read it."""
        return torch.stack([e.x for e in self.engines])

    def _run_of(self, rows: Tensor, per_run: int) -> Tensor:
        return torch.div(rows, per_run, rounding_mode="floor")

    def step(self) -> None:
        """One round of every run still running."""
        with threads_for(self.x(0).numel()), torch.inference_mode(self.inference):
            self._step()

    def _step(self) -> None:
        t = self.round
        h = self.honest_rows.numel() // self.size
        models = self._models()
        messages = self.honest.message(models.repeat_interleave(h, dim=0), self.honest_oracle, t)
        refused = self.door.refused_rows(self.rule, self.honest_rows, messages, t)
        self._stop_refused(messages, refused, h, t)
        keep = self._live_rows(messages.num_rows, h)
        self._absorb(self.honest_rows, messages, keep, self.honest, h, t)
        if self.cohort is not None:
            self._byzantine_round(models, t)
        live = [r for r, run in enumerate(self.runs) if run.stopped is None]
        aggregated = self._aggregate_runs(live)
        aggregates = [self.engines[r].close_round(aggregated.get(r)) for r in live]
        if self.cohort is not None and aggregates:
            # Row-wise rules (ROW_WISE_RULES) close without reading the aggregate.
            self.cohort.close_round(torch.stack(aggregates), t)
        self.round += 1

    def _live_rows(self, count: int, per_run: int) -> Tensor | None:
        """Of `count` rows, per_run per run, those of the runs still running; None while every
        run is (the common case, which then takes no index tensors at all)."""
        live = [run.stopped is None for run in self.runs]
        if all(live):
            return None
        rows = torch.arange(count)
        return rows[torch.tensor(live)[self._run_of(rows, per_run)]]

    def _aggregate_runs(self, live: list[int]) -> dict[int, Aggregated]:
        """The live runs' aggregations in one call where the rule batches runs
        (`RowsAggregator.aggregate_runs`, bitwise each engine's own), with their suspicion
        discounts where those read every column (`verdict.band_discounts`); empty where the
        rule does not batch, or where some run needs the one-run path this round: each engine
        then aggregates its own."""
        engines = [self.engines[r] for r in live]
        if not engines or not getattr(engines[0].aggregator, "batches_runs", False):
            return {}
        stacked = self.rule.candidates.view(self.size, engines[0].num_workers, -1)
        if len(live) < self.size:
            stacked = stacked.index_select(0, torch.tensor(live))
        try:
            aggregates, verdicts = engines[0].aggregator.aggregate_runs(stacked)
        except NotBatched:
            return {}
        discounts = band_discounts(verdicts, stacked) if self.scores_every_column else None
        return {
            r: Aggregated(aggregate, verdicts[i], None if discounts is None else discounts[i])
            for i, (r, aggregate) in enumerate(zip(live, aggregates.unbind(0), strict=True))
        }

    @property
    def running(self) -> bool:
        return any(run.stopped is None for run in self.runs)

    def _stop_refused(self, messages: SparseBatch, refused: Tensor, h: int, t: int) -> None:
        """A run whose honest message the door refused stops there, with the error it raises
        alone (`check_finite` on its own rows)."""
        if not refused.numel():
            return
        for run in self._run_of(refused, h).unique().tolist():
            if self.runs[run].stopped is not None:
                continue
            own = torch.arange(run * h, (run + 1) * h)
            mine = refused[(refused >= run * h) & (refused < (run + 1) * h)] - run * h
            try:
                check_finite(
                    messages.take(own),
                    self.honest_rows[own] - run * self.engines[run].num_workers,
                    t,
                    mine,
                )
            except NonFiniteMessage as exc:
                self.runs[run].stopped = exc

    def _count_bytes(self, messages: SparseBatch, keep: Tensor | None, per_run: int) -> None:
        """Add the payload of the kept rows (`keep` None: all) to their runs' totals."""
        if not messages.num_rows:
            return
        per_row = self.honest.compressor.payload_bytes(messages) // messages.num_rows
        if keep is None:
            counts = [per_run] * self.size
        else:
            counts = torch.bincount(self._run_of(keep, per_run), minlength=self.size).tolist()
        for run, count in zip(self.runs, counts, strict=True):
            run.bytes_total += per_row * count

    def _byzantine_round(self, models: Tensor, t: int) -> None:
        """The cohort's round; `models` (R, d) are the runs' models, which only its members'
        honest shadows read (`runs_shadows`): ALIE on the true honest rows reads none."""
        assert self.cohort is not None and self.byzantine_rows is not None
        f = self.byzantine_rows.numel() // self.size
        honest_now = self.rule.candidates.index_select(0, self.honest_rows)
        shadows = self.cohort.runs_shadows
        member_x = models.repeat_interleave(f, dim=0) if shadows else models[:0]
        messages = self.cohort.messages(member_x, self.cohort_oracle, t, honest=honest_now)
        bad = self.door.refused_rows(self.rule, self.byzantine_rows, messages, t)
        keep = self._live_rows(messages.num_rows, f)
        if bad.numel():
            for run, count in zip(
                self.runs,
                torch.bincount(self._run_of(bad, f), minlength=self.size).tolist(),
                strict=True,
            ):
                run.refused += count
            members = torch.arange(messages.num_rows) if keep is None else keep
            keep = members[~torch.isin(members, bad)]
            if not keep.numel():
                return
        self._absorb(self.byzantine_rows, messages, keep, self.cohort, f, t)

    def _absorb(
        self,
        rows: Tensor,
        messages: SparseBatch,
        keep: Tensor | None,
        sender: Estimator | ByzantineCohort,
        per_run: int,
        t: int,
    ) -> None:
        """The server absorbs the kept messages (`keep`: their indices; None: all) into their
        `rows`, the `sender` commits them, and their runs count their bytes."""
        accepted = messages if keep is None else messages.take(keep)
        self.rule.absorb(rows if keep is None else rows[keep], accepted, t)
        sender.commit(accepted, rows=None if keep is None else keep.tolist())
        self._count_bytes(messages, keep, per_run)


def check_batchable(configs: Sequence[RunConfig]) -> None:
    """ConfigError naming what keeps `configs` from sharing a batch (module doc)."""
    keys = {batch_key(c) for c in configs}
    if len(keys) != 1:
        raise ConfigError("a batch's runs may differ only in run.seed and algorithm.lr")
    if not seeds_may_differ(configs[0]) and len({c.run.seed for c in configs}) > 1:
        raise ConfigError(
            f"algorithm: {configs[0].algorithm.name} draws run-wide coins: one seed per batch"
        )


def build_batched_simulation(
    configs: Sequence[RunConfig], tasks: Sequence[Task]
) -> BatchedSimulation:
    """The batch of `configs` (one task each, built from its config), wired as `build_simulation`
    wires one run, with the row-wise parts stacked."""
    check_batchable(configs)
    config, task = configs[0], tasks[0]
    n, h = config.cluster.workers, config.honest_workers
    runs = len(configs)
    seeds = [c.run.seed for c in configs]
    compressor = build_run_compressor(config, task)
    honest_ids = list(range(h))
    honest = build_run_estimator(
        config, task, compressor, honest_ids * runs, [s for s in seeds for _ in honest_ids]
    )
    if honest.server_rule not in ROW_WISE_RULES:
        raise ConfigError(f"algorithm: {config.algorithm.name}'s server rule reads the aggregate")
    engines = [
        build_engine(c, t, honest, sparse_downlink=False)
        for c, t in zip(configs, tasks, strict=True)
    ]
    rule = build_server_rule(honest.server_rule, runs * n, task.dim, **honest.server_rule_params())
    for engine, view in zip(engines, _rule_views(rule, runs), strict=True):
        engine.rule = view
    offsets = torch.arange(runs).repeat_interleave(h) * n
    parts: dict[str, object] = {
        "engines": engines,
        "rule": rule,
        "door": Door(
            task.dim, config.compressor.name, honest.max_nnz, config.run.rounds, compressor
        ),
        "honest": honest,
        "honest_oracle": _stacked(
            [t.oracle(honest_ids, s) for t, s in zip(tasks, seeds, strict=True)]
        ),
        "honest_rows": torch.tensor(honest_ids * runs) + offsets,
        "inference": task.analytic_gradients,
    }
    if h == n:
        return BatchedSimulation(**parts)
    byz_ids = list(range(h, n))
    try:
        attack = build_attack(config.attack.name, **config.attack.params)
    except ValueError as exc:
        raise ConfigError(f"attack: {exc}") from None
    try:
        cohort = ByzantineCohort(
            attack,
            build_run_estimator(
                config, task, compressor, byz_ids * runs, [s for s in seeds for _ in byz_ids]
            ),
            worker_ids=byz_ids * runs,
            num_workers=n,
            dim=task.dim,
            seed=seeds[0],
            knowledge=config.attack.knowledge,  # type: ignore[arg-type]
            aggregator=build_run_aggregator(config),
            run_seeds=seeds,
        )
    except ValueError as exc:
        raise ConfigError(f"attack: {exc}") from None
    flip = attack.flips_labels
    return BatchedSimulation(
        cohort=cohort,
        cohort_oracle=_stacked(
            [t.oracle(byz_ids, s, flip_labels=flip) for t, s in zip(tasks, seeds, strict=True)]
        ),
        byzantine_rows=torch.tensor(byz_ids * runs)
        + torch.arange(runs).repeat_interleave(n - h) * n,
        **parts,
    )
