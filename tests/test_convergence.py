"""Byz-DM21 on a9a reaches the optimum of the L2 objective, under attack, through the simulator.

The optimum is computed here with L-BFGS on the full data, so the assertion is against the true
objective, not a recorded number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from byzps.common.config import RunConfig
from byzps.common.tasks.a9a import A9aLogRegTask
from byzps.sim.build import build_run_task, build_simulation

PAPER = {
    "run": {"seed": 0, "rounds": 10_000, "eval_every": 10_000},
    "task": {"name": "a9a-logreg", "batch_size": 1},
    "cluster": {"workers": 20, "byzantine": 8},
    "algorithm": {"name": "byz-dm21", "lr": 0.05, "eta": 0.01},
    "compressor": {"name": "topk", "k": 1},
    "aggregator": {"name": "cm", "pre": ["nnm"]},
    "attack": {"name": "alie"},
}


def config(**sections: dict) -> RunConfig:
    data = {key: dict(value) for key, value in PAPER.items()}
    for key, value in sections.items():
        data[key].update(value)
    return RunConfig.from_dict(data)


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
    gap = final_gap(task, optimum, config(attack={"name": attack}))
    assert 0.0 <= gap < 0.02, gap


def test_sign_flip_hurts_the_mean_more_than_nnm_cm(task: A9aLogRegTask, optimum: float) -> None:
    robust = final_gap(task, optimum, config(attack={"name": "sf"}))
    plain = final_gap(
        task, optimum, config(attack={"name": "sf"}, aggregator={"name": "mean", "pre": []})
    )
    assert plain > robust + 0.01, (plain, robust)
