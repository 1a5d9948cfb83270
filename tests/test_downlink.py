"""The sparse downlink: its wire form, and workers whose mirrored x stays the server's bit for bit.

The end-to-end tests run a real gRPC server on 127.0.0.1:0 and real ParameterServerClients; after
every round each worker's x must equal the server's x exactly (compared as int32 bits).
"""

from __future__ import annotations

import pytest
import torch
from server_support import SECRET, N, in_process, random_update, tiny_config
from torch import Tensor

from byzps.common.codec import WireFormatError
from byzps.common.config import RunConfig
from byzps.common.downlink import (
    AggregateDelta,
    DenseModel,
    ModelMirror,
    decode_downlink,
    encode_downlink,
    encode_downlink_wire,
)
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.engine import build_engine, build_server_parts
from byzps.worker.client import ParameterServerClient

SMALL = 64 + 8 * 4  # a message limit that forces several chunks / pieces for tiny vectors


def bits(t: Tensor) -> Tensor:
    return t.view(torch.int32)


def wire(stream: object) -> list[pb.ModelUpdate]:
    return [pb.ModelUpdate.FromString(m.SerializeToString()) for m in stream]  # type: ignore[attr-defined]


def a_delta(n: int = 10, dim: int = 50) -> AggregateDelta:
    idx = torch.randperm(dim, generator=torch.Generator().manual_seed(0))[:n].sort().values
    return AggregateDelta(7, dim, idx.to(torch.int32), torch.randn(n), 0.25)


# ---------------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("with_aggregate", [False, True])
def test_dense_round_trip(with_aggregate: bool) -> None:
    x, g = torch.randn(50), torch.randn(50)
    sent = DenseModel(3, x, g if with_aggregate else None)
    got = decode_downlink(wire(encode_downlink(sent, max_message_bytes=SMALL + 64)), dim=50)
    assert isinstance(got, DenseModel) and got.round == 3 and torch.equal(got.x, x)
    assert (got.aggregate is not None) == with_aggregate
    if with_aggregate:
        assert torch.equal(got.aggregate, g)


@pytest.mark.parametrize("n", [0, 1, 10, 37])
def test_delta_round_trip_in_pieces(n: int) -> None:
    sent = a_delta(n)
    stream = wire(encode_downlink(sent, max_message_bytes=SMALL + 64))
    assert len(stream) == max(1, -(-n // 4))  # 4 entries per piece at this limit
    got = decode_downlink(stream, dim=50)
    assert isinstance(got, AggregateDelta)
    assert (got.round, got.dim, got.lr) == (7, 50, 0.25)
    assert torch.equal(got.indices, sent.indices) and torch.equal(got.values, sent.values)


def test_wire_bytes_parse_to_the_messages_protobuf_builds() -> None:
    """encode_downlink_wire writes the wire form by hand (the bulk data copied once); a parser
    must see exactly the messages built field by field with protobuf."""
    x, g = torch.randn(6), torch.randn(6)
    chunks = [(0, slice(0, 4)), (4, slice(4, 6))]  # 4 floats per chunk at this limit
    expected = [
        pb.ModelUpdate(**{part: pb.ModelChunk(round=3, offset=offset, total_dim=6,
                                              data=t[where].numpy().tobytes())})
        for part, t in (("model", x), ("aggregate", g)) for offset, where in chunks
    ]  # fmt: skip
    sent = encode_downlink_wire(DenseModel(3, x, g), max_message_bytes=64 + 16)
    assert [pb.ModelUpdate.FromString(m) for m in sent] == expected
    delta = a_delta(6)
    expected = [
        pb.ModelUpdate(delta=pb.SparseModelDelta(round=7, lr=0.25, delta=pb.SparseUpdate(
            dim=50, nnz=n, dtype=pb.VALUE_DTYPE_FLOAT32,
            indices=delta.indices[where].numpy().tobytes(),
            values=delta.values[where].numpy().tobytes())))
        for n, where in ((4, slice(0, 4)), (2, slice(4, 6)))
    ]  # fmt: skip
    sent = encode_downlink_wire(delta, max_message_bytes=SMALL + 64)
    assert [pb.ModelUpdate.FromString(m) for m in sent] == expected


def test_delta_wire_bytes_are_about_8_per_entry() -> None:
    sent = a_delta(20_000, 2_000_000)
    size = sum(m.ByteSize() for m in encode_downlink(sent))
    assert size <= 1.05 * 8 * 20_000


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s[1:] + s[:1], "continue increasing"),
        (lambda s: [*s, pb.ModelUpdate(model=pb.ModelChunk(round=7))], "mixes"),
        (lambda s: [pb.ModelUpdate()], "empty"),
        (lambda s: [], "no model"),
    ],
)
def test_malformed_streams_are_refused(edit, match: str) -> None:
    stream = wire(encode_downlink(a_delta(), max_message_bytes=SMALL + 64))
    with pytest.raises(WireFormatError, match=match):
        decode_downlink(edit(stream), dim=50)


