"""The server's durability cost per round: pushes acknowledged, the round closed and served.

Usage:  python benchmarks/bench_durability.py [--dim 1000000] [--workers 20] [--rounds 30]
            [--checkpoint-every 10] [--eval-every 10] [--policies none round group]
            [--dir /tmp/byzps-bench-durability]

No network and no worker processes: a live Coordinator with its real CheckpointStore (log and
checkpoints in --dir, on disk) and MetricsRecorder (metrics.jsonl), fed by a pool of 4 threads
as the gRPC servicer feeds it (`door.receive` then `push`), with n dense identity-compressed
Byz-DM21 messages per round on the `quadratic` task (the messages are made once, before the
timing). A round's time is from its first push to the moment its model can be served (every
push acknowledged, the round closed and published); one more "no storage" line runs the same
rounds without a log, checkpoints or metrics file, the floor the durability adds to. Medians and
means over the rounds after the first, in ms; a checkpoint every --checkpoint-every rounds and an
evaluation every --eval-every are part of them (the mean shows what they cost in total).

Runs against any version of byzps on the path, so the code before a change can be measured
with the same command (PYTHONPATH=<an export of the old tree>): its store gets the default
policy, whatever --policies says.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from byzps.common.components import build_run_compressor
from byzps.common.config import RunConfig
from byzps.common.sparse import SparseBatch
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.checkpoint import CheckpointStore
from byzps.server.coordinator import Coordinator, Settings
from byzps.server.engine import build_server_parts
from byzps.server.results import MetricsRecorder
from byzps.server.validation import Door
from byzps.worker.session import encode_row


def run_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig.from_dict(
        {
            "run": {"seed": 0, "rounds": args.rounds + 1, "eval_every": args.eval_every},
            "task": {"name": "quadratic", "params": {"dim": args.dim}},
            "cluster": {"workers": args.workers, "byzantine": 0},
            "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
            "compressor": {"name": "identity"},
            "aggregator": {"name": "mean"},
        }
    )


def store_for(directory: Path, config: RunConfig, policy: str) -> CheckpointStore:
    if "fsync" in inspect.signature(CheckpointStore).parameters:
        from byzps.server.wal import FsyncPolicy

        return CheckpointStore(directory, config.digest(), fsync=FsyncPolicy(policy))
    return CheckpointStore(directory, config.digest())  # the code before group commit


def messages(config: RunConfig, round: int) -> list[bytes]:
    """Round `round`'s n dense uplink messages, serialized as the workers send them (the same
    in every run)."""
    n, dim = config.cluster.workers, int(config.task.params["dim"])
    values = torch.randn(n, dim, generator=torch.Generator().manual_seed(round)) * 1e-3
    indices = torch.arange(dim, dtype=torch.int32).expand(n, dim)
    batch = SparseBatch(indices, values, dim)
    return [encode_row(row, config) for row in batch.rows()]


def run(args: argparse.Namespace, policy: str | None) -> list[float]:
    """Per-round times (s) of one coordinator; policy None: no storage at all."""
    config = run_config(args)
    task, engine, max_nnz = build_server_parts(config)
    door = Door(
        task.dim, "identity", max_nnz, config.run.rounds, build_run_compressor(config, task)
    )
    directory = args.dir / (policy or "nostore")
    shutil.rmtree(directory, ignore_errors=True)
    store = None if policy is None else store_for(directory / "ckpt", config, policy)
    metrics = None
    if policy is not None:
        metrics = MetricsRecorder(directory / "out", config, task, resume=False)
    settings = Settings(config.cluster.workers, 60.0, 60.0, args.checkpoint_every)
    coordinator = Coordinator(config, engine, door, settings, store=store, metrics=metrics)
    coordinator.start(None)
    n = config.cluster.workers
    for row in range(n):
        coordinator.register(row)
    published = threading.Event()
    coordinator.on_change(published.set)
    times = []
    with ThreadPoolExecutor(4) as pool:  # the servicer's coordinator pool
        for r in range(args.rounds):
            round_wire = messages(config, r)
            published.clear()

            def push(row: int, r: int = r, round_wire: list[bytes] = round_wire) -> None:
                update = pb.SparseUpdate.FromString(round_wire[row])
                coordinator.push(door.receive(row, r, r + 1, update))

            began = time.perf_counter()
            list(pool.map(push, range(n)))
            published.wait(60)
            while coordinator.model(r + 1, None) is None:  # served: its close is on disk
                published.wait(0.001)
            times.append(time.perf_counter() - began)
    coordinator.close(checkpoint=False)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--policies", nargs="+", default=["none", "round", "group"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/byzps-bench-durability"))
    args = parser.parse_args(argv)
    print("$", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"d = {args.dim:.0e}, n = {args.workers}, {args.rounds} rounds, checkpoint every "
          f"{args.checkpoint_every}, evaluation every {args.eval_every}")  # fmt: skip
    for policy in [None, *args.policies]:
        times = run(args, policy)[1:]
        median, mean = 1e3 * statistics.median(times), 1e3 * statistics.fmean(times)
        name = "no storage" if policy is None else f"fsync {policy}"
        worst = 1e3 * max(times)
        print(f"{name:>12}: median {median:7.1f} ms/round, mean {mean:7.1f}, max {worst:7.1f}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
