"""The pieces of a sharded server that need no cluster: how messages are cut into their shards'
parts, what a shard's door accepts, what a close record keeps, and the peer service's door.

The sharded server end to end (S server processes, workers, kill -9) is in
tests/test_sharded_server.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from byzps.common.aggregators.collective import sharded
from byzps.common.codec import decode_sparse, encode_sparse, encode_sparse_wire
from byzps.common.compressors import randk_indices
from byzps.common.config import ConfigError, RunConfig
from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
from byzps.common.shards import ShardingError, ShardLayout
from byzps.common.sparse import SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import shard_peer_pb2 as peer_pb
from byzps.proto.v1 import shard_peer_pb2_grpc as peer_grpc
from byzps.server.shard_peer import (
    COLLECTIVE,
    MODEL,
    Outbox,
    ReplayCollective,
    ShardPeerServicer,
    add_peer_service,
    pack_arrays,
    peer_token,
    unpack_arrays,
)
from byzps.server.validation import Door, Rejected
from byzps.server.wal import CloseRecord, _decode_body, encode_record

SECRET = b"peer-test-secret"


def sparse(indices: list[int], values: list[float], dim: int, seed: int | None = None):
    return SparseVector(torch.tensor(indices, dtype=torch.int32), torch.tensor(values), dim, seed)


# --- cutting messages ----------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_message_is_cut_into_its_shards_parts_and_nothing_is_lost(shards, dtype) -> None:
    """Every entry lands in the part of the shard owning its coordinate, at its local index,
    with its value's bits; the parts' dims are the shards' widths; the seed travels along."""
    dim = 1009
    layout = ShardLayout(dim, shards)
    gen = torch.Generator().manual_seed(shards)
    for nnz in (0, 1, 17, 500, dim):
        idx = torch.randperm(dim, generator=gen)[:nnz].sort().values.to(torch.int32)
        vec = SparseVector(idx, torch.randn(nnz, generator=gen).to(dtype).float(), dim, 99)
        wire = pb.SparseUpdate.FromString(encode_sparse_wire(vec, compressor="randk", dtype=dtype))
        parts = layout.split(wire)
        assert [p.dim for p in parts] == layout.widths
        assert sum(p.nnz for p in parts) == nnz
        got_idx, got_val = [], []
        for part, start in zip(parts, layout.bounds[:-1], strict=True):
            assert part.seed == 99 and part.dtype == wire.dtype
            assert part.compressor == wire.compressor
            decoded = decode_sparse(part)
            got_idx.append(decoded.indices.long() + int(start))
            got_val.append(decoded.values)
        assert torch.equal(torch.cat(got_idx), idx.long())
        assert torch.equal(torch.cat(got_val), vec.values)
        if nnz == dim:  # a dense message stays dense (no index bytes) on every shard
            assert all(not p.indices for p in parts)


def test_ranges_are_contiguous_and_as_even_as_d_allows() -> None:
    layout = ShardLayout(10, 4)
    assert layout.widths == [3, 3, 2, 2]
    assert [layout.shard(r).offset for r in range(4)] == [0, 3, 6, 8]
    with pytest.raises(ShardingError, match=r"cluster\.shards"):
        ShardLayout(3, 4)
    with pytest.raises(ShardingError, match="rank 4"):
        layout.shard(4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: setattr(m, "dim", 11), "dim 11"),
        (lambda m: setattr(m, "packed", b"\x01"), "packed"),
        (lambda m: setattr(m, "values", m.values[:-1]), "value bytes"),
        (lambda m: setattr(m, "indices", m.indices[:-4]), "index bytes"),
        (lambda m: setattr(m, "indices", m.indices[4:8] + m.indices[:4]), "increasing"),
    ],
)
def test_a_message_that_cannot_be_cut_is_refused_by_name(change, message) -> None:
    msg = encode_sparse(sparse([1, 5], [1.0, 2.0], 10), compressor="topk")
    change(msg)
    with pytest.raises(ShardingError, match=message):
        ShardLayout(10, 2).split(msg)


def test_config_refuses_shards_for_messages_that_do_not_split() -> None:
    base = RunConfig().to_dict()
    for name in ("qsgd", "sign", "natural", "permk"):
        sections = {"cluster": {"workers": 5, "shards": 2}, "compressor": {"name": name}}
        with pytest.raises(ConfigError, match=r"cluster\.shards: " + name):
            RunConfig.from_dict(base | sections)
    with pytest.raises(ConfigError, match=r"cluster\.shards: must be at least 1"):
        RunConfig.from_dict(base | {"cluster": {"workers": 5, "shards": 0}})


