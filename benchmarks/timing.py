"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this
module is importable as `timing`)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any


def call_times_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of `repeats` calls of `fn()` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` calls, after one warm-up call."""
    return statistics.median(call_times_ms(fn, repeats))


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls of `fn()`, in ms, after one warm-up call."""
    return min(call_times_ms(fn, repeats))


def block_seconds(step: Callable[[], object], calls: int) -> float:
    """Seconds per call over `calls` calls of `step()` in a row."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def interleaved_blocks(
    steps: Mapping[Any, Callable[[], object]], calls: int, blocks: int, warmup: int
) -> dict[Any, list[float]]:
    """Seconds per call of each of `steps` in each of `blocks` blocks of `calls` calls, after
    `warmup` calls of each: the steps take turns block by block, so that a machine whose speed
    drifts slows all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[Any, list[float]] = {key: [] for key in steps}
    for _ in range(blocks):
        for key, step in steps.items():
            times[key].append(block_seconds(step, calls))
    return times


def as_the_daemons_run(dim: int | None = None) -> None:
    """Run this script's process as the byzps daemons run their own (byzps.cli.daemon_common):
    re-run it with OMP_WAIT_POLICY=PASSIVE unless that is set (`quiet_idle_threads`: spinning
    OpenMP threads would otherwise slow the benchmark's own gRPC threads), and keep freed memory
    in the heap (`keep_freed_memory`: large buffers reused instead of mapped and zero-filled anew
    each round), up to the server's largest block at dimension `dim` where one is given
    (`server_heap_blocks`). Must run before any timing; torch may be imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    from byzps.cli.daemon_common import HEAP_BLOCKS, keep_freed_memory, server_heap_blocks

    keep_freed_memory(HEAP_BLOCKS if dim is None else server_heap_blocks(dim))
