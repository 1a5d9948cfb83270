"""What each run adds to a batched round: the phases of a batched a9a round timed at several
batch sizes R, their cost per run (the slope over R) and per round (the intercept), and what
issue 11's ≥ 10× goal asks of them.

    python benchmarks/bench_batch_slope.py [--runs 4 8 16] [--rounds 300] [--repeats 5]

A batched round's time is T(R) ≈ o + R·c: o is paid once a round (Python dispatch, torch and
numba call overheads), c by every run (its rows' arithmetic, and any loop over runs). R separate
runs take R·T₁, where T₁ = one run's `Simulation.step`, so the throughput gain is
R·T₁ / (o + R·c), and ≥ 10× at R = 16 needs c ≤ (1.6·T₁ − o) / 16. Cutting o and T₁ alike (a
leaner round for both) lowers the gain; only c counts. This prints c and o per phase, fitted by
least squares over `--runs`, the T₁ measured in the same process, and the bound on c. Keep the
sizes at or below 16: at R = 32 the stacked rows pass torch's parallel grain size, its elementwise
ops start a second thread, and the line bends.

The phases are the batch's own calls (`BatchedSimulation._step` is not copied): the honest
workers' messages, the door's checks, the absorbs, the Byzantine cohort's round (its own door
and absorb calls counted in those), the runs' aggregation, each engine's close and the cohort's.
Each is timed exclusive of the phases it calls. The a9a setting is experiments/a9a/base.toml.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import block_seconds, interleaved_blocks

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.sim.batched import BatchedSimulation, build_batched_simulation
from byzps.sim.build import build_simulation

SETTING = Path(__file__).resolve().parents[1] / "experiments" / "a9a" / "base.toml"
PHASES = ("messages", "door", "absorb", "byzantine", "aggregate", "close", "cohort close")
#: The batch-size ratio of issue 11's goal, and the gain it asks for.
GOAL_RUNS, GOAL_GAIN = 16, 10.0


class PhaseClock:
    """Exclusive wall time per phase: a phase called inside another is taken out of the outer
    one's time, so the phases add up to the time spent in any of them."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._inner: list[float] = []

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = self._inner.pop()
                self.seconds[phase] += spent - inner
                if self._inner:
                    self._inner[-1] += spent

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)


def clocked(batch: BatchedSimulation) -> PhaseClock:
    """Wrap the batch's phase calls on its instances (the classes stay as they are)."""
    clock = PhaseClock()
    batch.honest.message = clock.wrap("messages", batch.honest.message)  # type: ignore[method-assign]
    batch.door.refused_rows = clock.wrap("door", batch.door.refused_rows)  # type: ignore[method-assign]
    batch._absorb = clock.wrap("absorb", batch._absorb)  # type: ignore[method-assign]
    batch._byzantine_round = clock.wrap("byzantine", batch._byzantine_round)  # type: ignore[method-assign]
    batch._aggregate_runs = clock.wrap("aggregate", batch._aggregate_runs)  # type: ignore[method-assign]
    for engine in batch.engines:
        engine.close_round = clock.wrap("close", engine.close_round)  # type: ignore[method-assign]
    if batch.cohort is not None:
        batch.cohort.close_round = clock.wrap("cohort close", batch.cohort.close_round)  # type: ignore[method-assign]
    return clock


def configs(runs: int) -> list[RunConfig]:
    return [RunConfig.load(SETTING, [f"run.seed={seed}"]) for seed in range(runs)]


def interleaved_us(steps: dict[Any, Callable[[], None]], rounds: int, repeats: int) -> dict:
    """Median µs a round of each step over `repeats` blocks of `rounds` rounds, the steps taking
    turns block by block (`timing.interleaved_blocks`, after a warm-up block each)."""
    times = interleaved_blocks(steps, rounds, repeats, warmup=rounds)
    return {key: statistics.median(block) * 1e6 for key, block in times.items()}


