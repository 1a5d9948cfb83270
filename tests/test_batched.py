"""A batch of runs (sim/batched.py) computes, bit for bit, what each of its runs computes alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from configs import small_config

from byzps.common.components import build_run_task
from byzps.common.config import ConfigError, RunConfig
from byzps.sim.batched import batch_key, build_batched_simulation
from byzps.sim.build import build_simulation
from byzps.sim.runner import run_batch, run_simulation

SEEDS_AND_LRS = [(0, 0.5), (1, 0.05), (2, 0.5), (0, 0.005)]


def variant(**changes: Any) -> dict[str, dict[str, Any]]:
    """small_config (n = 5, f = 1, a9a, Byz-DM21, Top-1, NNM∘cm, ALIE), 30 rounds, with
    `changes` as section → {key: value} updates."""
    config = small_config(rounds=30, eval_every=10, workers=7, byzantine=2)
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    return config


CASES = {
    "dm21-alie-nnm-cm": variant(),
    "vr-dm21-ipm-nnm-cwtm-shuffle-honest": variant(
        algorithm={"name": "byz-vr-dm21"},
        attack={"name": "ipm"},
        aggregator={"name": "cwtm"},
        task={"sampling": "shuffle", "split_over": "honest", "batch_size": 2},
    ),
    "ef21-sgdm-sf-nnm-gm": variant(algorithm={"name": "byz-ef21-sgdm"}, attack={"name": "sf"}),
    "ef21-lf-cm-alone": variant(
        algorithm={"name": "byz-ef21"}, attack={"name": "lf"}, aggregator={"pre": []}
    ),
    "csgd-randk-alie-cohort": variant(
        algorithm={"name": "br-csgd"},
        compressor={"name": "randk", "k": 3},
        attack={"name": "alie", "knowledge": "cohort"},
    ),
    "no-attack": variant(attack={"name": "na"}),
    # Rows of norm 1e30 make nnm's mean-centred Gram imprecise: the runs are aggregated one by
    # one (aggregators/runs.NotBatched) in the rounds where they are.
    "dm21-scale-nnm-meamed": variant(
        attack={"name": "scale", "params": {"magnitude": 1e30}}, aggregator={"name": "meamed"}
    ),
    # ±FLT_MAX pushes: the door refuses every member's second push on in every run, which
    # the batch then counts and leaves out run by run.
    "dm21-overflow-cm": variant(attack={"name": "overflow"}, aggregator={"pre": []}),
    # Perm-K's permutation is shared by a run's workers: each run's rows get their own.
    "dm21-permk": variant(compressor={"name": "permk", "k": None}),
    "quadratic-gauss": variant(
        task={"name": "quadratic", "params": {"dim": 40, "noise": 0.5}},
        attack={"name": "gauss"},
        compressor={"k": 4},
    ),
}


def configs_of(case: dict, pairs=SEEDS_AND_LRS) -> list[RunConfig]:
    configs = []
    for seed, lr in pairs:
        data = copy.deepcopy(case)
        data["run"]["seed"] = seed
        data["algorithm"]["lr"] = lr
        configs.append(RunConfig.from_dict(data))
    return configs


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall times (the only field a batch may change)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_seconds"} for line in lines]


def run_alone(config: RunConfig, out: Path) -> None:
    task = build_run_task(config)
    run_simulation(config, task, build_simulation(config, task), out)


def run_batched(configs: list[RunConfig], outs: list[Path]) -> None:
    tasks = [build_run_task(c) for c in configs]
    run_batch(configs, tasks, build_batched_simulation(configs, tasks), outs)


def assert_same_runs(configs: list[RunConfig], tmp_path: Path) -> None:
    alone = [tmp_path / f"alone{i}" for i in range(len(configs))]
    together = [tmp_path / f"batch{i}" for i in range(len(configs))]
    for config, out in zip(configs, alone, strict=True):
        run_alone(config, out)
    run_batched(configs, together)
    for a, b in zip(alone, together, strict=True):
        assert records(a) == records(b), a.name
        assert np.load(a / "params.npy").tobytes() == np.load(b / "params.npy").tobytes()
        digests = [json.loads((o / "summary.json").read_text())["config_digest"] for o in (a, b)]
        assert digests[0] == digests[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_batch_equals_its_runs_alone_bit_for_bit(case: str, tmp_path: Path) -> None:
    assert_same_runs(configs_of(CASES[case]), tmp_path)


def test_a_shared_coin_batches_over_lr_only(tmp_path: Path) -> None:
    """DASHA-PAGE's run-wide coin: one seed per batch, lrs may differ."""
    case = variant(algorithm={"name": "byz-dasha-page"}, compressor={"name": "randk", "k": 3})
    assert_same_runs(configs_of(case, [(1, 0.5), (1, 0.05)]), tmp_path)
    with pytest.raises(ConfigError, match="run-wide coins"):
        configs = configs_of(case, [(0, 0.5), (1, 0.5)])
        build_batched_simulation(configs, [build_run_task(c) for c in configs])


