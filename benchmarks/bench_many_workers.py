"""n = 200, 500, 1,000 worker identities against one real server on loopback: does anything break?

Usage:  python benchmarks/bench_many_workers.py [--n 200 500 1000] [--rounds 30] [--dim 10000]
            [--aggregator cm] [--pre nnm] [--f 0] [--attack bf] [--protocol NAME]
            [--processes 2] [--pushers 8] [--per-connection 128] [--fetch-each]
            [--timeout 900] [--out /tmp/byzps-bench-many]

For each n: a `byzps server` process on 127.0.0.1 (ephemeral port, --metrics on another, the
write-ahead log under its --out with the default fsync policy, auth on: `byzps credentials issue`
writes every id's token file) and `--processes` fleet processes (`python -m byzps.worker.fleet`,
byzps.worker.fleet) holding the h = n − f honest identities between them — each identity with its
own token, seq and estimator row, pushing under its own id — plus, with --f, one `byzps attack`
process holding the f Byzantine ones (`--attack`, bit flip by default). Quadratic task d = --dim,
Byz-DM21 (η = 0.1, Top-1 %), --aggregator behind --pre, --rounds rounds; rounds close when every
identity has pushed (the round deadline is far away), so the result must not depend on timing. With
--protocol, the Byzantine process also runs that protocol-level attack
(byzps.worker.byzantine.protocol, e.g. register-storm) under its members' tokens: its refused and
throttled calls are then expected, and the checks below hold for the honest ids.

It prints, per n:
  push p50/p99  each PushUpdate from call to Ack in the fleets (client-side, retries included);
  rounds/s      from the server's metrics (`byzps_round_duration_seconds`: rounds closed over
                the time they were open, round 0 — which holds every process's start-up —
                left out using rounds.jsonl, the server's own record of each round);
  RSS peak      the server process's VmHWM (/proc/PID/status) just before it exits;
  lost          the check that every acknowledged update was applied exactly once: the server's
                `byzps_updates_accepted` equals n·rounds with no refusal and no throttled call,
                every identity's ledger holds exactly the seqs 1 … rounds, and the final
                params.npy is bit-identical to `byzps simulate` of the same config (one process,
                no network) — it can only be if every update of every round was applied once.
Bounded: every process is stopped after --timeout seconds per n.
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
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from timing import as_the_daemons_run

from byzps.cli.cluster import LISTENING, Cluster, byzps_command
from byzps.common.config import to_toml

METRICS_LINE = re.compile(r"metrics on (http://\S+/metrics)")


def run_config(n: int, args: argparse.Namespace) -> dict:
    aggregator: dict = {"name": args.aggregator}
    if args.pre:
        aggregator["pre"] = args.pre
    return {
        "run": {"seed": 0, "rounds": args.rounds, "eval_every": args.rounds},
        "task": {"name": "quadratic", "params": {"dim": args.dim, "noise": 1.0}},
        "cluster": {"workers": n, "byzantine": args.f},
        "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
        "compressor": {"name": "topk", "ratio": 0.01},
        "aggregator": aggregator,
        "attack": {"name": args.attack if args.f else "na"},
    }


@dataclass
class Result:
    n: int
    push_p50: float
    push_p99: float
    pushes: int
    rounds_per_s: float
    rss_peak_mb: float
    startup_s: float
    wall_s: float
    problems: list[str]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def vm_hwm_mb(pid: int) -> float:
    """The peak resident set of process `pid` (VmHWM), MB; nan once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {series with labels: value} (samples only)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], family: str) -> float:
    return sum(v for k, v in samples.items() if k == family or k.startswith(family + "{"))


