"""Where aggregating only some columns stops paying: a rule's full call against the same rule
on a random share of the columns (`aggregate_columns`), timed in one run.

Usage:  python benchmarks/bench_column_share.py [--dims 1000000 10000000] [--workers 20]
        [--rules cm meamed mean] [--shares 0.05 0.18 0.4 0.6 0.8] [--repeats 3]

The server's incremental round (server/engine.py) recomputes ĝ on the union U of the columns a
round's messages touched, while |U| / d stays below the rule's `Aggregator.column_share`. This
prints, per rule and share, the time on the columns over the time of the full call (below 1:
the columns pay), and checks each partial result bitwise against the full call's entries. The
rows are random (20, d) float32, f = 8 for the robust rules; times are the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch
from timing import best_ms

from byzps.common.aggregators import build_aggregator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--rules", nargs="+", default=["cm", "meamed", "mean"])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.18, 0.4, 0.6, 0.8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("| d | rule | full call | " + " | ".join(f"{s:.0%}" for s in args.shares) + " |")
    print("|---|---|---|" + "---|" * len(args.shares))
    rng = np.random.default_rng(0)
    for d in args.dims:
        x = torch.from_numpy(rng.standard_normal((args.workers, d), dtype=np.float32))
        for name in args.rules:
            rule = build_aggregator(name, f=0 if name == "mean" else (args.workers - 1) // 2 - 1)
            full = rule(x)
            full_ms = best_ms(lambda rule=rule, x=x: rule(x), args.repeats)
            ratios = []
            for share in args.shares:
                chosen = rng.choice(d, max(1, int(share * d)), replace=False)
                columns = torch.from_numpy(np.sort(chosen))
                part = rule.aggregate_columns(x, columns)
                if part.numpy().tobytes() != full[columns].numpy().tobytes():
                    raise AssertionError(f"{name}: the columns' aggregate is not the full one's")
                ms = best_ms(lambda r=rule, c=columns, x=x: r.aggregate_columns(x, c), args.repeats)
                ratios.append(ms / full_ms)
            cells = " | ".join(f"{r:.2f}" for r in ratios)
            print(f"| {d:.0e} | {name} | {full_ms:.1f} ms | {cells} |")


if __name__ == "__main__":
    main()