def test_a_diverging_run_stops_alone_and_the_others_go_on(tmp_path: Path) -> None:
    """lr = 1e30 overflows within a few rounds: that run's final record is its divergence, as
    alone; the batch's other runs finish all their rounds, as alone."""
    configs = configs_of(variant(), [(0, 1e30), (1, 0.05), (3, 0.5)])
    assert_same_runs(configs, tmp_path)
    first = records(tmp_path / "batch0")[-1]
    assert "diverged" in first and first["round"] < 30
    assert records(tmp_path / "batch1")[-1]["round"] == 30


def test_only_seed_and_lr_may_differ() -> None:
    one, other = configs_of(variant(), [(0, 0.5), (1, 0.05)])
    assert batch_key(one) == batch_key(other)
    changed = RunConfig.from_dict(variant(algorithm={"eta": 0.5}))
    assert batch_key(changed) != batch_key(one)
    tasks = [build_run_task(c) for c in (one, changed)]
    with pytest.raises(ConfigError, match=r"only in run\.seed and algorithm\.lr"):
        build_batched_simulation([one, changed], tasks)
    marina = RunConfig.from_dict(
        variant(algorithm={"name": "byz-vr-marina"}, compressor={"name": "randk"})
    )
    with pytest.raises(ConfigError, match="reads the aggregate"):
        build_batched_simulation([marina], [build_run_task(marina)])


@pytest.mark.parametrize(
    ("case", "batched_rounds"),
    [("dm21-alie-nnm-cm", range(25, 30)), ("dm21-scale-nnm-meamed", range(0, 1))],
)
def test_the_runs_are_aggregated_in_one_call_unless_one_needs_its_own(
    case: str, batched_rounds: range, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's band rules aggregate all runs at once (aggregators/runs.py), and fall back to
    one call per run in rounds where some run's inputs need it: round 0 here, where a run's
    rows coincide (its Gram is then recentred on the median), and under the 1e30 rows of the
    scale attack."""
    from byzps.common.aggregators.rule import RowsAggregator
    from byzps.common.aggregators.runs import NotBatched

    outcomes: list[str] = []
    batched = RowsAggregator.aggregate_runs

    def counted(self: RowsAggregator, x: Any) -> Any:
        try:
            result = batched(self, x)
        except NotBatched:
            outcomes.append("refused")
            raise
        outcomes.append("batched")
        return result

    monkeypatch.setattr(RowsAggregator, "aggregate_runs", counted)
    configs = configs_of(CASES[case])
    batch = build_batched_simulation(configs, [build_run_task(c) for c in configs])
    for _ in range(30):
        batch.step()
    assert len(outcomes) == 30 and outcomes[0] == "refused"
    assert outcomes.count("batched") in batched_rounds
