"""Many honest worker identities in one process: a load generator and a dense deployment's client.

Why: a worker process imports torch (~250 MB), so a thousand `byzps worker` processes do not fit
on one machine, and a thousand threads each running `HonestWorker` spend more time switching
than computing. A fleet holds w identities the way the Byzantine cohort
(byzps.worker.byzantine.daemon) holds its members, but runs them honestly:

* each identity keeps its own credential (its token: the server authenticates every call as
  that id and counts it against that id's share, byzps.server.limits), its own seq and its own
  estimator state — row i of one BatchedEstimator with worker_ids = the fleet's ids, the very
  object the simulator runs with h rows (per-worker keyed randomness: a row computes what a
  one-row estimator of that id computes);
* per round: the model is fetched once (by the first identity; the others would get the same
  bytes) — or, with `fetch_each`, by every identity through its own long-poll and mirror, as w
  separate workers would load the server, and then every copy must be the same round and the
  same bits — the estimator computes all w messages, and every identity pushes its own row under
  its own id, token and seq (same-seq retries: exactly once), from a bounded pool of `pushers`
  threads over a few gRPC connections (the server bounds the streams of one connection);
* a row is committed (g_i ← g_i + c_i) only once its own push was acknowledged.

An honest identity never expects a refusal: any one ends the fleet (ServerError), as it ends a
`byzps worker`. `push_seconds`, when a list is given, receives each push's latency from call to
Ack, retries included (what benchmarks/bench_many_workers.py reports).

Run one with `python -m byzps.worker.fleet --server ADDR --ids 0-199 --token-dir DIR`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import Tensor

from byzps.common.credentials import ClientCredential, token_of
from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.worker.client import ParameterServerClient, Pushed, open_channel
from byzps.worker.session import (
    AckLedger,
    Run,
    WorkerError,
    build_run,
    check_finite_message,
    commit_applied,
    encode_row,
)
from byzps.worker.shard_client import ShardedClient, connect, split_addresses

log = logging.getLogger(__name__)

#: Pushes in flight at once per fleet: enough to keep the server busy, no more — the server
#: serves pushes one core's worth at a time, so more in flight only queue there. Measured at
#: n = 1,000 with two fleets: 8 each gave the same rounds/s as 32 (0.35 against 0.36) with a
#: p50 push latency of 32 ms instead of 145 ms. Each of a fleet's connections then carries at
#: most a few streams, far below the server's bound
#: (byzps.server.daemon.MAX_STREAMS_PER_CONNECTION = 32).
DEFAULT_PUSHERS = 8
#: Identities that share one connection: a few connections per fleet (8 for 1,000 ids), not
#: one per identity, which would cost the server a descriptor and the fleet a channel each for
#: nothing (the token, not the connection, says who calls). Identity i uses connection
#: i mod count, and the pushes in flight go in id order, so they spread over the connections:
#: each carries about ⌈pushers / connections⌉ streams (plus the fetch on the first).
IDENTITIES_PER_CONNECTION = 128


class HonestFleet:
    """w honest identities driven round by round (see the module doc)."""

    def __init__(
        self,
        clients: Sequence[ParameterServerClient | ShardedClient],
        run_info: Run,
        estimator: Estimator,
        oracle: GradientOracle,
        *,
        ledger: AckLedger | None = None,
        pushers: int = DEFAULT_PUSHERS,
        push_seconds: list[float] | None = None,
        fetch_each: bool = False,
    ) -> None:
        if not clients:
            raise ValueError("a fleet needs at least one identity")
        self.clients = list(clients)
        self.run_info = run_info
        self.estimator = estimator
        self.oracle = oracle
        self.ledger = ledger
        self.push_seconds = push_seconds
        self.fetch_each = fetch_each
        self.last_seq = [int(c.registration.last_seq) if c.registration else 0 for c in clients]
        if any(self.last_seq):
            # No per-identity checkpoint here: a row whose g the server moved cannot be rebuilt.
            resumed = [c.worker_id for c, s in zip(clients, self.last_seq, strict=True) if s]
            raise WorkerError(
                f"identities {resumed[:5]} "
                "already have acknowledged updates on this server; a fleet keeps no checkpoint "
                "to resume them from"
            )
        self.next_round = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, pushers), thread_name_prefix="push")

    @property
    def ids(self) -> list[str]:
        return [c.worker_id for c in self.clients]

    def step(self) -> bool:
        """One round for every identity; False once the final model has been published."""
        r, x = self._fetch()
        if r >= self.run_info.rounds:
            return False
        message = self.estimator.message(x, self.oracle, r)
        check_finite_message(message, r)
        config, compressor = self.run_info.config, self.estimator.compressor
        seqs = [s + 1 for s in self.last_seq]

        def push(i: int) -> Pushed:
            update = encode_row(message.row(i), config, compressor)
            began = time.perf_counter()
            outcome = self.clients[i].push(r, seqs[i], update)
            if self.push_seconds is not None:
                self.push_seconds.append(time.perf_counter() - began)  # list.append: atomic
            return outcome

        outcomes = list(self._pool.map(push, range(len(self.clients))))
        commit_applied(
            outcomes, message, self.estimator.commit, seqs, self.last_seq, self.ids, r, self.ledger
        )
        self.next_round = r + 1
        return True

    def _fetch(self) -> tuple[int, Tensor]:
        """(r, x_r): from the first identity, or from every one (`fetch_each`), which must agree."""
        if not self.fetch_each:
            return self.clients[0].get_model(self.next_round)
        models = list(self._pool.map(lambda c: c.get_model(self.next_round), self.clients))
        r, x = models[0]
        for client, (other, y) in zip(self.clients, models, strict=True):
            if other != r or not torch.equal(y, x):
                raise WorkerError(
                    f"identity {client.worker_id} got round {other}, identity "
                    f"{self.clients[0].worker_id} round {r}"
                    + ("" if other != r else " with other parameters")
                    + ": the server answered one round differently"
                )
        return r, x

    def run(self) -> None:
        try:
            while self.step():
                pass
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def run_fleet(
    address: str,
    worker_ids: Sequence[int],
    credential: ClientCredential,
    *,
    ledger_path: Path | None = None,
    client_options: dict[str, Any] | None = None,
    pushers: int = DEFAULT_PUSHERS,
    push_seconds: list[float] | None = None,
    per_connection: int = IDENTITIES_PER_CONNECTION,
    fetch_each: bool = False,
) -> HonestFleet:
    """Register every id of `worker_ids` under its own token, build one estimator row per id from
    the server's config, and train until the server publishes the final model; returns the
    finished fleet (its `last_seq` per identity). `per_connection`: identities that share one
    connection (1: a connection each, as separate worker processes would hold)."""
    from byzps.common.components import build_run_compressor, build_run_estimator

    ids = [int(i) for i in worker_ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise WorkerError(f"a fleet needs distinct non-negative ids, got {ids[:5]}…")
    options = dict(client_options or {})
    security = {k: options.pop(k) for k in ("credentials", "tls_server_name") if k in options}
    count = math.ceil(len(ids) / max(1, per_connection))
    clients: list[ParameterServerClient | ShardedClient]
    if len(split_addresses(address)) > 1:  # shards: each identity holds a channel per shard
        channels: list[grpc.Channel] = []
        clients = [
            connect(address, str(wid), token=token_of(credential, str(wid)), **security, **options)
            for wid in ids
        ]
    else:
        channels = [open_channel(address, **security, own_connection=True) for _ in range(count)]
        clients = [
            ParameterServerClient(
                address,
                str(wid),
                token=token_of(credential, str(wid)),
                channel=channels[k % count],
                **options,
            )
            for k, wid in enumerate(ids)
        ]
    ledger = AckLedger(ledger_path)
    pool = ThreadPoolExecutor(max_workers=max(1, pushers), thread_name_prefix="register")
    try:
        run_info = build_run(clients[0].register())
        config = run_info.config
        if max(ids) >= config.cluster.workers:
            last = config.cluster.workers - 1
            raise WorkerError(f"ids up to {max(ids)} exceed the run's ids 0…{last}")
        digest = config.digest()
        for client in clients:
            client.config_digest = digest  # every (re-)registration asserts the same run
        list(pool.map(lambda c: c.register(), clients[1:]))
        compressor = build_run_compressor(config, run_info.task)
        estimator = build_run_estimator(config, run_info.task, compressor, ids)
        fleet = HonestFleet(
            clients,
            run_info,
            estimator,
            run_info.task.oracle(ids, config.run.seed),
            ledger=ledger,
            pushers=pushers,
            push_seconds=push_seconds,
            fetch_each=fetch_each,
        )
        log.info("fleet of %d identities registered at %s", len(ids), address)
        fleet.run()
        log.info("fleet: done, round %d", fleet.next_round)
        return fleet
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        ledger.close()
        for channel in channels:
            channel.close()


def parse_ids(text: str) -> list[int]:
    """ "0-199" or "0-9,20,30-39" → the ids, in order."""
    ids: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def main(argv: list[str] | None = None) -> int:
    """`python -m byzps.worker.fleet`: one fleet process until the run ends (exit 0), or 1."""
    from byzps.common.credentials import read_secret, read_tokens

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--ids", required=True, type=parse_ids, help='e.g. "0-199"')
    parser.add_argument("--token-dir", type=Path, help="DIR/worker-ID.token for every id")
    parser.add_argument("--secret-file", type=Path, help="legacy: the master secret")
    parser.add_argument("--pushers", type=int, default=DEFAULT_PUSHERS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--per-connection", type=int, default=IDENTITIES_PER_CONNECTION)
    parser.add_argument("--fetch-each", action="store_true", help="every identity fetches")
    parser.add_argument("--ledger", type=Path, help="acknowledged seqs as JSON lines")
    parser.add_argument("--latencies", type=Path, help="write push latencies (s) as JSON")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s fleet %(levelname)s %(name)s: %(message)s"
    )
    import json

    torch.set_num_threads(args.threads)
    if args.token_dir is not None:
        credential: ClientCredential = read_tokens(args.token_dir, args.ids)
    elif args.secret_file is not None:
        secret = read_secret(args.secret_file)
        credential = {str(i): token_of(secret, str(i)) or "" for i in args.ids}
    else:
        credential = None
    latencies: list[float] = []
    try:
        run_fleet(
            args.server,
            args.ids,
            credential,
            ledger_path=args.ledger,
            pushers=args.pushers,
            push_seconds=latencies,
            per_connection=args.per_connection,
            fetch_each=args.fetch_each,
        )
    except (WorkerError, RuntimeError, grpc.RpcError) as exc:
        log.error("fleet failed: %s", exc)
        return 1
    finally:
        if args.latencies is not None:
            args.latencies.write_text(json.dumps(latencies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
