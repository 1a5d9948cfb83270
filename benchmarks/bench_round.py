"""One synchronous server round, dense path against incremental aggregation + sparse downlink.

Usage:  python benchmarks/bench_round.py [--sizes 1000000 10000000] [--workers 20]
            [--density 0.01] [--aggregators mean cm nnm+cm] [--rounds 4 2] [--warmup 40]
            [--device cuda]

The workload is a real run, not synthetic messages: n workers run Byz-DM21 (η = 0.1) with
Top-k (k = density · d) on the `quadratic` task of dimension d (heterogeneous targets, gradient
noise; byzps.common.tasks.quadratic), built from a RunConfig by the same component builders the
daemons use. Round 0 is sent uncompressed (EF21's g⁰ = ∇f_i(x⁰) start), so the server's states
are dense from the first round, as they are after a long run; then `--warmup` rounds run untimed
(server work only, no broadcast: the share of ĝ that changes per round settles after ~30 rounds,
e.g. for cm from 0.3% of d in the first rounds to ~9%), one more round syncs the workers'
mirrors, and `--rounds` are timed. The two paths run side by side on the same messages (one engine
each) and their x is checked bit-identical after every round.

Per round the server (state rule g_j += c_j) goes through

  decode     n uplink SparseUpdates: bytes → FromString → decode_sparse
  apply      engine.absorb of the n messages
  aggregate  ĝ = ARAgg(candidates): every column (dense) or only the dirty ones (incremental)
  step       x ← x − γ ĝ (dense either way)
  serve      n GetModelUpdate-style fetches over loopback gRPC, answered as the server does:
             the answer serialized once (byzps.server.broadcast), sent n times, received as
             bytes — the dense x (dense path) or the change of ĝ (sparse path)
  wkr decode one worker's parse and decode of its answer (every worker does it, in parallel
             with the others, so it counts once)

and `worker apply` is what one worker then spends to turn a delta into x (ModelMirror.apply; done
in parallel by the workers, so not part of the server round). `rnd/raw` is the round (all the
parts: everything but the workers' estimator steps) over `raw gRPC`, taken round by round (each
raw transfer runs right after its round, so a noisy machine slows both alike) and the median of
those ratios printed. `|U|/d` is the union of the round's supports and `|Δ|/d` the entries of ĝ
that changed (what the sparse downlink sends).
`raw gRPC` is n bytes streams of the round's answer size through an identity-serialized handler
on the same server, i.e. the transport's floor for the broadcast, measured in the same run.
Wire bytes per update: serialized uplink SparseUpdate / (8·k) (goal ≤ 1.05). Times are medians
over the timed rounds, in ms. For whole rounds with 20 worker processes see
benchmarks/bench_cluster.py.
The process keeps freed memory as the server daemon does at the largest d
(`keep_freed_memory(server_heap_blocks(d))`); the in-process worker decode and raw receiver share
that heap, where a real worker takes blocks up to 32 MiB only (at d = 1e7 that favours their
decode of a dense 40 MB answer; a Top-1 % answer's blocks are smaller).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from timing import as_the_daemons_run

from byzps.common.codec import MAX_MESSAGE_BYTES, decode_sparse
from byzps.common.components import build_run_compressor, build_run_estimator, build_run_task
from byzps.common.compressors import build_compressor
from byzps.common.config import RunConfig
from byzps.common.downlink import (
    AggregateDelta,
    DenseModel,
    Downlink,
    ModelMirror,
    apply_step,
    decode_downlink,
    encode_downlink_wire,
)
from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.common.sparse import SparseBatch
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.broadcast import EncodedAnswers, passthrough
from byzps.server.engine import RoundEngine, build_engine
from byzps.worker.session import encode_row

PARTS = ("decode", "apply", "aggregate", "step", "serve", "wkr decode")
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + 1024)]


# ---------------------------------------------------------------------------- loopback server


class Loopback:
    """A gRPC server on 127.0.0.1 with two streaming methods: `Fetch` answers with the current
    Downlink exactly as the servicer does (serialized once, byte strings passed through), `Raw`
    streams the same number of plain bytes."""

    def __init__(self) -> None:
        self.downlink: Downlink | None = None
        self.answers = EncodedAnswers()
        self.raw_sizes: list[int] = []
        handlers = {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: iter(self.answers.get(self.downlink, encode_downlink_wire)),
                request_deserializer=bytes,
                response_serializer=passthrough(pb.ModelUpdate.SerializeToString),
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
            "/b/Fetch", request_serializer=bytes, response_deserializer=bytes
        )
        self.raw = self.channel.unary_stream(
            "/b/Raw", request_serializer=bytes, response_deserializer=bytes
        )

    def serve(self, downlink: Downlink, n: int) -> list[bytes]:
        """n fetches of `downlink`, received as bytes (the server's side and the transport);
        returns the last answer's messages."""
        self.downlink = downlink
        stream: list[bytes] = []
        for _ in range(n):
            stream = list(self.fetch(b""))
        return stream

    @staticmethod
    def decode(stream: list[bytes], dim: int) -> Downlink:
        """What each worker then does with its answer, in parallel with the others."""
        return decode_downlink([pb.ModelUpdate.FromString(m) for m in stream], dim=dim)

    def raw_round_trip(self, total_bytes: int, n: int) -> None:
        """n streams of `total_bytes` in chunks as large as the model stream's, each received
        whole as `serve` receives its answers (a worker keeps its stream to decode it: holding
        40 MB of fresh messages costs the receiver page faults that dropping each chunk at
        once does not, measured ~25 % of a dense 1e7 broadcast)."""
        self.raw_sizes = [MAX_MESSAGE_BYTES - 64] * (total_bytes // (MAX_MESSAGE_BYTES - 64))
        self.raw_sizes.append(total_bytes - sum(self.raw_sizes))
        for _ in range(n):
            list(self.raw(b""))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)


# ---------------------------------------------------------------------------- workload


def run_config(dim: int, aggregator: str, args: argparse.Namespace) -> RunConfig:
    """The benchmark's run: n honest Byz-DM21 workers, Top-k, on a d-dimensional quadratic."""
    base, *pre = reversed(aggregator.split("+"))
    return RunConfig.from_dict(
        {
            "run": {"seed": 0, "rounds": 10_000, "device": args.device},
            "task": {"name": "quadratic", "params": {"dim": dim}},
            "cluster": {"workers": args.workers, "byzantine": args.f},
            "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
            "compressor": {"name": "topk", "ratio": args.density},
            "aggregator": {"name": base, "pre": list(reversed(pre))},
        }
    )


class Workers:
    """All n honest workers as one batched estimator (the simulator's layout): their messages
    as the uplink bytes each worker would send, and the commit after the server took them."""

    def __init__(self, config: RunConfig) -> None:
        task = build_run_task(config)
        ids = list(range(config.cluster.workers))
        self.config = config
        self.estimator: Estimator = build_run_estimator(
            config, task, build_run_compressor(config, task), ids
        )
        self.oracle: GradientOracle = task.oracle(ids, config.run.seed)
        self.topk = self.estimator.compressor
        # Round 0 uncompressed: g⁰ = u⁰ on both sides, so the states start dense.
        self.estimator.compressor = build_compressor("identity", task.dim)

    def messages(self, x: torch.Tensor, round: int) -> tuple[SparseBatch, list[bytes]]:
        batch = self.estimator.message(x, self.oracle, round)
        self.estimator.compressor = self.topk
        wire = [encode_row(row, self.config) for row in batch.rows()]
        return batch, wire

    def commit(self, batch: SparseBatch) -> None:
        self.estimator.commit(batch)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn's result, its wall time in ms), the GPU's queued work included (--device cuda)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, 1e3 * (time.perf_counter() - start)


@dataclass
class PathResult:
    """One path's per-round measurements."""

    sparse: bool
    engine: RoundEngine
    mirror: ModelMirror = field(default_factory=ModelMirror)
    parts: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PARTS})
    worker_apply: list[float] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    deltas: int = 0

    def median(self, part: str) -> float:
        return statistics.median(self.parts[part])

    @property
    def rounds_ms(self) -> list[float]:
        return [sum(vals) for vals in zip(*self.parts.values(), strict=True)]

    @property
    def round_ms(self) -> float:
        return statistics.median(self.rounds_ms)

    @property
    def over_raw(self) -> float:
        """The median over rounds of round / raw, each raw measured right after its round."""
        return statistics.median(r / raw for r, raw in zip(self.rounds_ms, self.raw, strict=True))

    def warm(self, batch: SparseBatch) -> None:
        """An untimed round without broadcast (the mirror catches up with a dense answer)."""
        self.engine.absorb(torch.arange(batch.num_rows), batch)
        self.engine.close_round()

    def server_round(self, wire: list[bytes], lb: Loopback, timed_round: bool) -> None:
        """Everything the server does with one round's uplink, then the broadcast."""
        engine, n, dim = self.engine, len(wire), int(self.engine.x.numel())
        vecs, t_decode = timed(lambda: [decode_sparse(pb.SparseUpdate.FromString(b)) for b in wire])
        batch = SparseBatch.stack(vecs)  # type: ignore[arg-type]
        _, t_apply = timed(lambda: engine.absorb(torch.arange(n), batch))
        _, t_close = timed(engine.close_round)
        probe = engine.x.clone()
        _, t_step = timed(lambda: apply_step(probe, engine.last_aggregate, engine.lr))
        delta = engine.last_delta
        if self.sparse and delta is not None and self.mirror.has_aggregate:
            downlink: Downlink = delta
        else:  # dense; ĝ rides along once deltas are being produced
            agg = engine.last_aggregate.clone() if self.sparse and delta is not None else None
            downlink = DenseModel(engine.round, engine.x.clone(), agg)
        stream, t_serve = timed(lambda: lb.serve(downlink, n))
        got, t_wdecode = timed(lambda: lb.decode(stream, dim))  # type: ignore[arg-type]
        size = sum(len(m) for m in stream)  # type: ignore[union-attr]
        _, t_worker = timed(lambda: self.mirror.apply(got))
        if not timed_round:
            return
        self.raw.append(timed(lambda: lb.raw_round_trip(size, n))[1])
        for part, t in zip(
            PARTS, (t_decode, t_apply, t_close - t_step, t_step, t_serve, t_wdecode), strict=True
        ):
            self.parts[part].append(t)
        self.worker_apply.append(t_worker)
        self.down_bytes.append(size)
        self.deltas += isinstance(got, AggregateDelta)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, across devices too (a CPU worker's mirror of a GPU server's x)."""
    return torch.equal(a.cpu().view(torch.int32), b.cpu().view(torch.int32))


@dataclass
class Shares:
    """Per timed round: |U|/d, |Δ|/d and the largest uplink message / (8·k)."""

    union: list[float] = field(default_factory=list)
    changed: list[float] = field(default_factory=list)
    uplink: list[float] = field(default_factory=list)


def run_pair(
    dim: int, aggregator: str, args: argparse.Namespace, rounds: int, lb: Loopback
) -> tuple[PathResult, PathResult, Shares]:
    """Both paths on the same messages, checked bit-identical after every round."""
    config = run_config(dim, aggregator, args)
    workers = Workers(config)
    paths = [
        PathResult(sparse, build_engine(config, build_run_task(config), sparse_downlink=sparse))
        for sparse in (False, True)
    ]
    shares = Shares()
    synced = 1 + args.warmup  # rounds before it: round 0 and the warm-up, server work only
    for r in range(synced + 1 + rounds):
        x = paths[0].engine.x
        batch, wire = workers.messages(x, r)
        timed_round = r > synced
        for path in paths:
            if r < synced:
                path.warm(batch)
            else:
                path.server_round(wire, lb, timed_round)
        workers.commit(batch)
        if not same_bits(paths[0].engine.x, paths[1].engine.x):
            raise AssertionError(f"round {r}: the two paths' x differ")
        if r < synced:
            continue
        mirror = paths[1].mirror
        assert mirror.x is not None and same_bits(mirror.x, paths[1].engine.x)
        if not timed_round:
            continue
        shares.uplink.append(max(len(b) for b in wire) / (8 * workers.topk.k))
        union = torch.unique(torch.cat([row.indices for row in batch.rows()]))
        shares.union.append(union.numel() / dim)
        delta = paths[1].engine.last_delta
        if delta is not None:
            shares.changed.append(delta.nnz / dim)
    return paths[0], paths[1], shares


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[4, 2], help="per size")
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--f", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.01, help="k / d")
    parser.add_argument("--aggregators", nargs="+", default=["mean", "cm", "nnm+cm"])
    parser.add_argument("--warmup", type=int, default=40, help="untimed rounds after round 0")
    parser.add_argument("--device", default="cpu", help="the server's run.device (workers: CPU)")
    args = parser.parse_args(argv)
    as_the_daemons_run(max(args.sizes))  # in-process, the server's heap and the workers' share it

    print("$ python " + shlex.join(["benchmarks/bench_round.py", *sys.argv[1:]]))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, n = {args.workers}, f = {args.f}, "
        f"Byz-DM21 + Top-k density {args.density} on quadratic, loopback gRPC, "
        f"server on {args.device}"
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
    print(f"\nd = {dim:,}  k = {k:,}")
    head = f"{'aggregator':>10} {'path':>7} {'round ms':>9} " + " ".join(f"{p:>9}" for p in PARTS)
    print(
        head + f" {'wkr apply':>9} {'down B/wkr':>11} {'deltas':>6} {'raw gRPC':>9} {'rnd/raw':>9}"
    )
    for aggregator in args.aggregators:
        dense, sparse, shares = run_pair(dim, aggregator, args, rounds, lb)
        for path in (dense, sparse):
            down = int(statistics.median(path.down_bytes))
            raw = statistics.median(path.raw)
            parts = " ".join(f"{path.median(p):9.1f}" for p in PARTS)
            print(
                f"{aggregator:>10} {'sparse' if path.sparse else 'dense':>7} "
                f"{path.round_ms:9.1f} {parts} {statistics.median(path.worker_apply):9.2f} "
                f"{down:11,} {path.deltas:>3}/{rounds:<2} {raw:9.1f} {path.over_raw:8.2f}x"
            )
        changed = f"{statistics.median(shares.changed):.3f}" if shares.changed else "- (dense)"
        print(
            f"{'':>10} dense/sparse round time = {dense.round_ms / sparse.round_ms:.2f}x, "
            f"|U|/d = {statistics.median(shares.union):.3f}, |Δ|/d = {changed}, "
            f"uplink bytes/update = {max(shares.uplink):.4f} x 8k, "
            "x bit-identical on both paths every round"
        )


if __name__ == "__main__":
    main()
