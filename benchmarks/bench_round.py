"""One synchronous server round, dense path against incremental aggregation + sparse downlink.

Usage:  python benchmarks/bench_round.py [--sizes 1000000 10000000] [--workers 20]
            [--density 0.01] [--aggregators mean cm nnm+cm] [--rounds 3 2] [--warmup 2]

Per round the server (state rule, i.e. EF21-style g_j += c_j, as byz-dm21 uses) goes through

  decode     n uplink SparseUpdates: bytes → FromString → decode_sparse
  apply      engine.absorb of the n messages
  aggregate  ĝ = ARAgg(candidates): every column (dense) or only the dirty ones (incremental)
  step       x ← x − γ ĝ (dense either way)
  broadcast  n GetModelUpdate-style fetches over loopback gRPC: encode on the server, wire,
             decode_downlink on the client — the dense x (dense path) or the change of ĝ
             (sparse path, to workers that hold x and ĝ of the previous round)

and `worker apply` is what one worker then spends to turn a delta into x (ModelMirror.apply; done
in parallel by the workers, so not part of the server round). Messages are Top-k with random
supports (k = density · d), the worst case for the union U of supports. `raw gRPC` is a bytes
stream of the same sizes through an identity-serialized handler on the same server, i.e. the
transport's floor for the broadcast, measured in the same run. Wire bytes per update: serialized
uplink SparseUpdate / (8·k) (goal ≤ 1.05). Times are medians over the timed rounds, in ms.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from byzps.common.aggregators import build_aggregator
from byzps.common.codec import MAX_MESSAGE_BYTES, decode_sparse, encode_sparse
from byzps.common.downlink import (
    AggregateDelta,
    DenseModel,
    Downlink,
    ModelMirror,
    apply_step,
    decode_downlink,
    encode_downlink,
)
from byzps.common.server_rules import build_server_rule
from byzps.common.sparse import SparseBatch, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.engine import RoundEngine

PARTS = ("decode", "apply", "aggregate", "step", "broadcast")
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + 1024)]


# ---------------------------------------------------------------------------- loopback server


class Loopback:
    """A gRPC server on 127.0.0.1 with two streaming methods: `Fetch` encodes the current
    Downlink exactly as the servicer does, `Raw` streams the same number of plain bytes."""

    def __init__(self) -> None:
        self.downlink: Downlink | None = None
        self.raw_sizes: list[int] = []
        handlers = {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: encode_downlink(self.downlink),
                request_deserializer=bytes,
                response_serializer=pb.ModelUpdate.SerializeToString,
            ),
            "Raw": grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: (bytes(n) for n in self.raw_sizes),
                request_deserializer=bytes,
                response_serializer=bytes,
            ),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b", handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=_OPTIONS)
        self.fetch = self.channel.unary_stream(
            "/b/Fetch", request_serializer=bytes, response_deserializer=pb.ModelUpdate.FromString
        )
        self.raw = self.channel.unary_stream(
            "/b/Raw", request_serializer=bytes, response_deserializer=bytes
        )

    def broadcast(self, downlink: Downlink, n: int, dim: int) -> tuple[Downlink, int]:
        """n fetches of `downlink`; returns the last decoded answer and the bytes of one."""
        self.downlink = downlink
        got, size = None, 0
        for _ in range(n):
            stream = list(self.fetch(b""))
            size = sum(m.ByteSize() for m in stream)
            got = decode_downlink(stream, dim=dim)
        assert got is not None
        return got, size

    def raw_round_trip(self, total_bytes: int, n: int) -> None:
        """n streams of `total_bytes` in chunks as large as the model stream's."""
        self.raw_sizes = [MAX_MESSAGE_BYTES - 64] * (total_bytes // (MAX_MESSAGE_BYTES - 64))
        self.raw_sizes.append(total_bytes - sum(self.raw_sizes))
        for _ in range(n):
            for _ in self.raw(b""):
                pass

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)


# ---------------------------------------------------------------------------- workload


def top_k_updates(rng: np.random.Generator, n: int, dim: int, k: int) -> list[bytes]:
    """n serialized Top-k SparseUpdates with random sorted supports (as workers would send)."""
    out = []
    for _ in range(n):
        idx = np.unique(rng.integers(0, dim, size=k + k // 4 + 16))
        idx = np.sort(rng.choice(idx, size=k, replace=False)).astype(np.int32)
        values = rng.standard_normal(k, dtype=np.float32) * 1e-3
        vec = SparseVector(torch.from_numpy(idx), torch.from_numpy(values), dim)
        out.append(encode_sparse(vec, compressor="topk").SerializeToString())
    return out


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, 1e3 * (time.perf_counter() - start)


@dataclass
class PathResult:
    parts: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PARTS})
    worker_apply: list[float] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    deltas: int = 0

    def median(self, part: str) -> float:
        return statistics.median(self.parts[part])

    @property
    def round_ms(self) -> float:
        return statistics.median([sum(vals) for vals in zip(*self.parts.values(), strict=True)])


