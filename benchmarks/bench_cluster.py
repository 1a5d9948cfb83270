"""Whole rounds of a real cluster: `byzps launch` with n worker processes, dense vs sparse downlink.

Usage:  python benchmarks/bench_cluster.py [--dim 1000000] [--workers 20] [--rounds 100 60]
            [--aggregators mean cm nnm+cm] [--density 0.01] [--noise 1.0]
            [--out /tmp/byzps-bench-cluster]

Each cell is one `byzps launch` on 127.0.0.1 — a server process, n honest Byz-DM21 worker
processes (η = 0.1, Top-k with k = density · d) on the d-dimensional `quadratic` task — run once
with `--downlink dense` (every round's model sent whole, every column aggregated) and once with
`--downlink sparse` (the change of ĝ whenever it is smaller than the model, incremental
aggregation where the union of the supports is small). The round
time is read from the server's metrics.jsonl: (wall at the last round − wall at the end of the
warm-up) / measured rounds, so start-up and the warm-up (states start at g = 0 and need ~100
rounds at Top-1% to become dense, as in a long run) are excluded. Both runs of a cell must end
with the same params.npy bit for bit (the downlink is exact; checked).

`worker compute` is the time all n workers' estimator steps take in one process on this machine
(the CPU work of a round that no downlink can save: on a 2-core machine the n worker processes
share the cores with the server), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from byzps.cli.cluster import byzps_command
from byzps.common.components import build_run_compressor, build_run_estimator, build_run_task
from byzps.common.config import RunConfig, to_toml


def config_dict(args: argparse.Namespace, aggregator: str) -> dict:
    base, *pre = reversed(aggregator.split("+"))
    warmup, measured = args.rounds
    return {
        "run": {"seed": 0, "rounds": warmup + measured, "eval_every": warmup},
        "task": {"name": "quadratic", "params": {"dim": args.dim, "noise": args.noise}},
        "cluster": {"workers": args.workers, "byzantine": args.f},
        "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
        "compressor": {"name": "topk", "ratio": args.density},
        "aggregator": {"name": base, "pre": list(reversed(pre))},
    }


def add_workload_arguments(parser: argparse.ArgumentParser, dim: int) -> None:
    """--dim, --workers, --f, --density, --noise: the cluster's workload (config_dict)."""
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--f", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.01, help="k / d")
    parser.add_argument(
        "--noise", type=float, default=1.0, help="gradient noise σ (0: no draws, less compute)"
    )


def worker_compute_ms(config: dict, repeats: int = 3) -> float:
    """One round of all n workers' estimator steps (gradient, momenta, Top-k), in ms."""
    run = RunConfig.from_dict(config)
    task = build_run_task(run)
    ids = list(range(run.cluster.workers))
    estimator = build_run_estimator(run, task, build_run_compressor(run, task), ids)
    oracle = task.oracle(ids, run.run.seed)
    x = task.init_params(run.run.seed)
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        estimator.commit(estimator.message(x, oracle, r))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[1:]))


def launch(config_path: Path, out: Path, downlink: str, timeout: float) -> float:
    """Run one cluster; returns the steady-state ms per round. Every round waits for every
    worker (a deadline far beyond any round): at d = 1e7 on 2 cores round 0's dense pushes took
    20-26 s, past the 10 s default, and a round closed on a quorum holds whichever workers were
    first, which no two runs share, so their models could not be compared."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = byzps_command(
        "launch", "--config", str(config_path), "--out", str(out), "--downlink", downlink,
        "--round-deadline", str(timeout),
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[1], records[-1]  # the end of the warm-up, the end of the run
    return 1e3 * (last["wall_seconds"] - first["wall_seconds"]) / (last["round"] - first["round"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(parser, dim=1_000_000)
    parser.add_argument("--rounds", type=int, nargs=2, default=[100, 60], metavar=("WARM", "N"))
    parser.add_argument("--aggregators", nargs="+", default=["mean", "cm", "nnm+cm"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/byzps-bench-cluster"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="per launch, seconds")
    args = parser.parse_args(argv)

    print("$ python " + shlex.join(["benchmarks/bench_cluster.py", *sys.argv[1:]]))
    print(
        f"byzps launch: 1 server + {args.workers} worker processes on 127.0.0.1, "
        f"d = {args.dim:,}, Byz-DM21 + Top-k density {args.density} on quadratic "
        f"(noise {args.noise}), "
        f"{args.rounds[0]} warm-up + {args.rounds[1]} measured rounds"
    )
    compute = worker_compute_ms(config_dict(args, "mean"))
    print(f"worker compute (all {args.workers} workers, one process): {compute:.1f} ms/round\n")
    print(f"{'aggregator':>10} {'dense ms':>9} {'sparse ms':>10} {'dense/sparse':>13}  same x")
    args.out.mkdir(parents=True, exist_ok=True)
    for aggregator in args.aggregators:
        config_path = args.out / f"{aggregator}.toml"
        config_path.write_text(to_toml(config_dict(args, aggregator)))
        ms, params = {}, []
        for downlink in ("dense", "sparse"):
            out = args.out / f"{aggregator}-{downlink}"
            ms[downlink] = launch(config_path, out, downlink, args.timeout)
            params.append(np.load(out / "params.npy"))
        same = params[0].tobytes() == params[1].tobytes()
        print(
            f"{aggregator:>10} {ms['dense']:9.1f} {ms['sparse']:10.1f} "
            f"{ms['dense'] / ms['sparse']:12.2f}x  {same}"
        )


if __name__ == "__main__":
    main()
