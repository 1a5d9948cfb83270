"""byzps vs Flower: seconds per round of the same plain-mean workload, interleaved in one run.

Usage:  python benchmarks/bench_vs_flower.py --flower-python /tmp/flwr-venv/bin/python
            [--dim 1e6] [--workers 20] [--rounds 3 10] [--reps 2] [--modes dense top1]
            [--noise 0] [--out /tmp/byzps-bench-vs-flower] [--timeout 900]
        python benchmarks/bench_vs_flower.py --write-configs DIR [--dim 1e6]   # configs only

This script installs nothing. Flower needs protobuf < 7, which conflicts with byzps's pinned
protobuf, so Flower lives in a virtual environment of its own, made once with (flwr pulls
neither torch nor CUDA):

    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr==1.42.0

and handed over by `--flower-python`. Run this script itself with byzps's interpreter (the
project's .venv). Each repetition runs, one after the other on 127.0.0.1:

- **Flower**: Flower's legacy gRPC server (`flwr.server.start_server`, grpc-bidi; not the
  SuperLink) with FedAvg over all n clients, each reporting num_examples = 1 (the plain mean),
  no evaluation, and n client processes (`flwr.client.start_client`) that do no training: `fit`
  returns a fixed float32 vector of size d. Each client is sent the dense model and returns a
  dense vector every round. The Flower-side code is `benchmarks/flower_side.py`, run by the Flower
  interpreter only; the server writes the wall time at which each round's configure_fit began
  and its aggregate_fit returned.
- **byzps dense**: `byzps launch --downlink dense` on the `quadratic` task of dimension d: n
  honest Byz-DM21 worker processes (real estimator steps; gradient noise σ = --noise, default 0:
  Flower's clients do no training, so byzps's do the least the estimator allows), the
  identity compressor (every update dense, float32), f = 0, the plain mean, the whole model
  sent back every round; the durability the product ships by default (write-ahead log,
  checkpoints every 50 rounds — a short run has none inside its measured window).
- **byzps Top-1 %**: the same with `topk`, ratio 0.01 (and the default sparse downlink).

s/round is (closed at the last round − closed at the last warm-up round) / measured rounds,
from the server's side: Flower's per-round log, byzps's OUT/rounds.jsonl. The first WARM rounds
(connection, registration, start-up, and byzps's states filling up) are excluded. The systems
are interleaved (Flower, byzps dense, byzps Top-1 %, Flower, …) and each ratio byzps / Flower is
taken within a repetition; the summary is the ratio of the mean s/round over the repetitions.
Every process the script starts is stopped at the end, on an error, a timeout (--timeout per
run), Ctrl-C or SIGTERM.

Memory: at d = 1e7 byzps's 20 workers and server need ~21 GB together (on a 24 GB machine the
available memory fell to 2.7 GB during the dense run), Flower's processes ~13 GB; the script does
not check, so look at free memory before a 1e7 run, or run it beside a guard that stops it.
Results: docs/performance.md, "byzps vs Flower".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOWER_SIDE = HERE / "flower_side.py"
FLOWER_VENV_COMMAND = (
    "python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr==1.42.0"
)
#: Compressor section per byzps mode.
MODES = {
    "dense": {"name": "identity"},
    "top1": {"name": "topk", "ratio": 0.01},
}
LABELS = {"dense": "byzps dense", "top1": "byzps Top-1 %"}


def config_dict(dim: int, workers: int, rounds: int, mode: str, noise: float = 0.0) -> dict:
    """The byzps run of one mode: quadratic task, n honest Byz-DM21 workers, f = 0, mean."""
    return {
        "run": {"seed": 0, "rounds": rounds, "eval_every": rounds},
        "task": {"name": "quadratic", "params": {"dim": dim, "noise": noise}},
        "cluster": {"workers": workers, "byzantine": 0},
        "algorithm": {"name": "byz-dm21", "lr": 0.1, "eta": 0.1},
        "compressor": dict(MODES[mode]),
        "aggregator": {"name": "mean"},
    }


def write_configs(directory: Path, dim: int, workers: int, rounds: int, noise: float) -> dict:
    """Write one validated TOML per mode; returns {mode: path}."""
    from byzps.common.catalog import check_components
    from byzps.common.config import RunConfig, to_toml

    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in MODES:
        data = config_dict(dim, workers, rounds, mode, noise)
        check_components(RunConfig.from_dict(data))
        paths[mode] = directory / f"byzps-{mode}.toml"
        paths[mode].write_text(to_toml(data))
    return paths


def seconds_per_round(closed: list[float], warmup: int) -> tuple[float, float]:
    """(last close − close of the last warm-up round) / rounds after the warm-up, and the median
    of those rounds' close-to-close times (less moved by a load spike)."""
    measured = len(closed) - warmup
    if warmup < 1 or measured < 1:
        raise ValueError(f"need ≥ 1 warm-up and ≥ 1 measured round, got {len(closed)} rounds")
    steps = [b - a for a, b in zip(closed[warmup - 1 : -1], closed[warmup:], strict=True)]
    return (closed[-1] - closed[warmup - 1]) / measured, statistics.median(steps)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Processes:
    """Every process this script starts, each in its own session; stop() ends them all."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        self.running.append(proc)
        return proc

    def stop(self, grace: float = 15.0) -> None:
        alive = [p for p in self.running if p.poll() is None]
        for p in alive:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in alive:
            _signal_group(p, signal.SIGKILL)  # the group too: a child left behind by p
            p.wait()
        self.running.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # its own session, so its group is its pid


def wait_for(proc: subprocess.Popen, deadline: float, what: str, log: Path) -> None:
    try:
        proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} ran past the time limit; log: {log}") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} exited {proc.returncode} (log {log}):\n{tail}")


def run_flower(args: argparse.Namespace, out: Path, procs: Processes) -> tuple[float, float]:
    """One Flower run (a server and n clients); returns s/round (mean, median)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port, rounds_log = free_port(), out / "rounds.jsonl"
    total = sum(args.rounds)
    deadline = time.monotonic() + args.timeout
    common = ["--port", str(port), "--dim", str(args.dim)]
    server = procs.start(
        [
            str(args.flower_python),
            str(FLOWER_SIDE),
            "server",
            *common,
            "--clients",
            str(args.workers),
            "--rounds",
            str(total),
            "--out",
            str(rounds_log),
        ],
        out / "server.log",
    )
    clients = [
        procs.start(
            [str(args.flower_python), str(FLOWER_SIDE), "client", *common, "--cid", str(i)],
            out / f"client-{i}.log",
        )
        for i in range(args.workers)
    ]
    wait_for(server, deadline, "the Flower server", out / "server.log")
    for i, c in enumerate(clients):
        try:
            c.wait(10)
        except subprocess.TimeoutExpired:
            print(f"  (Flower client {i} still running after the server ended; stopped)")
    procs.stop()
    records = [json.loads(line) for line in rounds_log.read_text().splitlines()]
    if len(records) != total or any(r["results"] != args.workers for r in records):
        raise RuntimeError(f"Flower ran {len(records)} of {total} rounds or lost clients: {out}")
    return seconds_per_round([r["closed"] for r in records], args.rounds[0])


