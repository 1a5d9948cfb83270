"""Whole rounds of a sharded server: `byzps launch` with cluster.shards = S, round time and each
shard process's peak memory against S.

Usage:  python benchmarks/bench_shards.py [--dim 10000000] [--workers 20] [--shards 1 2 4]
            [--rounds 20 10] [--aggregators cm nnm+cm] [--density 0.01] [--noise 1.0]
            [--out /tmp/byzps-bench-shards]

Each cell is one `byzps launch` on 127.0.0.1 (S shard processes, n honest Byz-DM21 worker
processes with Top-k on the d-dimensional `quadratic` task; the cells of bench_cluster.py with
the sparse downlink). The round time is read from rank 0's metrics.jsonl as in bench_cluster.py
(steady state after the warm-up); a shard's peak memory is the resident-set high-water mark it
logs when it exits. Every S must end with the params.npy of S = 1 (bit for bit for
coordinate-wise rules, within 1e-6 relative otherwise: checked and printed).

On one machine the shards share its cores with each other and with the workers, so S > 1
shows the sharding's overheads (the per-shard pushes and fetches, the barrier's exchange), not
its gain; the gain is the memory per shard, and with a machine per shard the aggregation's time
divided by S (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import numpy as np
from bench_cluster import add_workload_arguments, config_dict, launch, worker_compute_ms

from byzps.common.config import to_toml

PEAK = re.compile(r"peak resident memory ([0-9.]+) MB")


def peak_mb(out: Path) -> list[float]:
    """Each server process's logged peak RSS, in rank order."""
    logs = sorted((out / "logs").glob("server*.log"))
    return [float(m.group(1)) for log in logs for m in [PEAK.search(log.read_text())] if m]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser, dim=10_000_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, nargs=2, default=[20, 10], metavar=("WARM", "N"))
    parser.add_argument("--aggregators", nargs="+", default=["cm", "nnm+cm"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/byzps-bench-shards"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="per launch, seconds")
    args = parser.parse_args(argv)

    print("$ python " + shlex.join(["benchmarks/bench_shards.py", *sys.argv[1:]]))
    print(
        f"byzps launch: S shard processes + {args.workers} worker processes on 127.0.0.1, "
        f"d = {args.dim:,}, Byz-DM21 + Top-k density {args.density} on quadratic, "
        f"{args.rounds[0]} warm-up + {args.rounds[1]} measured rounds"
    )
    compute = worker_compute_ms(config_dict(args, "mean"))
    print(f"worker compute (all {args.workers} workers, one process): {compute:.1f} ms/round\n")
    print(f"{'aggregator':>10} {'S':>3} {'ms/round':>9} {'vs S=1':>7} "
          f"{'peak MB/shard':>14} {'vs S=1':>7}  same x as S=1")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for aggregator in args.aggregators:
        base_ms = base_mb = 0.0
        reference: np.ndarray | None = None
        for shards in args.shards:
            config = config_dict(args, aggregator)
            config["cluster"]["shards"] = shards
            path = args.out / f"{aggregator}-S{shards}.toml"
            path.write_text(to_toml(config))
            out = args.out / f"{aggregator}-S{shards}"
            ms = launch(path, out, "sparse", args.timeout)
            mb = max(peak_mb(out))
            params = np.load(out / "params.npy")
            if reference is None:
                reference, base_ms, base_mb = params, ms, mb
            rel = np.linalg.norm(params - reference) / np.linalg.norm(reference)
            same = "bit for bit" if np.array_equal(params, reference) else f"rel {rel:.1e}"
            print(f"{aggregator:>10} {shards:>3} {ms:9.1f} {ms / base_ms:6.2f}x "
                  f"{mb:14.0f} {mb / base_mb:6.2f}x  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
