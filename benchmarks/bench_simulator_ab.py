"""Two checkouts of byzps timed in lockstep: is a simulator change faster, on a noisy machine?

The project's machines are shared VMs whose speed drifts by 30-50 % within minutes (one a9a
round measured 0.39 to 0.60 ms in the same hour), so a benchmark run on the old tree and then
on the new one compares two moments as much as two trees. Here each tree runs in a process of
its own, both built and warmed up first; then they take turns, one block of rounds each, the
order alternating block by block, so that each old block has a new one right beside it in time.
Per tree it prints the median of its blocks (one a9a run, and R runs batched: issue 11's
batched/separate ratio), and per pair the ratio old / new, whose median drift cannot move much.

    python benchmarks/bench_simulator_ab.py --old /path/to/old/checkout [--new .]
        [--blocks 30] [--rounds 100] [--runs 16]

A checkout is a directory holding the byzps package (its repository root); each side imports
its own tree, and the a9a setting (experiments/a9a/base.toml) of its own tree. The side's
process is this script itself, run with `--side PATH`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def side(tree: Path, runs: int, rounds: int) -> None:
    """One tree's process: build one a9a run and a batch of `runs`, warm them, then answer each
    line on stdin with the ms a round of `rounds` rounds of each."""
    from byzps.common.components import build_run_task
    from byzps.common.config import RunConfig
    from byzps.sim.batched import build_batched_simulation
    from byzps.sim.build import build_simulation

    setting = tree / "experiments" / "a9a" / "base.toml"
    configs = [RunConfig.load(setting, [f"run.seed={seed}"]) for seed in range(runs)]
    tasks = [build_run_task(config) for config in configs]
    steps = (
        build_simulation(configs[0], tasks[0]).step,
        build_batched_simulation(configs, tasks).step,
    )
    for step in steps:
        for _ in range(rounds):
            step()
    from byzps.sim import batched

    print("ready", Path(batched.__file__).resolve().parents[1], flush=True)
    for _ in sys.stdin:
        times = []
        for step in steps:
            start = time.perf_counter()
            for _ in range(rounds):
                step()
            times.append((time.perf_counter() - start) / rounds * 1e3)
        print(*times, flush=True)


def start_side(
    name: str, tree: Path, links: Path, args: argparse.Namespace
) -> subprocess.Popen[str]:
    """The process of `tree`, importing it as `byzps` through a link in links/`name`."""
    home = links / name
    home.mkdir()
    (home / "byzps").symlink_to(tree.resolve(), target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(home))
    command = [sys.executable, str(HERE), "--side", str(tree), "--runs", str(args.runs)]
    command += ["--rounds", str(args.rounds)]
    process = subprocess.Popen(
        command, cwd=home, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    ready = process.stdout.readline().split()
    if ready[:1] != ["ready"]:
        raise SystemExit(f"{tree}: its side did not start (exit {process.wait()})")
    if Path(ready[1]) != tree.resolve():  # an installed byzps would shadow the link
        process.kill()
        raise SystemExit(f"{tree}: its side imported byzps from {ready[1]}")
    return process


def block(process: subprocess.Popen[str]) -> tuple[float, float]:
    """One block of rounds on that side: (ms a round alone, ms a batched round)."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("go\n")
    process.stdin.flush()
    single, batched = map(float, process.stdout.readline().split())
    return single, batched


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the checkout to compare against")
    parser.add_argument("--new", type=Path, default=HERE.parents[1], help="default: this one")
    parser.add_argument("--blocks", type=int, default=30, help="blocks per side")
    parser.add_argument("--rounds", type=int, default=100, help="rounds per block")
    parser.add_argument("--runs", type=int, default=16, help="runs in the batch (R)")
    parser.add_argument("--side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        side(args.side, args.runs, args.rounds)
        return
    if args.old is None:
        parser.error("--old is required")
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}  # the sides run elsewhere
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    sides: dict[str, subprocess.Popen[str]] = {}
    with tempfile.TemporaryDirectory() as links:
        try:  # inside: a side that fails to start stops the one already running too
            for name, tree in trees.items():
                sides[name] = start_side(name, tree, Path(links), args)
            for b in range(args.blocks):
                for name in ("old", "new") if b % 2 == 0 else ("new", "old"):
                    times[name].append(block(sides[name]))
        finally:
            for process in sides.values():
                if process.stdin is not None:
                    process.stdin.close()
                process.wait(timeout=60)
    print(f"$ python benchmarks/bench_simulator_ab.py {' '.join(argv or sys.argv[1:])}")
    print(f"{args.blocks} blocks of {args.rounds} rounds per side, alternating; R = {args.runs}")
    for name, tree in trees.items():
        single = statistics.median(s for s, _ in times[name])
        batched = statistics.median(b for _, b in times[name])
        print(
            f"{name}  {tree!s:40s} one run {single:.3f} ms/round, {args.runs} batched "
            f"{batched:.3f} ms/round, batched / separate {args.runs * single / batched:.2f}x"
        )
    for label, part in (("one run", 0), ("batched", 1)):
        pairs = [o[part] / n[part] for o, n in zip(times["old"], times["new"], strict=True)]
        print(
            f"old / new, {label}: median {statistics.median(pairs):.3f} "
            f"(pairs from {min(pairs):.3f} to {max(pairs):.3f})"
        )


if __name__ == "__main__":
    main()
