"""Byz-DM21 on a9a reaches the optimum of the L2 objective, under attack, through the simulator.

The optimum is computed here with L-BFGS on the full data, so the assertion is against the true
objective, not a recorded number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.common.tasks.a9a import A9aLogRegTask
from byzps.sim.build import build_simulation

#: The paper's a9a setting as the experiment grid runs it (n = 20, f = 8, batch 1, Top-1, η = 0.01,
#: NNM∘cm, ALIE), here for 10 000 rounds at γ = 0.05.
PAPER = Path(__file__).resolve().parents[1] / "experiments" / "a9a" / "base.toml"


def config(*overrides: str) -> RunConfig:
    return RunConfig.load(PAPER, ["run.rounds=10000", "algorithm.lr=0.05", *overrides])


@pytest.fixture(scope="module")
def task() -> A9aLogRegTask:
    return build_run_task(config())  # type: ignore[return-value]


@pytest.fixture(scope="module")
def optimum(task: A9aLogRegTask) -> float:
    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.from_numpy(x).float()
        return float(task.loss(xt)), task.full_gradient(xt).double().numpy()

    result = minimize(
        objective,
        np.zeros(task.dim),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-9, "maxiter": 5000},
    )
    assert result.success, result.message
    return float(result.fun)


def final_gap(task: A9aLogRegTask, optimum: float, run: RunConfig) -> float:
    simulation = build_simulation(run, task)
    for _ in range(run.run.rounds):
        simulation.step()
    return float(task.loss(simulation.x)) - optimum


@pytest.mark.parametrize("attack", ["na", "alie"])
def test_dm21_with_nnm_cm_reaches_the_optimum(
    task: A9aLogRegTask, optimum: float, attack: str
) -> None:
    gap = final_gap(task, optimum, config(f'attack.name="{attack}"'))
    assert 0.0 <= gap < 0.02, gap


def test_sign_flip_hurts_the_mean_more_than_nnm_cm(task: A9aLogRegTask, optimum: float) -> None:
    robust = final_gap(task, optimum, config('attack.name="sf"'))
    plain = final_gap(
        task, optimum, config('attack.name="sf"', 'aggregator.name="mean"', "aggregator.pre=[]")
    )
    assert plain > robust + 0.01, (plain, robust)