def test_an_unsharded_run_keeps_its_digest_and_a_sharded_one_has_its_own() -> None:
    """Workers must know S to cut their messages, so it is part of a sharded run's digest; an
    unsharded run's digest is what it was before the key existed."""
    import hashlib
    import json

    config = RunConfig.from_dict({"compressor": {"name": "identity"}})
    data = config.to_dict()
    del data["run"]["device"], data["cluster"]["shards"]
    before = hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert config.digest() == before
    sharded = RunConfig.from_dict(
        config.to_dict() | {"cluster": {"shards": 2}, "compressor": {"name": "identity"}}
    )
    assert sharded.digest() != before


# --- a shard's door ------------------------------------------------------------------------------


def test_a_shards_door_checks_a_rand_k_part_against_the_whole_selection() -> None:
    """Shard 1 of 3 (d = 300, k = 40) accepts exactly its slice of the seed's selection, in
    local indices, and refuses the whole selection, another seed's slice, a shifted slice and
    an update of the whole model's dim."""
    dim, k, seed = 300, 40, 1234
    layout = ShardLayout(dim, 3)
    shard = layout.shard(1)
    door = Door(shard.width, "randk", lambda r: k, 10, shard=shard)
    chosen = randk_indices(dim, k, seed)
    whole = SparseVector(chosen, torch.ones(k), dim, seed)
    part = layout.split(encode_sparse(whole, compressor="randk"))[1]
    got = door.receive(0, 0, 1, part)
    assert torch.equal(
        got.vector.indices.long() + shard.offset, chosen[(chosen >= 100) & (chosen < 200)].long()
    )

    other = randk_indices(dim, k, seed + 1)
    wrong_seed = layout.split(
        encode_sparse(SparseVector(other, torch.ones(k), dim, seed), compressor="randk")
    )[1]
    shifted = pb.SparseUpdate()
    shifted.CopyFrom(part)
    local = np.frombuffer(part.indices, "<u4")
    shifted.indices = np.clip(local + 1, 0, shard.width - 1).astype("<u4").tobytes()
    for bad in (wrong_seed, shifted, encode_sparse(whole, compressor="randk")):
        with pytest.raises(Rejected):
            door.receive(0, 0, 1, bad)


def test_a_shards_door_bounds_a_request_by_what_its_range_can_hold() -> None:
    """Top-k with k = 1000 over d = 4000 on 4 shards: a part can hold at most 1000 entries,
    but a shard of width 1000 is sized for at most its width — a 50-entry bound at width 50."""
    layout = ShardLayout(200, 4)
    door = Door(50, "topk", lambda r: 1000, 10, shard=layout.shard(0))
    assert door.largest_k_max == 50


# --- the close record's sums ---------------------------------------------------------------------


def test_a_close_record_keeps_the_sums_its_replay_hands_back() -> None:
    sums = [np.arange(9.0).reshape(3, 3), np.array([1.5, -2.0]), np.float32([3.25])]
    blob = pack_arrays(sums)
    record = _decode_body(encode_record(CloseRecord(17, blob))[8:])
    assert record == CloseRecord(17, blob)
    assert _decode_body(encode_record(CloseRecord(3))[8:]) == CloseRecord(3)  # unsharded
    outbox = Outbox()
    replay = ReplayCollective(ShardLayout(4, 2).shard(1), [2, 2], unpack_arrays(blob), outbox, 17)
    for step, expected in enumerate(sums):
        part = np.full_like(expected, step + 0.5)
        got = replay.all_sum(part)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        # Published again as the live close published it, for a peer that had not fetched it.
        assert np.array_equal(outbox.get(COLLECTIVE, 17, step), part)
    assert replay.exhausted and outbox.round == 17
    with pytest.raises(ValueError, match="fewer sums"):
        replay.all_sum(np.zeros(1))
    for broken in (blob[:-1], blob + b"\x00", b"\x01\x00\x00\x00\x02\x01\x00\x00\x00"):
        with pytest.raises(ValueError):
            unpack_arrays(broken)


# --- the peer service ----------------------------------------------------------------------------


@pytest.fixture
def peer_server() -> Iterator[tuple[Outbox, str]]:
    """A ShardPeer service over one Outbox on 127.0.0.1, on its own event loop thread."""
    outbox = Outbox()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    address: list[str] = []
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        server = grpc.aio.server()
        add_peer_service(server, ShardPeerServicer(outbox, SECRET))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address.append(f"127.0.0.1:{port}")
        stop.append(asyncio.Event())
        started.set()
        await stop[0].wait()
        await server.stop(0)

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield outbox, address[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)