def run_byzps(
    args: argparse.Namespace, config: Path, mode: str, out: Path, procs: Processes
) -> tuple[float, float]:
    """One `byzps launch`; returns s/round (mean, median) from its rounds.jsonl."""
    from byzps.cli.cluster import byzps_command

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    downlink = "dense" if mode == "dense" else "sparse"
    cmd = byzps_command(
        "launch", "--config", str(config), "--out", str(out), "--downlink", downlink
    )
    log = out.parent / f"{out.name}.launch.log"
    launcher = procs.start(cmd, log)
    wait_for(launcher, time.monotonic() + args.timeout, shlex.join(cmd), log)
    procs.stop()
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    total = sum(args.rounds)
    if len(records) != total or any(r["pushes"] != args.workers for r in records):
        raise RuntimeError(f"byzps ran {len(records)} of {total} rounds or missed pushes: {out}")
    return seconds_per_round([r["closed"] for r in records], args.rounds[0])


def as_int(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive integer: {text}")
    return int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"Make the Flower interpreter once with:\n  {FLOWER_VENV_COMMAND}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--flower-python", type=Path, help="python of a venv holding flwr (see the epilog)"
    )
    parser.add_argument("--dim", type=as_int, default=1_000_000, help="d (1e6 or 1e7 notation)")
    parser.add_argument("--workers", type=int, default=20, help="n: Flower clients, byzps workers")
    parser.add_argument("--rounds", type=int, nargs=2, default=[3, 10], metavar=("WARM", "N"))
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--noise", type=float, default=0.0, help="σ of byzps's quadratic gradient noise"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/byzps-bench-vs-flower"))
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument(
        "--write-configs", type=Path, metavar="DIR", help="write the byzps configs and exit"
    )
    args = parser.parse_args(argv)
    if args.rounds[0] < 1 or args.rounds[1] < 1:
        parser.error("--rounds: WARM and N must be at least 1")
    if args.write_configs is None:
        if args.flower_python is None:
            parser.error(f"--flower-python is required (make one: {FLOWER_VENV_COMMAND})")
        if not os.access(args.flower_python, os.X_OK):
            parser.error(f"--flower-python {args.flower_python}: not an executable")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    total = sum(args.rounds)
    if args.write_configs is not None:
        for path in write_configs(
            args.write_configs, args.dim, args.workers, total, args.noise
        ).values():
            print(path)
        return

    def terminated(signum, frame):  # SIGTERM: unwind through the finally below
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    flwr_version = subprocess.run(
        [str(args.flower_python), "-c", "import flwr; print(flwr.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if flwr_version.returncode != 0:
        sys.exit(f"{args.flower_python} cannot import flwr: make it with {FLOWER_VENV_COMMAND}")

    print("$ python " + shlex.join(["benchmarks/bench_vs_flower.py", *sys.argv[1:]]))
    print(
        f"d = {args.dim:,}, n = {args.workers}, {args.rounds[0]} warm-up + {args.rounds[1]} "
        f"measured rounds per run, {args.reps} repetitions; flwr "
        f"{flwr_version.stdout.strip()} (start_server/start_client, grpc-bidi); "
        f"{os.cpu_count()} CPUs, load average {load_average()}"
    )
    print(  # byzps launch's server and workers inherit these from this environment
        f"byzps durability: --wal-fsync {os.environ.get('BYZPS_WAL_FSYNC', 'group')}, worker "
        f"--checkpoint-fsync {os.environ.get('BYZPS_CHECKPOINT_FSYNC', 'every')}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    configs = write_configs(args.out, args.dim, args.workers, total, args.noise)
    systems = ["flower", *args.modes]
    times: dict[str, list[float]] = {s: [] for s in systems}
    procs = Processes()
    try:
        for rep in range(args.reps):
            for system in systems:
                out = args.out / f"rep{rep}-{system}"
                load = load_average()
                if system == "flower":
                    seconds, median = run_flower(args, out, procs)
                else:
                    seconds, median = run_byzps(args, configs[system], system, out, procs)
                times[system].append(seconds)
                label = "Flower" if system == "flower" else LABELS[system]
                line = (
                    f"rep {rep}  {label:<14} {seconds:8.3f} s/round (median round {median:.3f})"
                    f"   load before {load}"
                )
                if system != "flower":
                    line += f"   byzps/Flower {seconds / times['flower'][-1]:.2f}"
                print(line, flush=True)
    finally:
        procs.stop()

    flower = statistics.mean(times["flower"])
    print(f"\n{'system':<14} {'s/round (mean)':>15} {'per repetition':>30} {'byzps/Flower':>13}")
    for system in systems:
        mean = statistics.mean(times[system])
        reps = " ".join(f"{t:.3f}" for t in times[system])
        label = "Flower" if system == "flower" else LABELS[system]
        ratio = "" if system == "flower" else f"{mean / flower:.2f}x"
        print(f"{label:<14} {mean:15.3f} {reps:>30} {ratio:>13}".rstrip())
    for system in args.modes:
        mean = statistics.mean(times[system])
        print(f"{LABELS[system]}: {flower / mean:.2f}x Flower's speed (Flower / byzps)")


if __name__ == "__main__":
    main()