def run_one(n: int, args: argparse.Namespace) -> Result:
    out = args.out / f"n{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = out / "run.toml"
    config.write_text(to_toml(run_config(n, args)))
    secret = out / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    began = time.monotonic()
    subprocess.run(
        byzps_command("credentials", "issue", "--secret-file", str(secret), "--ids",
                      f"0-{n - 1}", "--operator", "--out", str(out / "tokens")),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    issued = time.monotonic() - began
    h = n - args.f
    problems: list[str] = []
    cluster = Cluster(out / "logs")
    server_out = out / "server"
    try:
        server = cluster.start(
            "server",
            byzps_command(
                "server", "--config", str(config), "--listen", "127.0.0.1:0", "--out",
                str(server_out), "--secret-file", str(secret), "--metrics", "127.0.0.1:0",
                "--linger", str(args.timeout), "--startup-timeout", "600",
                "--round-deadline", "600",
            ),
            pipe_stdout=True,
        )  # fmt: skip
        address = cluster.wait_for_line(server, LISTENING, 300.0)
        found = METRICS_LINE.search((out / "logs" / "server.log").read_text())
        metrics_url = found.group(1) if found else None
        started = time.monotonic()
        per = math.ceil(h / args.processes)
        fleets = []
        for p in range(args.processes):
            first, last = p * per, min(h, (p + 1) * per) - 1
            if first > last:
                break
            fleets.append(cluster.start(f"fleet-{p}", [
                sys.executable, "-m", "byzps.worker.fleet", "--server", address,
                "--ids", f"{first}-{last}", "--token-dir", str(out / "tokens"),
                "--ledger", str(out / f"ledger-{p}.jsonl"),
                "--latencies", str(out / f"latency-{p}.json"), "--log-level", "WARNING",
                "--per-connection", str(args.per_connection), "--pushers", str(args.pushers),
                *(["--fetch-each"] if args.fetch_each else []),
            ]))  # fmt: skip
        if args.f:
            cluster.start("attack", byzps_command(
                "attack", "--server", address, "--count", str(args.f), "--first-id", str(h),
                "--token-dir", str(out / "tokens"), "--threads", "1", "--log-level", "WARNING",
                *(["--protocol", args.protocol] if args.protocol else []),
            ))  # fmt: skip
        deadline = started + args.timeout
        for child in cluster.children[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if child.process.poll() != 0:
                code = child.process.poll()
                problems.append(f"{child.name} {'timed out' if code is None else f'exit {code}'}")
        wall = time.monotonic() - started
        samples = scrape(metrics_url) if metrics_url and server.process.poll() is None else {}
        rss = vm_hwm_mb(server.pid)
    finally:
        cluster.stop(grace=30.0)
    if server.process.returncode not in (0, None):
        problems.append(f"server exit {server.process.returncode}")

    latencies = [x for f in sorted(out.glob("latency-*.json")) for x in json.loads(f.read_text())]
    # What the server says it applied.
    applied = total(samples, "byzps_updates_accepted_total")
    if applied != n * args.rounds:
        problems.append(f"server applied {applied:.0f} updates, expected {n * args.rounds}")
    per_worker = [samples.get(f'byzps_updates_accepted_total{{worker="{w}"}}') for w in range(n)]
    off = [w for w, count in enumerate(per_worker) if count != args.rounds]
    if off:
        problems.append(f"{len(off)} workers without exactly {args.rounds} applied, e.g. {off[:3]}")
    # Nothing duplicated, refused or throttled — for the honest ids only under a protocol attack,
    # whose calls are meant to be refused (the throttled count has no worker label).
    checked = range(h) if args.protocol else range(n)
    for family in ("byzps_updates_duplicate_total", "byzps_updates_refused_total"):
        count = sum(
            v for k, v in samples.items()
            if k.startswith(family + "{") and int(re.search(r'worker="(\d+)"', k)[1]) in checked
        )  # fmt: skip
        if count:
            problems.append(f"{family} = {count:.0f}")
    throttled = total(samples, "byzps_calls_throttled_total")
    if throttled and not args.protocol:
        problems.append(f"byzps_calls_throttled_total = {throttled:.0f}")
    # What the fleets say was acknowledged: each identity exactly the seqs 1 … rounds.
    seqs: dict[str, list[int]] = {}
    for path in out.glob("ledger-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            seqs.setdefault(entry["worker"], []).append(entry["seq"])
    expected = list(range(1, args.rounds + 1))
    short = [w for w in map(str, range(h)) if seqs.get(w) != expected]
    if short:
        problems.append(f"{len(short)} ledgers are not seqs 1…{args.rounds}, e.g. {short[:3]}")
    # Rounds/s: the server's histogram of round durations, less round 0 (start-up).
    rounds_log = server_out / "rounds.jsonl"
    lines = rounds_log.read_text().splitlines() if rounds_log.exists() else []
    rounds = [json.loads(line) for line in lines]
    first = next((r for r in rounds if r["round"] == 0), None)
    open_s = samples.get("byzps_round_duration_seconds_sum", math.nan)
    closed = samples.get("byzps_round_duration_seconds_count", math.nan)
    if first is not None:
        open_s -= first["closed"] - first["opened"]
        closed -= 1
    # The same run in one process, no network: the final parameters must match bit for bit.
    if args.f == 0 or args.attack in BIT_EXACT_ATTACKS:
        sim = out / "sim"
        subprocess.run(
            byzps_command("simulate", "--config", str(config), "--out", str(sim)),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        params = server_out / "params.npy"
        if not params.exists():
            problems.append("the server wrote no params.npy")
        elif np.load(params).tobytes() != np.load(sim / "params.npy").tobytes():
            problems.append("final params differ from byzps simulate")
    print(
        f"  n = {n}: tokens issued in {issued:.1f} s, run {wall:.1f} s, calls throttled "
        f"{throttled:.0f}, pushes refused "
        f"{total(samples, 'byzps_updates_refused_total'):.0f}",
        flush=True,
    )
    return Result(
        n,
        percentile(latencies, 50),
        percentile(latencies, 99),
        len(latencies),
        closed / open_s if open_s > 0 else math.nan,
        rss,
        rounds[0]["closed"] - rounds[0]["opened"] if rounds else math.nan,
        wall,
        problems,
    )


#: Attacks whose cohort computes what the simulator's does (no honest statistics needed), so a
#: run with f > 0 can still be compared with `byzps simulate` bit for bit.
BIT_EXACT_ATTACKS = ("bf", "gauss")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dim", type=int, default=10_000)
    parser.add_argument("--aggregator", default="cm")
    parser.add_argument("--pre", nargs="*", default=[], help="pre-aggregation, e.g. nnm")
    parser.add_argument("--f", type=int, default=0, help="Byzantine identities (one process)")
    parser.add_argument("--attack", default="bf")
    parser.add_argument(
        "--protocol", help="a protocol attack of the Byzantine process (e.g. register-storm)"
    )
    parser.add_argument("--processes", type=int, default=2, help="fleet processes")
    parser.add_argument("--pushers", type=int, default=8, help="pushes in flight per fleet")
    parser.add_argument(
        "--per-connection", type=int, default=128, help="identities sharing one connection"
    )
    parser.add_argument(
        "--fetch-each",
        action="store_true",
        help="every identity long-polls for each round's model (default: one per process)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per n, seconds")
    parser.add_argument("--out", type=Path, default=Path("/tmp/byzps-bench-many"))
    args = parser.parse_args(argv)
    as_the_daemons_run()
    print("$ python " + shlex.join(["benchmarks/bench_many_workers.py", *sys.argv[1:]]))
    pre = "∘".join([*args.pre, args.aggregator])
    print(
        f"byzps server + {args.processes} fleet processes"
        + (f" + 1 attack process (f = {args.f}, {args.attack})" if args.f else "")
        + f" on 127.0.0.1: quadratic d = {args.dim:,}, Byz-DM21, Top-1 %, {pre}, "
        f"{args.rounds} rounds, model fetched "
        + ("by every identity" if args.fetch_each else "once per fleet process")
        + f", {args.per_connection} identities per connection, {args.pushers} pushes in flight"
        f" per fleet; load {loadavg()}",
        flush=True,
    )
    results = [run_one(n, args) for n in args.n]
    print(f"\n{'n':>6} {'push p50 ms':>12} {'push p99 ms':>12} {'rounds/s':>9} "
          f"{'server RSS MB':>14} {'round 0 s':>10}  nothing lost")  # fmt: skip
    for r in results:
        lost = "yes" if not r.problems else "NO: " + "; ".join(r.problems)
        print(f"{r.n:>6} {1e3 * r.push_p50:12.1f} {1e3 * r.push_p99:12.1f} {r.rounds_per_s:9.2f}"
              f" {r.rss_peak_mb:14.0f} {r.startup_s:10.1f}  {lost}")  # fmt: skip
    print(f"load after: {loadavg()}")
    if any(r.problems for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