def fetch(address: str, token: str | None, **fields) -> peer_pb.PartReply:
    with grpc.insecure_channel(address) as channel:
        metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
        request = peer_pb.FetchPartRequest(**fields)
        return peer_grpc.ShardPeerStub(channel).FetchPart(request, timeout=10, metadata=metadata)


def test_only_a_peer_shard_may_read_a_part(peer_server) -> None:
    """No token, a worker's own token or the operator's: UNAUTHENTICATED. A worker holds only its
    own token, from which the peer token (another HMAC of the master secret) cannot be made."""
    outbox, address = peer_server
    outbox.put(COLLECTIVE, 0, 0, np.ones((2, 2)))
    for token in (None, token_for(SECRET, "0"), token_for(SECRET, "operator"), "x" * 64):
        with pytest.raises(grpc.RpcError) as caught:
            fetch(address, token, kind=COLLECTIVE, round=0, step=0)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = fetch(address, peer_token(SECRET), kind=COLLECTIVE, round=0, step=0)
    assert reply.ready and np.frombuffer(reply.data, reply.dtype).tolist() == [1.0] * 4


def test_a_fetch_waits_for_a_part_and_no_longer_than_its_bound(peer_server) -> None:
    outbox, address = peer_server
    token = peer_token(SECRET)
    began = time.monotonic()
    reply = fetch(address, token, kind=COLLECTIVE, round=5, step=1, wait_ms=300)
    assert not reply.ready and 0.25 < time.monotonic() - began < 5
    threading.Timer(0.3, lambda: outbox.put(COLLECTIVE, 5, 1, np.array([7.0]))).start()
    reply = fetch(address, token, kind=COLLECTIVE, round=5, step=1, wait_ms=5000)
    assert reply.ready and np.frombuffer(reply.data, reply.dtype).tolist() == [7.0]
    began = time.monotonic()  # an absurd wait is capped (MAX_WAIT_MS = 5 s)
    assert not fetch(address, token, kind=MODEL, round=9, wait_ms=2**31).ready
    assert time.monotonic() - began < 8
    with pytest.raises(grpc.RpcError) as caught:
        fetch(address, token, kind=0, round=0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_outbox_keeps_two_rounds_of_parts_and_four_model_slices() -> None:
    outbox = Outbox()
    for round in range(6):
        outbox.put(COLLECTIVE, round, 0, np.zeros(1))
        outbox.put(MODEL, round, 0, np.zeros(1))
    kept = [r for r in range(6) if outbox.get(COLLECTIVE, r, 0) is not None]
    models = [r for r in range(6) if outbox.get(MODEL, r, 0) is not None]
    assert kept == [4, 5] and models == [2, 3, 4, 5]


# --- the simulator's shards ----------------------------------------------------------------------


def simulated(shards: int, aggregator: str, pre: list[str], attack: str = "alie", **run) -> Any:
    """The final x of a small a9a simulation on `shards` column shards."""
    import configs

    from byzps.common.components import build_run_task
    from byzps.sim.build import build_simulation

    sections = configs.small_config(seed=5, rounds=25, k=3, aggregator=aggregator, attack=attack)
    sections["aggregator"]["pre"] = pre
    sections["cluster"]["shards"] = shards
    sections["run"] |= run
    config = RunConfig.from_dict(sections)
    task = build_run_task(config)
    simulation = build_simulation(config, task)
    if shards > 1:
        assert type(simulation.engine.aggregator).__name__ == "ColumnSharded"
    for _ in range(config.run.rounds):
        simulation.step()
    return simulation.x.clone(), simulation.engine.aggregator


@pytest.mark.parametrize(
    "aggregator, pre, attack",
    [("cm", ["nnm"], "alie"), ("cclip", ["nnm"], "alie"), ("krum", [], "ipm"),
     ("gm", ["bucketing"], "sf"), ("cwtm", [], "minmax")],
)  # fmt: skip
def test_a_simulated_run_on_shards_is_one_servers_run(aggregator, pre, attack) -> None:
    """`byzps simulate` honours cluster.shards: each shard's own rule instance (its own cclip
    centre, bucketing generator) on its columns, reductions summed between them — the same
    model as one aggregator, bit for bit for coordinate-wise rules and within float64 rounding
    for the rest (here also bit for bit: the decisions agree and reach float32 alike)."""
    one, _ = simulated(1, aggregator, pre, attack)
    for shards in (2, 3):
        many, rule = simulated(shards, aggregator, pre, attack)
        assert rule.widths == ShardLayout(123, shards).widths
        assert torch.allclose(many, one, rtol=1e-6, atol=1e-9), (many - one).abs().max()
        if aggregator in ("cm", "cwtm"):
            assert torch.equal(many, one)


def test_a_shard_that_fails_stops_the_others_at_once() -> None:
    """A rule failing on one shard raises its own error, not the barrier's, and without the
    others waiting out the barrier's timeout."""
    from byzps.common.aggregators import build_aggregator
    from byzps.common.aggregators.collective import ColumnSharded

    sharded_rule = ColumnSharded(lambda: build_aggregator("krum", 1, n=5), [4, 4])

    class Broken(type(sharded_rule.shards[1])):
        def __call__(self, x):
            raise RuntimeError("shard 1 broke")

    sharded_rule.shards[1].__class__ = Broken
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="shard 1 broke"):
        sharded_rule(torch.randn(5, 8))
    assert time.monotonic() - began < 10


