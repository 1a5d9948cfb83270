"""The optimum of the a9a L2 objective (Newton's method in float64, byzps.common.tasks.a9a).

    python experiments/a9a/optimum.py [--runs runs/a9a]

Prints f* and, given a sweep directory, every run's final gap f(x_T) − f* (the distance to the
optimum that docs/results.md reports; runs made since evaluations record `loss_gap` carry it in
every metrics record too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from byzps.common.tasks.a9a import l2_optimum
from byzps.common.tasks.regularizers import DEFAULT_LAMBDA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="a sweep directory to list final gaps for")
    args = parser.parse_args()
    optimum = l2_optimum(DEFAULT_LAMBDA["l2"])
    print(f"f* = {optimum:.8f}")
    if args.runs is not None:
        for summary in sorted(args.runs.glob("*/summary.json")):
            final = json.loads(summary.read_text())["final"]["train_loss"]
            print(f"{summary.parent.name:60s} {final - optimum:+.5f}")


if __name__ == "__main__":
    main()
