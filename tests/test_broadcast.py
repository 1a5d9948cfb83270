"""Each round's model answer is copied and serialized once, however many workers fetch it.

Unit tests of the cache, then a real gRPC server on 127.0.0.1:0: several workers fetching one
round get byte-identical streams from one shared snapshot, and the next round gets a new one.
"""

from __future__ import annotations

import torch
from server_support import SECRET, Client, N, in_process, random_update, tiny_config

from byzps.common.downlink import DenseModel, encode_downlink_wire
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.broadcast import EncodedAnswers, passthrough


def counting_encoder(calls: list[object]):
    def encode(answer: object):
        calls.append(answer)
        return encode_downlink_wire(answer)  # type: ignore[arg-type]

    return encode


def test_an_answer_is_encoded_once_and_serialized_as_protobuf_would() -> None:
    x, g = torch.randn(1000), torch.randn(1000)
    answer = DenseModel(3, x, g)
    calls: list[object] = []
    cache = EncodedAnswers()
    first = cache.get(answer, counting_encoder(calls))
    again = cache.get(answer, counting_encoder(calls))
    assert calls == [answer] and again is first
    chunk = {"round": 3, "total_dim": 1000}
    assert first == [
        pb.ModelUpdate(model=pb.ModelChunk(**chunk, data=x.numpy().tobytes())).SerializeToString(),
        pb.ModelUpdate(
            aggregate=pb.ModelChunk(**chunk, data=g.numpy().tobytes())
        ).SerializeToString(),
    ]


def test_the_cache_keeps_the_newest_answers_only() -> None:
    calls: list[object] = []
    cache = EncodedAnswers(keep=2)
    answers = [DenseModel(r, torch.full((4,), float(r))) for r in range(3)]
    for answer in answers:
        cache.get(answer, counting_encoder(calls))
    cache.get(answers[2], counting_encoder(calls))  # cached
    cache.get(answers[0], counting_encoder(calls))  # evicted: encoded again
    assert calls == [answers[0], answers[1], answers[2], answers[0]]


def test_equal_but_distinct_answers_are_not_confused() -> None:
    calls: list[object] = []
    cache = EncodedAnswers()
    a, b = DenseModel(1, torch.zeros(4)), DenseModel(1, torch.ones(4))
    assert cache.get(a, counting_encoder(calls)) != cache.get(b, counting_encoder(calls))
    assert len(calls) == 2


def test_passthrough_sends_bytes_as_they_are() -> None:
    chunk = pb.ModelChunk(round=1, offset=0, total_dim=1, data=b"\0\0\0\0")
    serialize = passthrough(pb.ModelChunk.SerializeToString)
    assert serialize(b"raw") == b"raw"
    assert serialize(chunk) == chunk.SerializeToString()


def test_workers_of_one_round_share_one_snapshot_and_get_the_same_bytes() -> None:
    config = tiny_config(k=2)
    gen = torch.Generator().manual_seed(5)
    with in_process(config) as srv:
        client = Client(srv.address, SECRET)
        for w in range(N):
            client.register(str(w))
        coordinator = srv.coordinator

        def fetch() -> DenseModel:
            found = coordinator.model(0, None)
            assert found is not None
            return found

        first = fetch()
        assert fetch() is first  # one copy of x per round, shared
        streams = [
            [c.SerializeToString() for c in client.chunks(str(w), round=0)] for w in range(N)
        ]
        assert all(s == streams[0] for s in streams)
        for w in range(N):
            client.push(str(w), 0, 1, random_update(gen, k=2))
        assert coordinator.round == 1
        second = fetch()
        assert second is not first and second.round == 1
        assert not torch.equal(second.x, first.x)
        client.close()