# --- the wire collective against the in-process one ------------------------------------------


@pytest.fixture(scope="module")
def two_peers() -> Iterator[list[tuple[Outbox, str]]]:
    """Two ShardPeer services (no auth) on 127.0.0.1, each over its own Outbox."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    served: list[tuple[Outbox, str]] = []
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        servers = []
        for _ in range(2):
            outbox = Outbox()
            server = grpc.aio.server()
            add_peer_service(server, ShardPeerServicer(outbox, None))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            served.append((outbox, f"127.0.0.1:{port}"))
        stop.append(asyncio.Event())
        started.set()
        await stop[0].wait()
        for server in servers:
            await server.stop(0)

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield served
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)


_WIRE_ROUND = iter(range(10**6))


@pytest.mark.parametrize(
    ("name", "pre"),
    [(n, ()) for n in ("krum", "multikrum", "gm", "cclip", "dnc", "cge", "mean")]
    + [("cm", ("nnm",)), ("cwtm", ("bucketing",)), ("gm", ("nnm",)), ("cwtm", ("arc",))],
)
def test_the_wire_collective_gives_the_in_process_collectives_bits(two_peers, name, pre) -> None:
    """Two shards over ShardPeer.FetchPart on loopback give exactly what two ThreadCollective
    shards give (both add the parts in rank order), for rules that reduce over columns."""
    from byzps.common.aggregators import build_aggregator
    from byzps.common.aggregators.collective import ColumnSharded
    from byzps.server.shard_peer import Peers, WireCollective

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, 301, generator=gen)
    x[-2:] += 5.0
    widths = ShardLayout(301, 2).widths
    params = {"c": 2.0} if "clip" in pre else {}

    def rule():
        return build_aggregator(name, 2, pre=pre, params=params, n=9, seed=4)

    expected = ColumnSharded(rule, widths)(x)
    layout = ShardLayout(301, 2)
    addresses = [address for _, address in two_peers]
    round = next(_WIRE_ROUND)
    outputs: list[torch.Tensor | None] = [None, None]

    def shard(rank: int) -> None:
        span = layout.shard(rank)
        peers = Peers(span, addresses, None, timeout=30)
        collective = WireCollective(span, widths, two_peers[rank][0], peers)
        collective.begin(round)
        with sharded(collective):
            outputs[rank] = rule()(x[:, span.offset : span.end].contiguous())
        peers.close()

    threads = [threading.Thread(target=shard, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outputs[0] is not None and outputs[1] is not None
    assert torch.equal(torch.cat(outputs), expected)  # type: ignore[arg-type]


def test_a_model_slice_a_peer_no_longer_keeps_fails_at_once(peer_server) -> None:
    """Rank 0 re-evaluating an old round after a resume: a peer already past that round and
    without its slice says so at the first answer, instead of being waited for (the record is
    skipped, the run goes on)."""
    from byzps.server.shard_peer import PeerError, Peers

    outbox, address = peer_server
    outbox.put(COLLECTIVE, 9, 0, np.zeros(1))  # the peer is closing round 9
    outbox.put(MODEL, 9, 0, np.arange(3.0))
    layout = ShardLayout(6, 2)
    peers = Peers(layout.shard(0), ["127.0.0.1:1", address], SECRET, timeout=60)
    try:
        assert peers.fetch(1, MODEL, 9, 0).tolist() == [0.0, 1.0, 2.0]
        began = time.monotonic()
        with pytest.raises(PeerError, match="no longer keeps"):
            peers.fetch(1, MODEL, 3, 0)
        assert time.monotonic() - began < 5
    finally:
        peers.close()
