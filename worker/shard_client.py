"""One worker identity talking to the S shards of a sharded server as if they were one server.

A sharded server (cluster.shards = S) is S server processes, shard s owning the s-th contiguous
range of coordinates (byzps.common.shards). `ShardedClient` has the methods of
`ParameterServerClient` that the worker loops use, so honest workers, fleets and the Byzantine
cohort run unchanged:

* `register` registers with every shard and checks that shard s says it is shard s of S, of the
  same model and run; the reply it returns describes the whole model.
* `push` cuts the update into its S parts (`ShardLayout.split`) and pushes them concurrently, all
  with the same seq. Concurrently, not one after another: a shard that has every part of a round
  closes it and waits at the round's barrier for the other shards, so a part held back until
  the first shard acknowledged would leave both waiting for a deadline.
* `get_model` fetches every shard's slice (each through its own mirror, so the sparse downlink
  works per shard) and joins them; slices of different rounds (a shard that closed a round by
  its deadline before another) are fetched again at the newest round until they agree.

The seq ledgers are per shard, and a retried push carries the same seq to each, so a worker that
resumes after a crash completes a push that reached only some shards (those already holding it
answer DUPLICATE). An honest worker's parts pass every shard's door or none (the same checks on
slices of one valid message); a shard's refusal is raised as its ServerError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from byzps.common.shards import ShardLayout
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.worker.client import ParameterServerClient, Pushed
from byzps.worker.session import WorkerError

T = TypeVar("T")


def split_addresses(address: str) -> list[str]:
    """The shard addresses of a comma-separated `address` (one: an unsharded server)."""
    return [a.strip() for a in address.split(",") if a.strip()]


def connect(address: str, worker_id: str, **options: Any) -> ParameterServerClient | ShardedClient:
    """A client for `address`: one server, or the shards of one listed as "A0,A1,…" in rank
    order. `options` are ParameterServerClient's keyword arguments."""
    addresses = split_addresses(address)
    if len(addresses) == 1:
        return ParameterServerClient(addresses[0], worker_id, **options)
    return ShardedClient(addresses, worker_id, **options)


class ShardedClient:
    """One identity, S shard clients; see the module doc."""

    def __init__(self, addresses: Sequence[str], worker_id: str, **options: Any) -> None:
        if "channel" in options:
            raise ValueError("a sharded client opens one channel per shard itself")
        self.addresses = list(addresses)
        self.address = ",".join(self.addresses)
        self.worker_id = worker_id
        self.shards = [ParameterServerClient(a, worker_id, **options) for a in self.addresses]
        self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix=f"shards-{worker_id}")
        self.layout: ShardLayout | None = None
        self.registration: pb.RegisterReply | None = None

    # --- what the worker loops read and set -------------------------------------------------

    @property
    def config_digest(self) -> str:
        return self.shards[0].config_digest

    @config_digest.setter
    def config_digest(self, digest: str) -> None:
        for client in self.shards:
            client.config_digest = digest

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.shards[0].metadata

    def close(self) -> None:
        for client in self.shards:
            client.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- RPCs -------------------------------------------------------------------------------

    def register(self) -> pb.RegisterReply:
        """Register with every shard; the whole model's reply. Its last_seq is the oldest any
        shard acknowledged: a worker whose last push reached only some shards pushes it again
        (the others answer DUPLICATE), where the newest would have it commit a push that some
        shard never applied."""
        replies = self._each(lambda _, client: client.register())
        self.layout = self._check(replies)
        whole = pb.RegisterReply()
        whole.CopyFrom(replies[0])
        whole.ClearField("shard")
        whole.model.CopyFrom(pb.ModelSpec(dim=self.layout.dim, dtype=replies[0].model.dtype))
        whole.max_update_bytes = sum(r.max_update_bytes for r in replies)
        whole.round = min(r.round for r in replies)
        whole.last_seq = min(r.last_seq for r in replies)
        self.registration = whole
        return whole

    def _check(self, replies: Sequence[pb.RegisterReply]) -> ShardLayout:
        """The layout the shards describe; WorkerError when they are not one server's S shards
        in rank order."""
        count = len(replies)
        first = replies[0]
        if not first.HasField("shard"):
            raise WorkerError(f"{self.addresses[0]} is {_describe(first)}, not shard 0 of {count}")
        layout = ShardLayout(int(first.shard.total_dim) or 1, count)
        for rank, (address, reply) in enumerate(zip(self.addresses, replies, strict=True)):
            info = reply.shard
            expected = layout.shard(rank) if reply.HasField("shard") else None
            if (
                expected is None
                or info.rank != rank
                or info.count != count
                or info.total_dim != first.shard.total_dim
                or info.offset != expected.offset
                or reply.model.dim != expected.width
            ):
                raise WorkerError(
                    f"{address} is not shard {rank} of {count} of this model "
                    f"(it says: {_describe(reply)}); list the shards' addresses in rank order"
                )
            if reply.config_digest != first.config_digest:
                raise WorkerError(f"{address} serves another run than {self.addresses[0]}")
        return layout

    def get_model(self, round: int, known_round: int | None = None) -> tuple[int, Tensor]:
        """(r, x_r) for r ≥ `round` (and > `known_round`), the same r on every shard."""
        answers = self._each(lambda _, client: client.get_model(round, known_round))
        while True:
            newest = max(r for r, _ in answers)
            behind = [s for s, (r, _) in enumerate(answers) if r < newest]
            if not behind:
                return newest, torch.cat([x for _, x in answers])
            caught_up = self._each(lambda _, client, r=newest: client.get_model(r), behind)
            for s, answer in zip(behind, caught_up, strict=True):
                answers[s] = answer

    def push(self, round: int, seq: int, update: pb.SparseUpdate | bytes) -> Pushed:
        """Push the update's S parts concurrently; ACCEPTED when every shard applied its part
        (DUPLICATE when every one had already), RUN_FINISHED when any shard says the run ended
        first. A shard's refusal raises its ServerError."""
        if self.layout is None:
            self.register()
        assert self.layout is not None
        message = (
            update if isinstance(update, pb.SparseUpdate) else pb.SparseUpdate.FromString(update)
        )
        parts = self.layout.split(message)
        outcomes = self._each(lambda s, client: client.push(round, seq, parts[s]))
        if Pushed.RUN_FINISHED in outcomes:
            return Pushed.RUN_FINISHED
        if all(o is Pushed.DUPLICATE for o in outcomes):
            return Pushed.DUPLICATE
        return Pushed.ACCEPTED

    def status(self) -> pb.StatusReply:
        return self.shards[0].status()

    # --- machinery --------------------------------------------------------------------------

    def _each(
        self, call: Callable[[int, ParameterServerClient], T], ranks: Sequence[int] | None = None
    ) -> list[T]:
        """`call(rank, client)` on the listed shards (all by default) concurrently, results in
        rank order; the first failure (in rank order) is raised once all have returned."""
        chosen = range(len(self.shards)) if ranks is None else ranks
        futures = [self._pool.submit(call, s, self.shards[s]) for s in chosen]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]


def _describe(reply: pb.RegisterReply) -> str:
    if not reply.HasField("shard"):
        return f"an unsharded server of d = {reply.model.dim}"
    s = reply.shard
    return f"shard {s.rank} of {s.count}, offset {s.offset}, d = {s.total_dim}"
