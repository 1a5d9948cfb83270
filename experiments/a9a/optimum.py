"""The optimum of the a9a L2 objective, by L-BFGS on the full training data (float64).

    python experiments/a9a/optimum.py [--runs runs/a9a]

Prints f* and, given a sweep directory, every run's final gap f(x_T) − f* (the distance to the
optimum that docs/results.md reports).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from byzps.common.tasks import DataSpec
from byzps.common.tasks.a9a import A9aLogRegTask


def l2_optimum() -> float:
    task = A9aLogRegTask(data=DataSpec(num_workers=1, seed=0), regularizer="l2", dtype="float64")

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.from_numpy(x)
        return float(task.loss(xt)), task.full_gradient(xt).numpy()

    result = minimize(
        objective,
        np.zeros(task.dim),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "maxiter": 10_000},
    )
    if not result.success:
        raise SystemExit(f"L-BFGS did not converge: {result.message}")
    return float(result.fun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="a sweep directory to list final gaps for")
    args = parser.parse_args()
    optimum = l2_optimum()
    print(f"f* = {optimum:.8f}")
    if args.runs is not None:
        for summary in sorted(args.runs.glob("*/summary.json")):
            final = json.loads(summary.read_text())["final"]["train_loss"]
            print(f"{summary.parent.name:60s} {final - optimum:+.5f}")


if __name__ == "__main__":
    main()
