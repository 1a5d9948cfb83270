"""Short simulated a9a runs (Byz-DM21, the `state` rule, ALIE against CM∘NNM) with each compressor
of issue 13: every one finishes with a finite loss below the initial one.

The run config names Top-k (the config has no parameters for the new compressors yet), and the
compressor object is then swapped into the honest estimator and the cohort's shadow, which is all
that reads it."""

from __future__ import annotations

import math

import pytest
from configs import small_config

from byzps.common.components import build_run_task
from byzps.common.compressors import build_compressor
from byzps.common.config import RunConfig
from byzps.sim.build import build_simulation

ROUNDS = 60
RUNS = {
    "qsgd": {"levels": 4},
    "natural": {},
    "natural-dithering": {"levels": 4},
    "sign": {},
    "permk": {},
    "topk": {"k": 10, "values": "float16"},
    "randk": {"k": 10, "values": "bfloat16"},
}


@pytest.mark.parametrize("name", list(RUNS))
def test_byz_dm21_runs_and_the_loss_decreases(name: str) -> None:
    config = RunConfig.from_dict(small_config(rounds=ROUNDS, lr=0.5, eta=0.5))
    task = build_run_task(config)
    sim = build_simulation(config, task)
    comp = build_compressor(name, task.dim, num_workers=config.cluster.workers, **RUNS[name])
    sim.honest.compressor = comp
    assert sim.cohort is not None and sim.engine.rule.name == "state"
    sim.cohort.shadow.compressor = comp
    start = task.loss(sim.x)
    for _ in range(ROUNDS):
        sim.step()
    end = task.loss(sim.x)
    assert math.isfinite(end) and end < start - 0.05, (start, end)