def test_mirror_refuses_a_delta_it_cannot_follow() -> None:
    mirror = ModelMirror()
    with pytest.raises(ValueError, match="does not follow"):
        mirror.apply(a_delta())
    mirror.apply(DenseModel(5, torch.zeros(50), torch.zeros(50)))  # round 5, delta leads to 7
    with pytest.raises(ValueError, match="does not follow"):
        mirror.apply(a_delta())


# ---------------------------------------------------------------------------------- end to end


def config_with(pre: list[str], k: int = 3) -> RunConfig:
    data = tiny_config(k=k).to_dict()
    data["aggregator"]["pre"] = pre
    return RunConfig.from_dict(data)


def run_rounds(
    pre: list[str], rounds: int, skip: tuple[int, int] | None = None, incremental: bool = True
) -> list[str]:
    """Every worker fetches, checks x against the server bitwise, and pushes; returns the kinds
    of answer worker 0 received. `skip = (worker, round)`: that worker does not fetch then.
    `incremental=False` is the server's `--downlink dense`."""
    config = config_with(pre)
    kinds: list[str] = []
    gen = torch.Generator().manual_seed(11)
    task, _, max_nnz = build_server_parts(config)
    engine = build_engine(config, task, sparse_downlink=incremental)
    with in_process(config, task=task, engine=engine, max_nnz=max_nnz) as srv:
        clients = [ParameterServerClient(srv.address, str(w), SECRET) for w in range(N)]
        mirror0 = clients[0].mirror
        assert mirror0 is not None
        apply = mirror0.apply

        def spy(downlink: object) -> None:
            kinds.append(type(downlink).__name__)
            apply(downlink)  # type: ignore[arg-type]

        mirror0.apply = spy  # type: ignore[method-assign]
        for c in clients:
            c.register()
        for r in range(rounds):
            for w, c in enumerate(clients):
                if skip != (w, r):
                    got_round, x = c.get_model(r)
                    assert got_round == r
                    assert torch.equal(bits(x), bits(srv.coordinator.engine.x))
                c.push(r, r + 1, random_update(gen, k=3))
            assert srv.coordinator.round == r + 1
        for c in clients:
            c.close()
        FINAL_X[(tuple(pre), incremental)] = srv.coordinator.engine.x.clone()
    return kinds


#: The server's final x of each run_rounds call, by (pre, incremental).
FINAL_X: dict[tuple[tuple[str, ...], bool], Tensor] = {}


#: numpy draws the inputs: torch.randn's own bits depend on ATen's CPU capability.
STEP_SCRIPT = """
import hashlib, numpy as np, torch
from byzps.common.downlink import apply_step
rng = np.random.default_rng(5)
x = torch.from_numpy(rng.standard_normal(200_000, dtype=np.float32))
for _ in range(20):
    apply_step(x, torch.from_numpy(rng.standard_normal(200_000, dtype=np.float32)), 0.037)
print(hashlib.sha256(x.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_step_gives_the_same_bits_on_cpus_with_and_without_fma(capability: str) -> None:
    """A worker mirrors the server's x by running the server's step on the same inputs; torch's
    fused x.sub_(ĝ, alpha=γ) rounded once on a CPU with FMA and twice on one without, so a
    mirror on such a CPU drifted (1,932 of 20,000 entries after 200 rounds). The step is now
    the same bits whatever ATen's CPU capability (ATEN_CPU_CAPABILITY=default: no FMA)."""
    import os
    import subprocess
    import sys

    def run(env: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", STEP_SCRIPT], capture_output=True, text=True, timeout=120,
            env=env, check=True,
        )  # fmt: skip
        return done.stdout.split()[-1]

    here = run(dict(os.environ))
    assert run(dict(os.environ, ATEN_CPU_CAPABILITY=capability)) == here


def test_workers_applying_deltas_stay_bit_identical() -> None:
    kinds = run_rounds(pre=[], rounds=8)
    # x_0 (no round closed yet) and x_1 (now with ĝ, which later deltas change) densely, then
    # only deltas.
    assert kinds == ["DenseModel"] * 2 + ["AggregateDelta"] * 6


def test_a_gap_falls_back_to_dense_and_stays_exact() -> None:
    kinds = run_rounds(pre=[], rounds=8, skip=(0, 4))  # holds x_3, next asks at round 5
    assert (
        kinds
        == ["DenseModel"] * 2 + ["AggregateDelta"] * 2 + ["DenseModel"] + ["AggregateDelta"] * 2
    )


def test_rules_that_mix_rows_stay_exact() -> None:
    """nnm∘cm changes ĝ almost everywhere; whatever the server sends, x stays the server's
    (run_rounds checks every worker's x bitwise after every round)."""
    assert len(run_rounds(pre=["nnm"], rounds=4)) == 4


def test_the_dense_downlink_mode_sends_whole_models_and_gives_the_same_model() -> None:
    assert set(run_rounds(pre=[], rounds=6, incremental=False)) == {"DenseModel"}
    run_rounds(pre=[], rounds=6)
    assert torch.equal(bits(FINAL_X[((), False)]), bits(FINAL_X[((), True)]))
