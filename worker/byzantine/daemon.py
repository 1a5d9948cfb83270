"""`byzps attack`: one process holding F Byzantine identities that collude through one cohort.

Why one process: the members collude, so they share one ByzantineCohort (one shadow estimator with
w = F rows on the members' own shards, one mirror of their server-side bases) exactly as in the
simulator. Each member still talks to the server under its own id, token and seq, and the server
cannot tell it from an honest worker except by what it sends.

Per round: GetModel once → cohort.messages for all F → push every member's row under its own id
(concurrently, each retried with its own seq) → cohort.commit(the acknowledged rows). A push the
server refuses (a non-OK status) is logged and skipped — Byzantine messages are often built to be
refused — so the member's seq and mirror stay where they were, and it tries again next round.
Protocol-level attacks (`--protocol`, byzps.worker.byzantine.protocol) run beside this loop in
their own threads and stop with it.

What a real deployment cannot do, and how this daemon handles it:

* It cannot see honest states. The cohort runs with knowledge "cohort" (its own shadows stand in
  for the honest candidates). A config asking for an *omniscient* attack that uses honest
  statistics (alie, ipm, sf, mimic, minmax, alie-opt, ipm-opt) is refused unless `force_cohort`
  is set, because the run would silently differ from the simulated one; attacks that use no
  honest statistics (bf, lf, gauss, na) are unaffected by the knowledge setting and run as
  configured.
* It cannot see the server's aggregator state. alie-opt and ipm-opt search against the cohort's
  own copy of the run's aggregator (built from the run config), which the cohort steps once per
  round on the rows it believes the server sees (its shadows and its targets).
* It does not receive the aggregate ĝ^t, which only the MARINA server rule needs (close_round).
  It derives it from consecutive models, ĝ^t = (x_t − x_{t+1}) / γ — exact up to float32
  rounding. If rounds were skipped (the cohort fell behind), the derived vector is the mean
  aggregate over the skipped rounds and is handed to close_round once for the latest of them:
  an approximation, harmless to the server (it only shapes the attackers' own targets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from torch import Tensor

from byzps.common.attacks import build_attack
from byzps.common.attacks.base import Attack
from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.config import RunConfig
from byzps.common.credentials import ClientCredential, token_of
from byzps.common.estimators.core import BatchedEstimator
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.worker.byzantine.protocol import Priority, ProtocolAttack, campaign_for
from byzps.worker.client import ParameterServerClient, Pushed, ServerError
from byzps.worker.session import (
    AckLedger,
    Run,
    WorkerError,
    build_run,
    commit_applied,
    encode_row,
)
from byzps.worker.shard_client import ShardedClient, connect

log = logging.getLogger(__name__)


def resolve_attack(config: RunConfig, name: str | None, *, force_cohort: bool) -> Attack:
    """The attack to run: the config's, or `name` overriding it (with the config's params only
    when the names agree). Refuses omniscient honest-statistics attacks unless `force_cohort`."""
    if name is None or name == config.attack.name:
        name, params = config.attack.name, dict(config.attack.params)
    else:
        log.warning(
            "running attack %r although the run config names %r (metrics and summary "
            "will carry the config's name)",
            name,
            config.attack.name,
        )
        params = {}
    if name == "na":
        raise WorkerError("the attack is 'na': this run has no Byzantine workers to play")
    attack = build_attack(name, **params)
    if attack.uses_honest and config.attack.knowledge == "omniscient":
        if not force_cohort:
            raise WorkerError(
                f"attack {name!r} is configured omniscient (attack.knowledge = 'omniscient'), "
                "but a deployed cohort cannot see honest workers' states. Set "
                'attack.knowledge = "cohort" in the run config, or pass --force-cohort to run '
                "it on the cohort's own shadow statistics (the run then differs from an "
                "omniscient simulation)."
            )
        log.warning("attack %r: omniscient knowledge forced to 'cohort' (own shadows)", name)
    return attack


class ByzantineDaemon:
    """F member identities, one cohort, one round at a time."""

    def __init__(
        self,
        clients: Sequence[ParameterServerClient | ShardedClient],
        run_info: Run,
        cohort: ByzantineCohort,
        oracle: object,
        *,
        ledger: AckLedger | None = None,
        before_push: Callable[[int, float], None] | None = None,
    ) -> None:
        self.clients = list(clients)
        self.run_info = run_info
        self.cohort = cohort
        self.oracle = oracle
        self.ledger = ledger
        #: Called with (round, monotonic time the round's model arrived) before the members
        #: push: a protocol attack's hold on the pushes (byzps.worker.byzantine.protocol).
        self.before_push = before_push
        self.last_seq = [int(c.registration.last_seq) if c.registration else 0 for c in clients]
        self.next_round = 0
        self._prev: tuple[int, Tensor] | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients))

    @property
    def ids(self) -> list[str]:
        return [c.worker_id for c in self.clients]

    def step(self) -> bool:
        """One round for every member; False once the final model has been published."""
        r, x = self.clients[0].get_model(self.next_round)
        arrived = time.monotonic()
        self._close_previous(r, x)
        if r >= self.run_info.rounds:
            return False
        messages = self.cohort.messages(x, self.oracle, r)  # type: ignore[arg-type]
        compressor = self.cohort.shadow.compressor
        updates = [encode_row(v, self.run_info.config, compressor) for v in messages.rows()]
        seqs = [s + 1 for s in self.last_seq]
        if self.before_push is not None:
            self.before_push(r, arrived)
        outcomes = list(
            self._pool.map(
                lambda i: self._push(i, r, seqs[i], updates[i]), range(len(self.clients))
            )
        )
        commit_applied(
            outcomes, messages, self.cohort.commit, seqs, self.last_seq, self.ids, r, self.ledger
        )
        self.next_round = r + 1
        return True

    def _push(self, i: int, round: int, seq: int, update: bytes) -> Pushed | None:
        """Member i's push, or None when the server refused it.

        A refusal (INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, PERMISSION_DENIED,
        …) is an answer a Byzantine member must expect — its messages are built to be refused
        (an overflowing state, limits probed on purpose) — so it is logged and the member
        carries on: nothing was applied, so its seq is not consumed and its mirror not advanced,
        exactly like a partial acknowledgement. An unreachable server still ends the daemon.
        """
        try:
            return self.clients[i].push(round, seq, update)
        except ServerError as exc:
            log.warning(
                "member %s: round %d seq %d refused (%s: %s); not applied, carrying on",
                self.ids[i], round, seq, exc.code.name, exc.details,
            )  # fmt: skip
            return None

    def _close_previous(self, r: int, x: Tensor) -> None:
        """close_round(ĝ, r−1) from the models of rounds r_prev and r (see the module doc)."""
        if self._prev is not None and r > self._prev[0]:
            prev_round, prev_x = self._prev
            aggregate = (prev_x - x) / (self.run_info.config.algorithm.lr * (r - prev_round))
            self.cohort.close_round(aggregate, r - 1)
        self._prev = (r, x.clone())

    def run(self) -> None:
        try:
            while self.step():
                pass
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def run_attack(
    address: str,
    credential: ClientCredential,
    *,
    count: int,
    first_id: int,
    attack_name: str | None = None,
    force_cohort: bool = False,
    ledger_path: Path | None = None,
    client_options: dict[str, Any] | None = None,
    make_protocols: Callable[[], list[ProtocolAttack]] = list,
) -> None:
    """Register F = `count` identities, ids first_id … first_id + F − 1 (`byzps launch` uses
    h … n − 1), build the cohort from the server's config and attack until the run ends, with
    the protocol attacks `make_protocols` builds (byzps.worker.byzantine.protocol) running
    beside it until then, against the server or each of its shards (one fresh set per server).

    The ids are the caller's to give: this process registers under no other id, not even to read
    the run config (see `_read_config`). `credential`: the members' own tokens (by id; `byzps
    attack --token-dir`), or the master secret (legacy), or None without auth."""
    from byzps.common.components import (
        build_run_aggregator,
        build_run_compressor,
        build_run_estimator,
    )

    if count < 1:
        raise WorkerError(f"--count must be at least 1, got {count}")
    if first_id < 0:
        raise WorkerError(f"--first-id must be at least 0, got {first_id}")
    clients: list[ParameterServerClient | ShardedClient] = []
    ledger = AckLedger(ledger_path)
    try:
        ids = list(range(first_id, first_id + count))
        run_info = build_run(_read_config(address, credential, ids[-1], client_options))
        config = run_info.config
        if ids[-1] >= config.cluster.workers:
            raise WorkerError(
                f"member ids {ids[0]}…{ids[-1]} exceed the run's ids 0…{config.cluster.workers - 1}"
            )
        if first_id < config.honest_workers:
            log.warning(
                "Byzantine ids start at %d, inside the honest range 0…%d",
                first_id,
                config.honest_workers - 1,
            )
        attack = resolve_attack(config, attack_name, force_cohort=force_cohort)
        digest = config.digest()
        priority = Priority()  # a member's client backing off pauses the protocol attacks
        for wid in ids:
            client = connect(
                address,
                str(wid),
                token=token_of(credential, str(wid)),
                config_digest=digest,
                sleep=priority.backoff,
                **(client_options or {}),
            )
            clients.append(client)
            client.register()
        compressor = build_run_compressor(config, run_info.task)
        shadow = build_run_estimator(config, run_info.task, compressor, ids)
        assert isinstance(shadow, BatchedEstimator)
        cohort = ByzantineCohort(
            attack,
            shadow,
            worker_ids=ids,
            num_workers=config.cluster.workers,
            dim=run_info.task.dim,
            seed=config.run.seed,
            knowledge="cohort",
            aggregator=build_run_aggregator(config),  # for the attacks that search against it
        )
        oracle = run_info.task.oracle(ids, config.run.seed, flip_labels=attack.flips_labels)
        daemon = ByzantineDaemon(clients, run_info, cohort, oracle, ledger=ledger)
        if any(daemon.last_seq):
            log.warning(
                "members resume at seqs %s; the cohort's mirrors restart from zero",
                [s + 1 for s in daemon.last_seq],
            )
        log.info("attack %s: members %s registered at %s", attack.name, ids, address)
        campaign = campaign_for(daemon, make_protocols, client_options, priority)
        campaign.start()
        try:
            daemon.run()
        finally:
            campaign.stop()
        log.info("attack %s: done", attack.name)
    finally:
        ledger.close()
        for client in clients:
            client.close()


def _read_config(
    address: str,
    credential: ClientCredential,
    member_id: int,
    client_options: dict[str, Any] | None,
) -> pb.RegisterReply:
    """A registration reply (it carries the run config), read by registering `member_id`, one
    of this process's own ids, before the cohort is built.

    Registering is not free of effects: the server counts a registered id among the workers it
    waits for (to open round 0, and to close a round early once everyone has pushed), so this
    process must never register an id it does not hold, such as an honest worker's. The caller
    passes its last id: when that lies outside the run's [0, n), the server refuses it
    (PERMISSION_DENIED) before anything is registered.
    """
    wid = str(member_id)
    token = token_of(credential, wid)
    with connect(address, wid, token=token, **(client_options or {})) as client:
        try:
            return client.register()
        except ServerError as exc:
            if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                raise
            raise WorkerError(
                f"member id {wid} (--first-id + --count − 1) is not a worker of this run: "
                f"{exc.details}. Byzantine ids are h … n − 1 for the server's config."
            ) from None