def run_path(
    sparse: bool, aggregator: str, dim: int, args: argparse.Namespace, rounds: int, lb: Loopback
) -> tuple[PathResult, RoundEngine]:
    """Warm-up then timed rounds of one path; the engine is returned for a final check."""
    n, k = args.workers, max(1, round(args.density * dim))
    base, *pre = reversed(aggregator.split("+"))
    engine = RoundEngine(
        torch.zeros(dim),
        build_server_rule("state", n, dim),
        build_aggregator(base, f=args.f, pre=list(reversed(pre))),
        lr=0.1,
    )
    if not sparse:
        engine.incremental_limit = -1.0  # aggregate every column, as before this change
    mirror = ModelMirror()
    rng = np.random.default_rng(0)
    result = PathResult()
    rows = torch.arange(n)
    for r in range(args.warmup + rounds):
        wire = top_k_updates(rng, n, dim, k)  # workers' work, not timed
        vecs, t_decode = timed(
            lambda w=wire: [decode_sparse(pb.SparseUpdate.FromString(b)) for b in w]
        )
        batch = SparseBatch.stack(vecs)  # type: ignore[arg-type]
        _, t_apply = timed(lambda b=batch: engine.absorb(rows, b))
        _, t_close = timed(engine.close_round)
        probe = engine.x.clone()
        _, t_step = timed(lambda p=probe: apply_step(p, engine.last_aggregate, engine.lr))
        delta = engine.last_delta
        if sparse and delta is not None and mirror.has_aggregate:
            downlink: Downlink = delta
        else:  # dense; ĝ rides along once deltas are being produced
            agg = engine.last_aggregate if sparse and delta is not None else None
            downlink = DenseModel(engine.round, engine.x, agg)
        (got, size), t_bcast = timed(lambda d=downlink: lb.broadcast(d, n, dim))
        _, t_worker = timed(lambda g=got: mirror.apply(g))
        if r < args.warmup:
            continue
        for part, t in zip(
            PARTS, (t_decode, t_apply, t_close - t_step, t_step, t_bcast), strict=True
        ):
            result.parts[part].append(t)
        result.worker_apply.append(t_worker)
        result.down_bytes.append(size)
        result.deltas += isinstance(got, AggregateDelta)
    assert mirror.x is not None and torch.equal(
        mirror.x.view(torch.int32), engine.x.view(torch.int32)
    )
    return result, engine


def raw_baseline(lb: Loopback, total_bytes: int, n: int, repeats: int) -> float:
    times = [timed(lambda: lb.raw_round_trip(total_bytes, n))[1] for _ in range(repeats + 1)]
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[5, 2], help="per size")
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--f", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.01, help="k / d")
    parser.add_argument("--aggregators", nargs="+", default=["mean", "cm", "nnm+cm"])
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    print("$ python " + shlex.join(["benchmarks/bench_round.py", *sys.argv[1:]]))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, n = {args.workers}, "
        f"f = {args.f}, Top-k density {args.density}, state rule, loopback gRPC"
    )
    lb = Loopback()
    try:
        for i, dim in enumerate(args.sizes):
            rounds = args.rounds[min(i, len(args.rounds) - 1)]
            report_size(dim, rounds, args, lb)
    finally:
        lb.close()


def report_size(dim: int, rounds: int, args: argparse.Namespace, lb: Loopback) -> None:
    k = max(1, round(args.density * dim))
    up = len(top_k_updates(np.random.default_rng(1), 1, dim, k)[0])
    print(f"\nd = {dim:,}  k = {k:,}  uplink bytes/update = {up:,} = {up / (8 * k):.4f} x 8k")
    head = f"{'aggregator':>10} {'path':>7} {'round ms':>9} " + " ".join(f"{p:>9}" for p in PARTS)
    print(head + f" {'wkr apply':>9} {'down B/wkr':>11} {'deltas':>6} {'raw gRPC':>9}")
    for aggregator in args.aggregators:
        by_path = {}
        for sparse in (False, True):
            result, engine = run_path(sparse, aggregator, dim, args, rounds, lb)
            by_path[sparse] = (result, engine)
            down = int(statistics.median(result.down_bytes))
            raw = raw_baseline(lb, down, args.workers, repeats=2)
            parts = " ".join(f"{result.median(p):9.1f}" for p in PARTS)
            print(
                f"{aggregator:>10} {'sparse' if sparse else 'dense':>7} {result.round_ms:9.1f} "
                f"{parts} {statistics.median(result.worker_apply):9.2f} {down:11,} "
                f"{result.deltas:>3}/{rounds:<2} {raw:9.1f}"
            )
            del engine
        (dense, e_dense), (sparse_r, e_sparse) = by_path[False], by_path[True]
        same = torch.equal(e_dense.x.view(torch.int32), e_sparse.x.view(torch.int32))
        print(
            f"{'':>10} dense/sparse round time = {dense.round_ms / sparse_r.round_ms:.2f}x, "
            f"final x bit-identical: {same}"
        )
        del by_path, e_dense, e_sparse


if __name__ == "__main__":
    main()
