"""Protocol-level attacks against a live server: what each costs the honest rounds, and a load test.

Usage:  python benchmarks/bench_protocol_attacks.py [--attacks longpoll-flood push-storm ...]
            [--honest 8] [--f 2] [--rounds 30] [--dim 1200000] [--round-deadline 2]
            [--compressor topk|randk]
            [--protocol-param NAME.KEY=VALUE ...] [--out /tmp/byzps-bench-protocol]
        python benchmarks/bench_protocol_attacks.py --load 200 [--load-rounds 30]
            [--load-dim 10000] [--per-process 25]

Attack mode. Every cell is one small cluster on 127.0.0.1 — a `byzps server`, `--honest` honest
`byzps worker` processes and one `byzps attack` process holding the f Byzantine identities
(bit flip), Byz-DM21 with Top-k (k = d/1000; `--compressor randk`: Rand-k, whose pushes with a
forged seed make the server regenerate their indices) and NNM∘cm on the `quadratic` task of
dimension d (default 1.2e6, so the model streams as two 4 MiB chunks and `slow-reader` has a
write to stall) — run once per attack with `--protocol NAME` (the attack's defaults; `deadline` gets
deadline = --round-deadline), and without a protocol attack once before and once after them
(pooled: the machine's drift between the two is printed too). Round times are the honest rounds'
durations, closed − opened, from the server's OUT/rounds.jsonl (one line per closed round,
wall-clock seconds; round 0, which also holds every process's start-up, is left out).
The table shows their p50 and p99 without and with the attack, the ratio, and whether the final
params.npy is bit-identical to the run without: it must be for every attack but `deadline`
(which delays real updates), since a round closes when every registered worker has pushed — a
result can only depend on timing if a push misses --round-deadline and the round closes on the
quorum without it.
Below the table, each attack's own count of how its calls ended.

Load mode (`--load N`). N honest worker identities on loopback (quadratic, d = 1e4, 30 rounds,
no Byzantine worker) against one server. N worker processes would not fit in this machine's
memory (each imports torch, ~250 MB), so the identities run as threads, `--per-process` of them
per process, each with its own ParameterServerClient, token, estimator and ledger — the very
worker loop of `byzps worker` (byzps.worker.daemon.run_worker), with a client that times each
PushUpdate from call to Ack (retries included). It prints p50/p99 round time and push latency
and checks that nothing was lost: every identity's ledger holds exactly the seqs 1 … rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from timing import as_the_daemons_run

from byzps.cli.cluster import LISTENING, Cluster, byzps_command
from byzps.common.config import to_toml

PROTOCOLS = [
    "longpoll-flood",
    "push-storm",
    "slow-reader",
    "slowloris",
    "padded",
    "register-storm",
    "deadline",
]


def attack_config(args: argparse.Namespace) -> dict:
    return {
        "run": {"seed": 0, "rounds": args.rounds, "eval_every": args.rounds},
        "task": {"name": "quadratic", "params": {"dim": args.dim, "noise": 1.0}},
        "cluster": {"workers": args.honest + args.f, "byzantine": args.f},
        "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
        "compressor": {"name": args.compressor, "ratio": 0.001},
        "aggregator": {"name": "cm", "pre": ["nnm"]},
        "attack": {"name": "bf"},
    }


def load_config(args: argparse.Namespace) -> dict:
    return {
        "run": {"seed": 0, "rounds": args.load_rounds, "eval_every": args.load_rounds},
        "task": {"name": "quadratic", "params": {"dim": args.load_dim, "noise": 1.0}},
        "cluster": {"workers": args.load, "byzantine": 0},
        "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
        "compressor": {"name": "topk", "ratio": 0.01},
        "aggregator": {"name": "cm"},
        "attack": {"name": "na"},
    }


def write_secret(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path


@dataclass
class Run:
    """One finished cluster: its round durations (s), final params, attack log, and failures."""

    rounds: np.ndarray
    params: np.ndarray | None
    attack_log: str
    failed: list[str]


def start_server(cluster: Cluster, config: Path, out: Path, secret: Path, *extra: str) -> str:
    argv = byzps_command(
        "server", "--config", str(config), "--listen", "127.0.0.1:0", "--out", str(out),
        "--secret-file", str(secret), "--linger", "3", "--startup-timeout", "600", *extra,
    )  # fmt: skip
    server = cluster.start("server", argv, pipe_stdout=True)
    return cluster.wait_for_line(server, LISTENING, 300.0)


def finish(cluster: Cluster, out: Path, timeout: float) -> Run:
    """Wait for the server to end the run, then stop everything; which children failed."""
    server = cluster.children[0]
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=timeout)
    deadline = time.monotonic() + 30.0
    for child in cluster.children[1:]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    failed = [
        f"{c.name} ({'running' if c.process.poll() is None else c.process.returncode})"
        for c in cluster.children
        if c.process.poll() != 0
    ]
    cluster.stop(grace=5.0)
    rounds_path, params_path = out / "rounds.jsonl", out / "params.npy"
    lines = rounds_path.read_text().splitlines() if rounds_path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    # Round 0 is left out: it also holds every process's start-up (task, estimator, first fetch).
    durations = np.array([r["closed"] - r["opened"] for r in records if r["round"] > 0])
    attack_log = cluster.log_dir / "attack.log"
    return Run(
        durations,
        np.load(params_path) if params_path.exists() else None,
        attack_log.read_text() if attack_log.exists() else "",
        failed,
    )


def run_attack_cell(
    args: argparse.Namespace, config: Path, name: str | None, label: str = "none"
) -> Run:
    """One cluster, with the protocol attack `name` (None: without), in OUT/(name or label)."""
    out = args.out / (name or label)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    secret = write_secret(out / "secret")
    cluster = Cluster(out / "logs")
    try:
        address = start_server(
            cluster, config, out, secret, "--round-deadline", str(args.round_deadline)
        )
        common = ["--server", address, "--secret-file", str(secret), "--threads", "1"]
        for k in range(args.honest):
            cluster.start(f"worker-{k}", byzps_command("worker", *common, "--id", str(k)))
        protocol: list[str] = []
        if name is not None:
            protocol = ["--protocol", name]
            if name == "deadline":
                protocol += ["--protocol-param", f"deadline={args.round_deadline}"]
            for param in args.protocol_param:
                if param.startswith(f"{name}."):
                    protocol += ["--protocol-param", param]
        cluster.start("attack", byzps_command(
            "attack", *common, "--count", str(args.f), "--first-id", str(args.honest), *protocol
        ))  # fmt: skip
        return finish(cluster, out, args.timeout)
    finally:
        cluster.stop(grace=5.0)


def percentiles(values: np.ndarray) -> tuple[float, float]:
    if not len(values):
        return math.nan, math.nan
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def attack_mode(args: argparse.Namespace) -> None:
    sparsifier = "Top-k" if args.compressor == "topk" else "Rand-k"
    print(
        f"byzps server + {args.honest} honest worker processes + 1 attack process "
        f"(f = {args.f}, bit flip) on 127.0.0.1: quadratic d = {args.dim:,}, Byz-DM21, "
        f"{sparsifier} (d/1000), NNM∘cm, {args.rounds} rounds, --round-deadline "
        f"{args.round_deadline} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "run.toml"
    config.write_text(to_toml(attack_config(args)))
    base = run_attack_cell(args, config, None)
    if base.failed or base.params is None:
        raise SystemExit(f"the run without an attack failed: {base.failed}; see {args.out}/none")
    runs = {name: run_attack_cell(args, config, name) for name in args.attacks}
    again = run_attack_cell(args, config, None, "none-again")
    # "without" pools a run before and a run after the attacks: this machine's drift in between
    # shows as their difference, printed below the table.
    b50, b99 = percentiles(np.concatenate([base.rounds, again.rounds]))
    print(f"\n{'attack':>15} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms':>9} {'p99 ms':>8}"
          f" {'p50 x':>7} {'p99 x':>7}  same params")  # fmt: skip
    print(f"{'':>15} {'--- without ---':>17} {'----- with -----':>18}")
    tallies = []
    for name, run in runs.items():
        p50, p99 = percentiles(run.rounds)
        same = run.params is not None and run.params.tobytes() == base.params.tobytes()
        note = f"  FAILED: {', '.join(run.failed)}" if run.failed else ""
        print(
            f"{name:>15} {1e3 * b50:8.1f} {1e3 * b99:8.1f} {1e3 * p50:9.1f} {1e3 * p99:8.1f}"
            f" {p50 / b50:6.2f}x {p99 / b99:6.2f}x  {same}{note}"
        )
        found = re.search(
            rf"protocol attack {re.escape(name)}: (\d+ calls.*|nothing sent)", run.attack_log
        )
        tallies.append(f"{name}: {found.group(1) if found else 'no summary (see attack.log)'}")
    first, last = percentiles(base.rounds)[0], percentiles(again.rounds)[0]
    same = again.params is not None and again.params.tobytes() == base.params.tobytes()
    print(f"\nwithout: p50 {1e3 * first:.1f} ms before the attacks, {1e3 * last:.1f} ms after; "
          f"same params both times: {same}")  # fmt: skip
    print("what the attacks' calls got back:")
    for line in tallies:
        print(f"  {line}")


# ----------------------------------------------------------------------------------------------
# Load mode
# ----------------------------------------------------------------------------------------------


def load_worker(args: argparse.Namespace) -> None:
    """One process of the load test: identities first_id … first_id + count − 1, one thread
    each, running byzps.worker.daemon.run_worker with a client that times its pushes."""
    import torch

    import byzps.worker.daemon as worker_daemon
    from byzps.common.credentials import read_secret, token_for
    from byzps.worker.client import ParameterServerClient

    torch.set_num_threads(1)
    latencies: list[float] = []
    lock = threading.Lock()

    class TimedClient(ParameterServerClient):
        def push(self, *a, **kw):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            ack = super().push(*a, **kw)
            with lock:
                latencies.append(time.perf_counter() - start)
            return ack

    worker_daemon.ParameterServerClient = TimedClient  # type: ignore[misc]
    secret = read_secret(args.secret_file)
    failures: list[str] = []

    def identity(k: int) -> None:
        try:
            worker_daemon.run_worker(
                args.server,
                k,
                {str(k): token_for(secret, str(k))},  # its own token only
                ledger_path=args.out / "ledgers" / f"worker-{k}.jsonl",
            )
        except BaseException as exc:  # reported, then the process fails
            failures.append(f"worker {k}: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=identity, args=(k,), daemon=True)
        for k in range(args.first_id, args.first_id + args.count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (args.out / f"latency-{args.first_id}.json").write_text(json.dumps(latencies))
    if failures:
        print("\n".join(failures), file=sys.stderr)
        raise SystemExit(1)


def load_mode(args: argparse.Namespace) -> None:
    n, per = args.load, args.per_process
    processes = math.ceil(n / per)
    print(
        f"load: {n} honest worker identities on 127.0.0.1 in {processes} processes × ≤{per} "
        f"threads (each its own client, token, estimator and ledger: {n} processes would need "
        f"~{n / 4:.0f} GB at ~250 MB each), quadratic d = {args.load_dim:,}, Top-k (d/100), cm, "
        f"{args.load_rounds} rounds"
    )
    out = args.out / "load"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = out / "run.toml"
    config.write_text(to_toml(load_config(args)))
    secret = write_secret(out / "secret")
    cluster = Cluster(out / "logs")
    try:
        address = start_server(cluster, config, out, secret, "--round-deadline", "600")
        for p in range(processes):
            first = p * per
            argv = [sys.executable, __file__, "--load-worker", "--server", address,
                    "--secret-file", str(secret), "--first-id", str(first),
                    "--count", str(min(per, n - first)), "--out", str(out)]  # fmt: skip
            cluster.start(f"load-{p}", argv)
        run = finish(cluster, out, args.timeout)
    finally:
        cluster.stop(grace=5.0)
    latencies = np.array(
        [x for f in sorted(out.glob("latency-*.json")) for x in json.loads(f.read_text())]
    )
    lost = []
    for k in range(n):
        path = out / "ledgers" / f"worker-{k}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        seqs = [json.loads(line)["seq"] for line in lines]
        if seqs != list(range(1, args.load_rounds + 1)):
            lost.append(f"worker {k}: {len(seqs)} acknowledged seqs")
    r50, r99 = percentiles(run.rounds)
    l50, l99 = percentiles(latencies)
    print(f"rounds timed: {len(run.rounds)}  round p50 {1e3 * r50:.1f} ms  p99 {1e3 * r99:.1f} ms")
    print(f"pushes timed: {len(latencies)}  push latency p50 {1e3 * l50:.1f} ms  "
          f"p99 {1e3 * l99:.1f} ms (client-side, retries included)")  # fmt: skip
    if run.failed:
        print(f"FAILED processes: {', '.join(run.failed)} (logs in {out / 'logs'})")
    if lost:
        print(f"LOST: {len(lost)} workers short of {args.load_rounds} seqs, e.g. {lost[:3]}")
    else:
        print(f"nothing lost: all {n} ledgers hold exactly the seqs 1 … {args.load_rounds}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=PROTOCOLS, choices=PROTOCOLS)
    parser.add_argument("--honest", type=int, default=8)
    parser.add_argument("--f", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dim", type=int, default=1_200_000)
    parser.add_argument("--round-deadline", type=float, default=2.0)
    parser.add_argument(
        "--compressor",
        choices=("topk", "randk"),
        default="topk",
        help="randk: push-storm's forged-seed pushes make the server regenerate their indices",
    )
    parser.add_argument("--protocol-param", action="append", default=[], metavar="NAME.KEY=VALUE")
    parser.add_argument("--load", type=int, default=0, metavar="N", help="load mode: N workers")
    parser.add_argument("--load-rounds", type=int, default=30)
    parser.add_argument("--load-dim", type=int, default=10_000)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("/tmp/byzps-bench-protocol"))
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    # The load test's worker processes (internal).
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--secret-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_worker:
        load_worker(args)
        return
    as_the_daemons_run()
    print("$ python " + shlex.join(["benchmarks/bench_protocol_attacks.py", *sys.argv[1:]]))
    if args.load:
        load_mode(args)
    else:
        attack_mode(args)


if __name__ == "__main__":
    main()