def phase_split(
    batches: dict[int, BatchedSimulation], rounds: int, repeats: int
) -> dict[int, dict[str, float]]:
    """Per batch size, µs a round of each phase, with the wrappers on (`clocked`), and "other":
    the wrapped round's time outside every phase (the wrappers' own cost included); medians
    over `repeats` blocks, the batches taking turns."""
    clocks = {runs: clocked(batch) for runs, batch in batches.items()}
    for batch in batches.values():
        block_seconds(batch.step, rounds)
    blocks = {runs: {name: [] for name in (*PHASES, "other")} for runs in batches}
    for _ in range(repeats):
        for runs, batch in batches.items():
            clock = clocks[runs]
            clock.reset()
            wrapped = block_seconds(batch.step, rounds) * 1e6
            parts = {name: seconds / rounds * 1e6 for name, seconds in clock.seconds.items()}
            parts["other"] = wrapped - sum(parts.values())
            for name, value in parts.items():
                blocks[runs][name].append(value)
    return {
        runs: {name: statistics.median(values) for name, values in split.items()}
        for runs, split in blocks.items()
    }


def fit(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (sizes, values)."""
    slope, intercept = statistics.linear_regression(sizes, values)
    return intercept, slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=300, help="rounds per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per batch size")
    args = parser.parse_args(argv)
    if len(set(args.runs)) < 2:
        parser.error("--runs needs at least two different batch sizes to fit a line")
    print("$ python " + shlex.join(sys.argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {SETTING.name}")
    batches = {}
    for runs in sorted(set(args.runs)):
        cs = configs(runs)
        batches[runs] = build_batched_simulation(cs, [build_run_task(c) for c in cs])
    config = configs(1)[0]
    alone = build_simulation(config, build_run_task(config))
    steps: dict[Any, Callable[[], None]] = {runs: b.step for runs, b in batches.items()}
    rounds_us = interleaved_us({**steps, "alone": alone.step}, args.rounds, args.repeats)
    single = rounds_us.pop("alone")
    profiles = phase_split(batches, args.rounds, args.repeats)
    for runs, profile in profiles.items():
        profile["round"] = rounds_us[runs]
    sizes = sorted(profiles)
    header = " | ".join(f"R = {r}" for r in sizes)
    print(f"| phase | {header} | per round (o) | per run (c) |")
    print("|---|" + "---|" * len(sizes) + "---|---|")
    lines: dict[str, tuple[float, float]] = {}
    for name in (*PHASES, "other", "round"):
        values = [profiles[r][name] for r in sizes]
        lines[name] = fit(sizes, values)
        cells = " | ".join(f"{v:.1f}" for v in values)
        o, c = lines[name]
        print(f"| {name} | {cells} | {o:.1f} µs | {c:.2f} µs |")
    o, c = lines["round"]
    gain = GOAL_RUNS * single / (o + GOAL_RUNS * c)
    fixed = (GOAL_RUNS * single / GOAL_GAIN - o) / GOAL_RUNS
    # A cut of c is work a run alone does too, so it lowers T₁ as well: R(T₁ − Δ) ≥ G(o + R(c − Δ)).
    shared = c - (GOAL_GAIN * (o + GOAL_RUNS * c) - GOAL_RUNS * single) / (
        GOAL_RUNS * (GOAL_GAIN - 1)
    )
    if GOAL_RUNS in profiles:
        measured = GOAL_RUNS * single / profiles[GOAL_RUNS]["round"]
        print(f"measured at R = {GOAL_RUNS}: {measured:.2f}x the throughput of separate runs")
    print(
        f"one run alone: T₁ = {single:.1f} µs a round. At R = {GOAL_RUNS} the fitted line gives"
        f" {GOAL_RUNS} × {single:.1f} / ({o:.1f} + {GOAL_RUNS} × {c:.2f}) = {gain:.2f}x."
        f" {GOAL_GAIN:.0f}x needs c ≤ {fixed:.2f} µs a run with T₁ as it is, or c ≤ {shared:.2f}"
        f" µs where the cut is work a run alone does too (T₁ falls with it); the runs'"
        f" aggregation alone is {lines['aggregate'][1]:.2f} µs of c."
    )


if __name__ == "__main__":
    main()
