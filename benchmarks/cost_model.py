"""A cost model of the server's round: time and memory per process as a function of n, d, k, S
and the rule, built from per-operation unit costs measured on this machine (issue 12, item 5).

    python benchmarks/cost_model.py measure [--out docs/results/cost_units.json] [--quick]
    python benchmarks/cost_model.py predict --n 1000 --d 1e9 --density 0.01 --shards 64 \\
        --rules mean cm krum gm nnm+cm [--downlink sparse] [--units FILE]
    python benchmarks/cost_model.py check [--units FILE] [--live]

`measure` times each operation a round is made of with small, bounded runs (each a few seconds),
importing the code the benchmarks time rather than copying it (bench_round's `Loopback`,
bench_durability's coordinator run, the engine, the rules, the WAL), and writes the unit costs
with the machine they were measured on (nproc, CPU model, load average) to a JSON file.

`predict` is the model (`Model.server`, `Model.worker`): per round and per server shard

    round  = push overhead + decode + absorb + aggregate(rule, n, d/S) + compare (sparse downlink)
             + step + broadcast(fetches, bytes) + shard exchange (S > 1) + WAL append
    memory = n · (d/S) · 4 · (state tensors of the estimator's server rule)      the states
             + x, ĝ (persistent) + new ĝ, the change of ĝ, the encoded answer (per round)
             + aggregation temporaries (measured per rule at n = 20 and 100: (a + b·n) · (d/S) · 4
               bytes, n not extrapolated past 100, + 3 float64 n × n matrices for the Gram rules)
             + the round's uplink messages + a background checkpoint's snapshot (a copy of the
             states, x and ĝ) + the process's baseline (Python, torch, gRPC)

S > 1 models the sharded server (docs/sharding.md) across S machines: each shard owns d/S
coordinates of x and of every worker's state; coordinate-wise rules run locally per shard;
the distance rules (krum, multikrum, nnm∘…, gm, cclip) all-reduce a partial n × n float64 Gram,
and the model adds for gm and cclip the partial n-vector of norms per iteration of the issue's
design (an upper bound: the code runs their iterations on the summed Gram); workers split each
message by range and pull the model from every shard. Network constants (latency, bandwidth
between machines) are assumptions, given on the command line, not measurements.

`check` compares the model's predictions with the measurements recorded in docs/performance.md
and docs/durability.md (the table `RECORDED`, each row naming its section) and prints predicted,
measured and their ratio; `--live` re-measures two of them here (bench_round at a small d).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_UNITS = HERE.parent / "docs" / "results" / "cost_units.json"

#: The rules the unit table covers, as bench_round names them ("nnm+cm" is nnm∘cm).
RULES = ("mean", "cm", "cwtm", "krum", "multikrum", "gm", "cclip", "nnm+cm")
COORDINATEWISE = frozenset({"mean", "cm", "cwtm"})
#: Rules that need the n × n Gram of the rows (all-reduced between shards when S > 1).
GRAM_RULES = frozenset({"krum", "multikrum", "nnm+cm"})
#: Rules that exchange a partial n-vector of norms per iteration (the issue's design).
ITERATIVE_RULES = frozenset({"gm", "cclip"})
#: The n at which each rule's time per element is measured, and the elements n·d of each call.
NS = (10, 20, 50, 100, 300, 1000)
QUICK_NS = (10, 20, 100)
ELEMENTS = {10: 20_000_000, 20: 20_000_000, 50: 20_000_000, 100: 20_000_000}
ELEMENTS_LARGE_N = 10_000_000
#: Bytes of a SparseUpdate beyond its 8 bytes per entry (dim, nnz, dtype, compressor, tags).
MESSAGE_HEADER = 32


def byzantine(n: int) -> int:
    """f of the unit measurements: a fifth of the inputs (bench_round's 4 of 20)."""
    return max(1, n // 5)


# ============================================================================ the model


@dataclass
class Network:
    """Between machines (S > 1 and the workers' links): assumptions, not measurements."""

    latency_s: float = 100e-6
    bandwidth_Bps: float = 1.25e9  # 10 Gb/s

    def allreduce(self, nbytes: float, shards: int) -> float:
        """A ring all-reduce of `nbytes` among `shards` processes."""
        if shards <= 1:
            return 0.0
        steps = 2 * (shards - 1)
        return steps * self.latency_s + steps / shards * nbytes / self.bandwidth_Bps


@dataclass
class Workload:
    n: int
    d: int
    k: int
    rule: str
    shards: int = 1
    downlink: str = "sparse"  # or "dense"
    fetches: int | None = None  # model fetches per round (default n: every worker its own)
    states: int = 1  # (n, d) tensors of the estimator's server rule (Byz-DM21's "state": 1)
    wal: bool = True
    iterations: int = 10  # gm / cclip exchanges per round when sharded
    checkpoint_every: int = 50

    @property
    def d_shard(self) -> int:
        return math.ceil(self.d / self.shards)

    @property
    def k_shard(self) -> float:
        """Entries of one worker's message that fall in one shard (supports spread evenly)."""
        return self.k / self.shards

    @property
    def union_share(self) -> float:
        """|U| / d for independent uniform supports: 1 − (1 − k/d)ⁿ."""
        return 1.0 - (1.0 - min(1.0, self.k / self.d)) ** self.n

    @property
    def sparse_down(self) -> bool:
        """Does the answer go as the change of ĝ? Coordinate-wise rules change ĝ only on U (taken
        as |Δ| = |U|, an upper bound); the engine drops a delta larger than half of d."""
        return self.downlink == "sparse" and self.rule in COORDINATEWISE and self.union_share <= 0.5

    @property
    def up_bytes(self) -> float:
        """One worker's message to one shard: 4-byte index + 4-byte value per entry (a message
        with every entry omits its indices) and a small header."""
        per_entry = 4 if self.k >= self.d else 8
        return per_entry * self.k_shard + MESSAGE_HEADER

    @property
    def down_bytes(self) -> float:
        """One answer of one shard: the change of ĝ (8 B per changed entry) or x (4 B each)."""
        if self.sparse_down:
            return 8 * self.union_share * self.d_shard
        return 4 * self.d_shard


def _interpolate(table: dict[str, float], n: int) -> float:
    """A rule's time per element at n: linear in (log n, log t) between the measured n, the end
    segments' slopes beyond them."""
    points = sorted((int(k), v) for k, v in table.items())
    if len(points) == 1:
        return points[0][1]
    i = 0
    while i < len(points) - 2 and n > points[i + 1][0]:
        i += 1
    (n0, t0), (n1, t1) = points[i], points[i + 1]
    slope = math.log(t1 / t0) / math.log(n1 / n0)
    return t0 * math.exp(slope * math.log(n / n0))


class Model:
    """The formulas, over a unit-cost table (the JSON `measure` writes)."""

    def __init__(self, units: dict[str, Any], network: Network | None = None) -> None:
        self.u = units["units"]
        self.machine = units.get("machine", {})
        self.network = network or Network()

    @classmethod
    def load(cls, path: Path = DEFAULT_UNITS, network: Network | None = None) -> Model:
        return cls(json.loads(Path(path).read_text()), network)

    def aggregate_s(self, rule: str, n: int, d: int) -> float:
        """One full aggregation pass over (n, d) float32 candidates."""
        return n * d * _interpolate(self.u["rule_s_per_element"][rule], n)

    def server(self, w: Workload) -> dict[str, float]:
        """Seconds of each part of one round on one shard (CPU parts as measured here), and
        'round'. NIC time is set against the transfers it overlaps (uplink with decode,
        downlink with broadcast): each of those parts is the larger of the two."""
        u, net, n, ds = self.u, self.network, w.n, w.d_shard
        fetches = n if w.fetches is None else w.fetches
        up_total = n * w.up_bytes
        full = "full_" if w.k >= w.d else ""  # whole rows: values only, a contiguous scatter
        down_per_byte = (
            u["serve_delta_s_per_byte"] if w.sparse_down else u["serve_dense_s_per_byte"]
        )
        parts = {
            "push": n * u["push_s"],
            "decode": n * u["decode_message_s"] + up_total * u[f"decode_{full}s_per_byte"],
            "absorb": n * w.k_shard * u[f"absorb_{full}s_per_nnz"],
            "aggregate": self.aggregate_s(w.rule, n, ds),
            "compare": ds * u["compare_s_per_coord"] if w.downlink == "sparse" else 0.0,
            "step": ds * u["step_s_per_coord"],
            "broadcast": fetches * (u["serve_call_s"] + w.down_bytes * down_per_byte),
            "exchange": self.exchange_s(w),
            "wal": up_total * u["wal_s_per_byte"] if w.wal else 0.0,
        }
        if w.shards > 1:  # workers and shards on separate machines: the NIC bounds the transfers
            parts["decode"] = max(parts["decode"], up_total / net.bandwidth_Bps)
            parts["broadcast"] = max(parts["broadcast"], fetches * w.down_bytes / net.bandwidth_Bps)
        parts["round"] = sum(parts.values())
        return parts

    def client_decode_s(self, w: Workload) -> float:
        """One worker's parse and decode of one shard's answer (done by every worker)."""
        name = "delta" if w.sparse_down else "dense"
        return w.down_bytes * self.u[f"decode_{name}_s_per_byte"]

    def bench_round_s(self, w: Workload, client_decodes: int = 0) -> float:
        """The parts bench_round times (no push overhead, no WAL, one process), with
        `client_decodes` of the answer (the version recorded in docs/performance.md decoded
        every fetch in the broadcast; today's times one worker's decode apart)."""
        p = self.server(w)
        parts = ("decode", "absorb", "aggregate", "compare", "step", "broadcast")
        return sum(p[k] for k in parts) + client_decodes * self.client_decode_s(w)

    def exchange_s(self, w: Workload) -> float:
        """What shards exchange per round: nothing (coordinate-wise rules); the partial n × n
        float64 Gram (every distance rule: krum, multikrum, nnm∘…, and gm and cclip, whose
        iterations run on the Gram in this code, `common/aggregators/collective.py`); for gm and
        cclip also a partial n-vector of norms per iteration, as the issue's design has it."""
        if w.shards <= 1 or w.rule in COORDINATEWISE:
            return 0.0
        gram = self.network.allreduce(8 * (w.n + 1) ** 2, w.shards)
        if w.rule in ITERATIVE_RULES:
            return gram + w.iterations * self.network.allreduce(8 * w.n, w.shards)
        return gram

    def exchange_bytes(self, w: Workload) -> float:
        """Bytes one shard sends to the other shards per round (ring all-reduce: 2(S−1)/S · B)."""
        if w.shards <= 1 or w.rule in COORDINATEWISE:
            return 0.0
        nbytes = 8 * (w.n + 1) ** 2 + 8 * w.n * w.iterations * (w.rule in ITERATIVE_RULES)
        return 2 * (w.shards - 1) / w.shards * nbytes

    def engine_bytes(self, n: int, d: int, states: int = 1) -> int:
        """The tensors a RoundEngine holds between rounds: the states, x and ĝ."""
        return 4 * (states * n * d + 2 * d)

    def memory(self, w: Workload) -> dict[str, float]:
        """Bytes of one server shard process at its peak (a round while a checkpoint is being
        written), by part."""
        u, n, ds = self.u, w.n, w.d_shard
        a, b = u["rule_temp_coefficients"][w.rule]
        gram = 3 * 8 * n * n if w.rule not in COORDINATEWISE else 0
        engine = self.engine_bytes(n, ds, w.states)
        parts = {
            "states": 4.0 * w.states * n * ds,
            "x, ĝ": 8.0 * ds,
            "round vectors": 4.0 * ds
            + 8 * w.union_share * ds * (w.downlink == "sparse")
            + 8.0 * ds,  # new ĝ, the change of ĝ (≤ d/2 entries), an answer with x and ĝ
            "aggregation temporaries": max(0.0, a + b * min(n, 100)) * 4 * ds + gram,
            "uplink messages": 2.0 * n * w.up_bytes,  # as received (WAL queue) and decoded
            "checkpoint snapshot": float(engine),
            "baseline": float(u["server_baseline_bytes"]),
        }
        parts["total"] = sum(parts.values())
        return parts

    def shards_for(self, w: Workload, machine_bytes: float, headroom: float = 0.8) -> int:
        """The least S whose shard's peak memory fits `headroom` of a machine."""
        shards = 1
        while True:
            trial = Workload(**{**w.__dict__, "shards": shards})
            if self.memory(trial)["total"] <= headroom * machine_bytes:
                return shards
            shards = shards * 2 if shards < 8 else shards + max(1, shards // 8)
            if shards > 1 << 20:
                raise ValueError("no shard count fits")

    def worker(self, w: Workload) -> dict[str, float]:
        """One honest worker (Byz-DM21, Top-k, the quadratic task) per round."""
        u = self.u
        down = w.down_bytes * w.shards
        return {
            "compute_s": w.d * u["worker_s_per_coord"],
            "decode_s": w.shards * self.client_decode_s(w),
            "memory_bytes": u["worker_baseline_bytes"] + w.d * u["worker_bytes_per_coord"],
            "up_bytes": w.up_bytes * w.shards,
            "down_bytes": down,
            "network_s": (w.up_bytes * w.shards + down) / self.network.bandwidth_Bps,
        }


# ============================================================================ measure


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "loadavg": os.getloadavg(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _median_s(fn: Any, repeat: int) -> float:
    from timing import median_ms

    return median_ms(fn, repeat) / 1e3


def _rule_fn(rule: str, n: int) -> Any:
    from byzps.common.aggregators import build_aggregator

    base, *pre = reversed(rule.split("+"))
    return build_aggregator(base, byzantine(n), pre=list(reversed(pre)))


def measure_rules(ns: tuple[int, ...], log: Any) -> dict[str, dict[str, float]]:
    """Seconds per element n·d of each rule at each n, on random float32 (n, d)."""
    import torch

    table: dict[str, dict[str, float]] = {rule: {} for rule in RULES}
    for n in ns:
        elements = ELEMENTS.get(n, ELEMENTS_LARGE_N)
        d = elements // n
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
        repeat = 3 if n <= 100 else 1
        for rule in RULES:
            fn = _rule_fn(rule, n)
            t = _median_s(lambda fn=fn, x=x: fn(x), repeat)
            table[rule][str(n)] = t / (n * d)
            log(
                f"  {rule:>9} n = {n:>4}, d = {d:>9,}: {1e3 * t:9.1f} ms  "
                f"{1e9 * t / (n * d):7.3f} ns/element"
            )
        del x
    return table


def measure_read(log: Any) -> dict[str, float]:
    import torch

    x = torch.randn(20, 1_000_000)
    t_sum = _median_s(lambda: x.sum(), 5)
    nbytes = x.numel() * 4
    log(
        f"  read once (x.sum()) at (20, 1e6): {1e3 * t_sum:.2f} ms, {nbytes / t_sum / 1e9:.1f} GB/s"
    )
    return {"read_once_Bps": nbytes / t_sum}


def measure_codec(log: Any) -> dict[str, float]:
    """Decode (FromString + decode_sparse) per wire byte, absorb per entry, step and the
    sparse downlink's compare per coordinate."""
    import numpy as np
    import torch

    from byzps.common.codec import decode_sparse, encode_sparse
    from byzps.common.downlink import apply_step
    from byzps.common.server_rules import build_server_rule
    from byzps.common.sparse import SparseBatch, SparseVector
    from byzps.proto.v1 import parameter_server_pb2 as pb
    from byzps.server.engine import RoundEngine

    gen = np.random.default_rng(0)
    d, k, n = 2_000_000, 20_000, 20
    rows = [np.sort(gen.choice(d, k, replace=False)).astype(np.int32) for _ in range(n)]
    vecs = [SparseVector(torch.from_numpy(r), torch.randn(k), d) for r in rows]
    wire = [encode_sparse(v, compressor="topk").SerializeToString() for v in vecs]
    nbytes = sum(len(b) for b in wire)
    tiny_vec = SparseVector(torch.arange(10, dtype=torch.int32), torch.randn(10), d)
    tiny = [encode_sparse(tiny_vec, compressor="topk").SerializeToString()] * 1000
    t_tiny = _median_s(lambda: [decode_sparse(pb.SparseUpdate.FromString(b)) for b in tiny], 3)
    t_msg = t_tiny / len(tiny)
    t_decode = _median_s(lambda: [decode_sparse(pb.SparseUpdate.FromString(b)) for b in wire], 5)
    log(
        f"  decode: {n} messages of k = {k:,} ({nbytes:,} B): {1e3 * t_decode:.2f} ms; "
        f"a message of 10 entries {1e6 * t_msg:.0f} µs (taken off the per-byte cost)"
    )

    rule = build_server_rule("state", n, d)
    rule.g.normal_()  # dense states, as after a long run
    batch = SparseBatch.stack(vecs)
    t_absorb = _median_s(lambda: rule.absorb(torch.arange(n), batch, 0), 5)
    log(f"  absorb: {n} × {k:,} entries into a (20, 2e6) state: {1e3 * t_absorb:.2f} ms")

    # Dense messages (the identity compressor): values only on the wire, whole rows absorbed.
    d1 = 1_000_000
    full = [
        SparseVector(torch.arange(d1, dtype=torch.int32), torch.randn(d1), d1) for _ in range(n)
    ]
    dense_wire = [encode_sparse(v, compressor="identity").SerializeToString() for v in full]
    dense_bytes = sum(len(b) for b in dense_wire)
    t_dense_decode = _median_s(
        lambda: [decode_sparse(pb.SparseUpdate.FromString(b)) for b in dense_wire], 3
    )
    dense_rule = build_server_rule("state", n, d1)
    dense_batch = SparseBatch.stack(full)
    t_dense_absorb = _median_s(lambda: dense_rule.absorb(torch.arange(n), dense_batch, 0), 3)
    log(
        f"  dense messages, {n} × d = 1e6: decode {1e3 * t_dense_decode:.2f} ms, absorb "
        f"{1e3 * t_dense_absorb:.2f} ms"
    )

    d = 10_000_000
    x, agg = torch.randn(d), torch.randn(d)
    t_step = _median_s(lambda: apply_step(x, agg, 0.1), 5)
    previous = agg.clone()
    changed = torch.from_numpy(np.sort(gen.choice(d, d // 7, replace=False)))
    agg[changed] += 1.0
    fake = SimpleNamespace(last_aggregate=previous, delta_limit=0.5)
    t_compare = _median_s(lambda: RoundEngine._changes(fake, agg), 5)  # type: ignore[arg-type]
    log(
        f"  step at d = 1e7: {1e3 * t_step:.2f} ms; compare ĝ (14% changed): "
        f"{1e3 * t_compare:.2f} ms"
    )
    return {
        "decode_message_s": t_msg,
        "decode_s_per_byte": max(0.0, t_decode - n * t_msg) / nbytes,
        "absorb_s_per_nnz": t_absorb / (n * k),
        "decode_full_s_per_byte": t_dense_decode / dense_bytes,
        "absorb_full_s_per_nnz": t_dense_absorb / (n * d1),
        "step_s_per_coord": t_step / d,
        "compare_s_per_coord": t_compare / d,
    }


def measure_grpc(log: Any) -> dict[str, float]:
    """bench_round's loopback server: serving a model fetch (answered as the servicer answers,
    received as bytes) per byte, dense and as a change of ĝ; one worker's decode of it per byte;
    a raw bytes stream per byte and per call."""
    import torch
    from bench_round import Loopback

    from byzps.common.downlink import AggregateDelta, DenseModel

    lb = Loopback()
    units = {}
    try:
        d, fetches = 2_000_000, 5
        entries = 250_000
        indices = torch.arange(0, d, d // entries, dtype=torch.int32)[:entries]
        answers = {
            "dense": DenseModel(1, torch.randn(d)),
            "delta": AggregateDelta(2, d, indices, torch.randn(entries), 0.1),
        }
        # The fixed cost of a fetch: an answer of one entry, served 100 times.
        tiny = AggregateDelta(2, d, indices[:1], torch.randn(1), 0.1)
        calls = 100
        t_tiny = _median_s(lambda: lb.serve(tiny, calls), 3)
        units["serve_call_s"] = t_tiny / calls
        for name, answer in answers.items():
            stream = lb.serve(answer, 1)
            size = sum(len(m) for m in stream)
            t_serve = _median_s(lambda answer=answer: lb.serve(answer, fetches), 3)
            t_decode = _median_s(lambda stream=stream: lb.decode(stream, d), 3)
            net = max(0.0, t_serve - fetches * units["serve_call_s"])
            units[f"serve_{name}_s_per_byte"] = net / (fetches * size)
            units[f"decode_{name}_s_per_byte"] = t_decode / size
            log(
                f"  {name} answer of {size:,} B: served {1e3 * t_serve / fetches:.2f} ms a fetch, "
                f"decoded by a worker {1e3 * t_decode:.2f} ms"
            )
            if name == "dense":
                t_raw = _median_s(lambda size=size: lb.raw_round_trip(size, fetches), 3)
                units["raw_grpc_s_per_byte"] = t_raw / (fetches * size)
        calls = 100
        t_call = _median_s(lambda: lb.raw_round_trip(64, calls), 3)
        units["grpc_call_s"] = t_call / calls
    finally:
        lb.close()
    log(
        f"  raw stream {1e9 * units['raw_grpc_s_per_byte']:.3f} ns/B; "
        f"an empty call {1e6 * units['grpc_call_s']:.0f} µs; a fetch of one entry "
        f"{1e6 * units['serve_call_s']:.0f} µs (taken off the per-byte costs above)"
    )
    return units


def measure_wal(log: Any, directory: Path) -> dict[str, float]:
    """WriteAheadLog: a group of 20 records of 1 MB written with one writev, then fsynced."""
    from byzps.server.wal import UpdateRecord, WriteAheadLog

    wal = WriteAheadLog.create(directory / "cost.wal", 0, "0" * 64)
    payload = os.urandom(1 << 20)
    group = [UpdateRecord(row, 1, 0, payload) for row in range(20)]

    def write() -> None:
        wal.write(group)
        wal.sync()

    try:
        t = _median_s(write, 5)
    finally:
        wal.close()
    nbytes = len(group) * len(payload)
    log(f"  WAL group of 20 × 1 MiB + fsync: {1e3 * t:.1f} ms ({nbytes / t / 1e9:.2f} GB/s)")
    return {"wal_s_per_byte": t / nbytes}


def measure_push(log: Any, directory: Path) -> dict[str, float]:
    """What a push costs the server beyond its bytes: bench_durability's live coordinator (door,
    apply, group commit under `--wal-fsync group`, the round's close) at a tiny d, per push,
    plus one empty gRPC call."""
    import bench_durability

    n = 50
    args = SimpleNamespace(
        dim=1000, workers=n, rounds=8, checkpoint_every=1000, eval_every=1000, dir=directory
    )
    times = bench_durability.run(args, "group")[2:]  # type: ignore[arg-type]
    per_push = statistics.median(times) / n
    log(
        f"  coordinator push at d = 1e3, n = {n} (door, apply, group commit): "
        f"{1e6 * per_push:.0f} µs"
    )
    return {"coordinator_push_s": per_push}


_PROBE = """
import json, sys, torch
sys.path.insert(0, {here!r})
import cost_model as cm
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def peak(fn):
    open('/proc/self/clear_refs', 'w').write('5')
    before = status('VmRSS')
    fn()
    return status('VmHWM') - before
out = {{}}
what = {what!r}
if what == 'worker':
    from bench_round import Workers, run_config
    out['baseline'] = status('VmRSS')
    d = 2_000_000
    args = cm.SimpleNamespace(device='cpu', workers=1, f=0, density=0.01)
    state = {{}}
    def build():
        state['w'] = Workers(run_config(d, 'mean', args))
        x = torch.zeros(d)
        for r in range(3):
            batch, _ = state['w'].messages(x, r)
            state['w'].commit(batch)
    out['bytes'] = peak(build)
    w = state['w']
    x = torch.zeros(d)
    import time
    times = []
    for r in range(3, 8):
        t = time.perf_counter()
        batch, _ = w.messages(x, r)
        w.commit(batch)
        times.append(time.perf_counter() - t)
    out['seconds'] = sorted(times)[len(times) // 2]
    out['d'] = d
else:
    for n in (20, 100):
        cm._rule_fn(what, n)(torch.randn(n, 2000))  # compile outside the measurement
        fn = cm._rule_fn(what, n)  # a fresh one: cclip keeps its centre between calls
        d = 40_000_000 // n
        x = torch.randn(n, d)
        out[str(n)] = [peak(lambda: fn(x)), d]
        del x
print(json.dumps(out))
"""


def _probe(what: str) -> dict[str, Any]:
    code = _PROBE.format(here=str(HERE), what=what)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=HERE
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(log: Any) -> dict[str, Any]:
    """Peak RSS over the RSS before (VmHWM after resetting it), each rule in a fresh process at
    n = 20 and 100 (160 MB of input); fitted as (a + b·n) · d · 4 bytes."""
    coefficients = {}
    for rule in RULES:
        got = _probe(rule)
        (p20, d20), (p100, d100) = got["20"], got["100"]
        u20, u100 = p20 / (4 * d20), p100 / (4 * d100)
        b = (u100 - u20) / 80
        coefficients[rule] = [u20 - 20 * b, b]
        log(
            f"  {rule:>9} temporaries: {p20 / 1e6:7.1f} MB at (20, {d20:,}), "
            f"{p100 / 1e6:7.1f} MB at (100, {d100:,})"
        )
    worker = _probe("worker")
    log(
        f"  one worker at d = {worker['d']:,}: {worker['bytes'] / 1e6:.0f} MB over its "
        f"{worker['baseline'] / 1e6:.0f} MB baseline, {1e3 * worker['seconds']:.1f} ms a round"
    )
    return {
        "rule_temp_coefficients": coefficients,
        "worker_bytes_per_coord": worker["bytes"] / worker["d"],
        "worker_baseline_bytes": worker["baseline"],
        "worker_s_per_coord": worker["seconds"] / worker["d"],
        "server_baseline_bytes": _server_baseline(),
    }


def _server_baseline() -> int:
    """RSS of a process that has imported the server (torch, numba, grpc): the floor."""
    code = (
        "import byzps.server.service, byzps.server.engine, byzps.common.aggregators;"
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status')"
        " if l.startswith('VmRSS')][0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def derived(table: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What the rule table says about two inner operations (for reading, not used by the model):
    the Gram's multiply-adds per second at the largest n (krum's time over the mean's, n²d/2
    multiply-adds) and nnm's mix per element (nnm∘cm less krum's Gram pass and cm's band)."""
    n = max(int(key) for key in table["krum"])
    extra = table["krum"][str(n)] - table["mean"][str(n)]
    mix = {key: table["nnm+cm"][key] - table["krum"][key] - table["cm"][key] for key in table["cm"]}
    return {"gram_n": n, "gram_fma_per_s": n / (2 * extra), "nnm_mix_s_per_element": mix}


def measure(args: argparse.Namespace) -> None:
    from timing import as_the_daemons_run

    as_the_daemons_run()
    import torch

    command = "python " + shlex.join(["benchmarks/cost_model.py", *sys.argv[1:]])
    print("$ " + command)
    started = time.time()
    info = machine()
    print(
        f"{info['nproc']} CPUs ({info['cpu']}), load average {info['loadavg']}, "
        f"torch {info['torch']} with {info['torch_threads']} threads"
    )

    def log(line: str) -> None:
        print(line, flush=True)

    units: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="byzps-cost-") as tmp:
        directory = Path(tmp)
        print("read, decode, absorb, step, compare")
        units.update(measure_read(log))
        units.update(measure_codec(log))
        print("gRPC loopback (bench_round.Loopback)")
        units.update(measure_grpc(log))
        print("write-ahead log and the push path (bench_durability)")
        units.update(measure_wal(log, directory))
        units.update(measure_push(log, directory))
    units["push_s"] = units["coordinator_push_s"] + units["grpc_call_s"]
    print("aggregators: seconds per element n·d")
    units["rule_s_per_element"] = measure_rules(QUICK_NS if args.quick else NS, log)
    units.update(derived(units["rule_s_per_element"]))
    log(
        f"  derived: the float64 Gram at {units['gram_fma_per_s'] / 1e9:.2f} GFMA/s (krum − mean "
        f"at n = {units['gram_n']}); nnm's mix (nnm∘cm − krum − cm), ns per element: "
        + ", ".join(f"n = {n}: {1e9 * t:.1f}" for n, t in units["nnm_mix_s_per_element"].items())
    )
    print("memory (fresh processes)")
    units.update(measure_memory(log))
    del torch
    result = {
        "command": command,
        "machine": info,
        "load_after": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
        "units": units,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s; load average after {result['load_after']}")


# ============================================================================ predict


def _fmt_s(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{1e3 * t:.1f} ms"
    return f"{1e6 * t:.0f} µs"


def _fmt_b(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def predict(args: argparse.Namespace) -> None:
    model = Model.load(args.units, Network(args.latency, args.bandwidth))
    print("$ python " + shlex.join(["benchmarks/cost_model.py", *sys.argv[1:]]))
    mach = model.machine
    print(
        f"unit costs: {args.units} ({mach.get('nproc')} CPUs, {mach.get('cpu')}, load "
        f"{mach.get('loadavg')}); network {args.latency * 1e6:.0f} µs, "
        f"{args.bandwidth / 1e9:.3g} GB/s (assumed)"
    )
    k = int(args.k) if args.k else max(1, round(args.density * args.d))
    for shards in args.shards:
        print(
            f"\nn = {args.n:,}, d = {args.d:.3g}, k = {k:,}, S = {shards}"
            + ("  (S > 1: a model of the design, not a measurement)" if shards > 1 else "")
        )
        parts = (
            "push",
            "decode",
            "absorb",
            "aggregate",
            "compare",
            "step",
            "broadcast",
            "exchange",
            "wal",
            "round",
        )
        print(
            f"{'rule':>9} "
            + " ".join(f"{p:>10}" for p in parts)
            + f" {'down B/wkr':>10} {'xchg B':>9} {'memory':>9}"
        )
        for rule in args.rules:
            w = Workload(
                args.n,
                int(args.d),
                k,
                rule,
                shards,
                args.downlink,
                checkpoint_every=args.checkpoint_every,
            )
            t = model.server(w)
            m = model.memory(w)
            print(
                f"{rule:>9} "
                + " ".join(f"{_fmt_s(t[p]):>10}" for p in parts)
                + f" {_fmt_b(w.down_bytes):>10} {_fmt_b(model.exchange_bytes(w)):>9}"
                f" {_fmt_b(m['total']):>9}"
            )
        w = Workload(args.n, int(args.d), k, args.rules[0], shards, args.downlink)
        m = model.memory(w)
        print(
            "  memory of one shard ("
            + args.rules[0]
            + "): "
            + ", ".join(f"{key} {_fmt_b(v)}" for key, v in m.items())
        )
        wk = model.worker(w)
        print(
            f"  one worker: compute {_fmt_s(wk['compute_s'])} (quadratic task), memory "
            f"{_fmt_b(wk['memory_bytes'])}, up {_fmt_b(wk['up_bytes'])}, down "
            f"{_fmt_b(wk['down_bytes'])} per round"
        )
    if args.machine_memory:
        for rule in args.rules:
            w = Workload(args.n, int(args.d), k, rule, 1, args.downlink)
            s = model.shards_for(w, args.machine_memory)
            print(
                f"  {rule}: S ≥ {s} shards for {_fmt_b(args.machine_memory)} machines (peak ≤ 80 %)"
            )


# ============================================================================ check


@dataclass(frozen=True)
class Recorded:
    """One measurement recorded in the docs, the workload that produced it and its source."""

    label: str
    seconds: float
    source: str
    kind: str  # "bench_round", "aggregate", "ratio" (rule / mean), "durability", "cluster"
    workload: dict[str, Any] = field(default_factory=dict)


PERF = "docs/performance.md"
PARTS_SEC = f"{PERF} § The server's round, parts timed"
AGG_SEC = f"{PERF} § The catalogue's aggregators"
DIST_SEC = f"{PERF} § Distance rules and nnm on the CPU"
CLUSTER_SEC = f"{PERF} § Whole rounds with 20 worker processes"
MANY_SEC = f"{PERF} § 1,000 workers on one server"
DUR_SEC = "docs/durability.md § Cost"


def _br(d: int, rule: str, downlink: str, density: float = 0.01) -> dict[str, Any]:
    return {"n": 20, "d": d, "k": round(density * d), "rule": rule, "downlink": downlink}


RECORDED: tuple[Recorded, ...] = (
    *(
        Recorded(
            f"bench_round d={d:.0e} {rule} {path}",
            ms / 1e3,
            PARTS_SEC,
            "bench_round",
            _br(d, rule, path),
        )
        for d, rule, path, ms in (
            (10**6, "mean", "dense", 96.5),
            (10**6, "mean", "sparse", 43.3),
            (10**6, "cm", "dense", 99.9),
            (10**6, "cm", "sparse", 45.0),
            (10**6, "nnm+cm", "dense", 126.5),
            (10**6, "nnm+cm", "sparse", 128.8),
            (10**7, "mean", "dense", 785.8),
            (10**7, "mean", "sparse", 350.6),
            (10**7, "cm", "dense", 722.1),
            (10**7, "cm", "sparse", 322.4),
            (10**7, "nnm+cm", "dense", 864.6),
            (10**7, "nnm+cm", "sparse", 912.4),
        )
    ),
    *(
        Recorded(
            f"bench_round d=1e6 Top-0.1% {rule} {path}",
            ms / 1e3,
            PARTS_SEC,
            "bench_round",
            _br(10**6, rule, path, 0.001),
        )
        for rule, path, ms in (
            ("mean", "dense", 101.0),
            ("mean", "sparse", 21.7),
            ("cm", "dense", 110.0),
            ("cm", "sparse", 25.6),
        )
    ),
    *(
        Recorded(
            f"d=1e7 cm {path}: {part}",
            ms / 1e3,
            PARTS_SEC,
            f"part:{part}",
            _br(10**7, "cm", path),
        )
        for path, part, ms in (
            ("dense", "decode", 2.4),
            ("dense", "absorb", 29.7),
            ("dense", "aggregate", 66.8),
            ("dense", "step", 2.2),
            ("dense", "broadcast", 621.0),
            ("sparse", "decode", 17.4),
            ("sparse", "absorb", 35.5),
            ("sparse", "aggregate+compare", 77.0),
            ("sparse", "step", 2.4),
            ("sparse", "broadcast", 190.2),
        )
    ),
    Recorded(
        "cm (20, 1e6) full pass",
        5.0e-3,
        f"{PERF} § What the server does differently",
        "aggregate",
        {"n": 20, "d": 10**6, "rule": "cm"},
    ),
    Recorded(
        "mean (20, 1e6), run B (quiet)",
        6.5e-3,
        AGG_SEC,
        "aggregate",
        {"n": 20, "d": 10**6, "rule": "mean"},
    ),
    Recorded(
        "cwtm (20, 1e6), run A (load 5–7)",
        2.3 * 23e-3,
        AGG_SEC,
        "aggregate",
        {"n": 20, "d": 10**6, "rule": "cwtm"},
    ),
    *(
        Recorded(
            f"{rule} / mean at (20, 1e6)",
            ratio,
            DIST_SEC,
            "ratio",
            {"n": 20, "d": 10**6, "rule": rule},
        )
        for rule, ratio in (
            ("krum", (2.35 + 2.90) / 2),
            ("multikrum", (2.66 + 2.69) / 2),
            ("gm", (2.80 + 3.10) / 2),
            ("cclip", (2.71 + 3.53) / 2),
            ("nnm+cm", (6.9 + 8.2) / 2),
        )
    ),
    Recorded(
        "nnm∘cm (100, 1e7), load 7–10",
        23.4,
        DIST_SEC,
        "aggregate",
        {"n": 100, "d": 10**7, "rule": "nnm+cm"},
    ),
    Recorded(
        "nnm∘cm / mean at (100, 1e7)",
        21.6,
        DIST_SEC,
        "ratio",
        {"n": 100, "d": 10**7, "rule": "nnm+cm"},
    ),
    Recorded(
        "durability floor: 20 dense pushes d=1e6, mean, no storage",
        0.352,
        DUR_SEC,
        "durability",
        {"n": 20, "d": 10**6, "k": 10**6, "rule": "mean", "wal": False},
    ),
    Recorded(
        "the same, --wal-fsync group",
        0.397,
        DUR_SEC,
        "durability",
        {"n": 20, "d": 10**6, "k": 10**6, "rule": "mean", "wal": True},
    ),
    *(
        Recorded(
            f"cluster d=1e6 {rule} {path}, no noise",
            ms / 1e3,
            CLUSTER_SEC,
            "cluster",
            {**_br(10**6, rule, path), "worker_ms": 86.0},
        )
        for rule, path, ms in (
            ("mean", "dense", 217.8),
            ("mean", "sparse", 146.0),
            ("cm", "dense", 219.8),
            ("cm", "sparse", 142.1),
        )
    ),
    *(
        Recorded(
            f"many workers n={n} {rule}{note}",
            1 / rps,
            MANY_SEC,
            "many",
            {"n": n, "d": 10**4, "k": 100, "rule": rule, "fetches": fetches},
        )
        for n, rule, rps, fetches, note in (
            (200, "cm", 1.94, 2, ""),
            (500, "cm", 0.80, 2, ""),
            (1000, "cm", 0.36, 2, ""),
            (200, "nnm+cm", 1.68, 2, ""),
            (500, "nnm+cm", 0.55, 2, ""),
            (1000, "nnm+cm", 0.20, 2, ""),
            (1000, "cm", 0.21, 1000, ", --fetch-each"),
        )
    ),
)


def _workload(spec: dict[str, Any]) -> Workload:
    keys = ("n", "d", "k", "rule", "downlink", "fetches", "wal")
    args = {key: spec[key] for key in keys if key in spec}
    args.setdefault("k", max(1, round(0.01 * spec["d"])))
    return Workload(**args)


def predicted(model: Model, rec: Recorded) -> float:
    """The model's value for one recorded measurement (no constant is fitted to any of them)."""
    w = _workload(rec.workload)
    if rec.kind == "bench_round":  # recorded when its broadcast decoded every fetch
        return model.bench_round_s(w, client_decodes=w.n)
    if rec.kind.startswith("part:"):
        part = rec.kind.split(":", 1)[1]
        p = model.server(w)
        p["broadcast"] += w.n * model.client_decode_s(w)
        return sum(p[name] for name in part.split("+"))
    if rec.kind == "aggregate":
        return model.aggregate_s(w.rule, w.n, w.d)
    if rec.kind == "ratio":
        return model.aggregate_s(w.rule, w.n, w.d) / model.aggregate_s("mean", w.n, w.d)
    if rec.kind == "durability":  # a coordinator fed in-process: no gRPC call, no broadcast
        p = model.server(w)
        call = model.u["grpc_call_s"] * w.n
        return p["round"] - p["broadcast"] - p["compare"] - call
    if rec.kind == "cluster":  # 20 worker processes share the machine's cores with the server
        cores = model.machine.get("nproc") or 1
        workers = w.n * model.worker(w)["compute_s"] / cores
        return model.server(w)["round"] + workers
    if rec.kind == "many":  # fleets on the other core; the server one core of Python
        return model.server(w)["round"]
    raise ValueError(rec.kind)


def check(args: argparse.Namespace) -> None:
    if args.live:  # bench_round runs so, and so were the unit costs measured
        from timing import as_the_daemons_run

        as_the_daemons_run()
    model = Model.load(args.units)
    print("$ python " + shlex.join(["benchmarks/cost_model.py", *sys.argv[1:]]))
    mach = model.machine
    print(f"unit costs from {args.units}: {mach.get('nproc')} CPUs, load {mach.get('loadavg')}")
    print(f"{'recorded measurement':<58} {'predicted':>10} {'measured':>10} {'ratio':>6}  source")
    ratios = []
    for rec in RECORDED:
        p = predicted(model, rec)
        ratio = p / rec.seconds
        ratios.append(ratio)
        fmt = (lambda v: f"{v:.2f}x") if rec.kind == "ratio" else _fmt_s
        print(f"{rec.label:<58} {fmt(p):>10} {fmt(rec.seconds):>10} {ratio:6.2f}  {rec.source}")
    logs = [math.log(r) for r in ratios]
    print(
        f"{len(ratios)} checks: predicted / measured, geometric mean "
        f"{math.exp(statistics.fmean(logs)):.2f}, range {min(ratios):.2f}–{max(ratios):.2f}"
    )
    if args.live:
        live(model, args)


def live(model: Model, args: argparse.Namespace) -> None:
    """bench_round's run_pair re-run now at a small d; its medians against the model."""
    from bench_round import Loopback, run_pair

    print(f"\nlive: bench_round at d = {args.live_dim:,}, n = 20, Top-1%, load {os.getloadavg()}")
    ns = SimpleNamespace(device="cpu", workers=20, f=4, density=0.01, warmup=30)
    lb = Loopback()
    try:
        for rule in ("mean", "cm", "nnm+cm"):
            dense, sparse, _ = run_pair(args.live_dim, rule, ns, 3, lb)
            for path in (dense, sparse):
                name = "sparse" if path.sparse else "dense"
                w = Workload(20, args.live_dim, round(0.01 * args.live_dim), rule, 1, name)
                p = model.server(w)
                p["wkr decode"] = model.client_decode_s(w)
                pred = model.bench_round_s(w, client_decodes=1)
                measured = path.round_ms / 1e3  # bench_round's round: its six parts
                print(
                    f"  {rule:>7} {name:>6}: round predicted {_fmt_s(pred)}, measured "
                    f"{_fmt_s(measured)}, ratio {pred / measured:.2f}"
                )
                for part, key in (
                    ("decode", "decode"),
                    ("apply", "absorb"),
                    ("aggregate", "aggregate"),
                    ("step", "step"),
                    ("serve", "broadcast"),
                    ("wkr decode", "wkr decode"),
                ):
                    got = path.median(part) / 1e3
                    if part == "aggregate" and w.downlink == "sparse":
                        pred_part = p["aggregate"] + p["compare"]
                    else:
                        pred_part = p[key]
                    print(
                        f"          {part:>10}: predicted {_fmt_s(pred_part):>9}, measured "
                        f"{_fmt_s(got):>9}, ratio {pred_part / got:.2f}"
                    )
    finally:
        lb.close()


# ============================================================================ main


def _number(text: str) -> float:
    return float(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure", help="measure the unit costs on this machine")
    m.add_argument("--out", type=Path, default=DEFAULT_UNITS)
    m.add_argument("--quick", action="store_true", help=f"rules at n in {QUICK_NS} only")
    p = sub.add_parser("predict", help="print the model's table")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--d", type=_number, default=1e9)
    p.add_argument("--k", type=_number, default=None, help="entries per message (else density·d)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--shards", type=int, nargs="+", default=[1])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--downlink", choices=("sparse", "dense"), default="sparse")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--machine-memory", type=_number, default=None, help="bytes per machine")
    p.add_argument("--latency", type=float, default=Network.latency_s, help="s (assumed)")
    p.add_argument("--bandwidth", type=_number, default=Network.bandwidth_Bps, help="B/s")
    p.add_argument("--units", type=Path, default=DEFAULT_UNITS)
    c = sub.add_parser("check", help="predicted vs the measurements recorded in the docs")
    c.add_argument("--units", type=Path, default=DEFAULT_UNITS)
    c.add_argument("--live", action="store_true", help="also re-run bench_round at a small d")
    c.add_argument("--live-dim", type=int, default=200_000)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    {"measure": measure, "predict": predict, "check": check}[args.mode](args)


if __name__ == "__main__":
    main()
