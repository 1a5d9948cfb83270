"""`byzps simulate`: outputs, determinism, and config errors that name the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from configs import write_config


def simulate(tmp_path: Path, out: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    config = write_config(
        tmp_path / "run.toml", seed=4, rounds=300, eval_every=100, workers=7, byzantine=2, k=2
    )
    args = [sys.executable, "-m", "byzps.cli.main", "simulate", "--config", str(config)]
    for override in overrides:
        args += ["--set", override]
    args += ["--out", str(tmp_path / out)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_writes_metrics_summary_and_params(tmp_path: Path) -> None:
    done = simulate(tmp_path, "a")
    assert done.returncode == 0, done.stderr
    records = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in records] == [0, 100, 200, 300]
    for key in (
        "train_loss",
        "test_loss",
        "test_accuracy",
        "grad_norm_sq",
        "bytes_uplink",
        "wall_seconds",
    ):
        assert all(key in r for r in records), key
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # every message, honest and Byzantine, over n: rounds × n × k × 8 B / n
    assert records[-1]["bytes_uplink"] == 300 * 7 * 2 * 8 / 7
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["rounds"] == 300
    assert summary["final"] == records[-1]
    assert summary["config"]["attack"]["name"] == "alie"
    params = np.load(tmp_path / "a" / "params.npy")
    assert params.shape == (123,) and params.dtype == np.float32


def test_same_seed_same_params_other_seed_differs(tmp_path: Path) -> None:
    for out, seed in (("a", 4), ("b", 4), ("c", 5)):
        done = simulate(tmp_path, out, f"run.seed={seed}")
        assert done.returncode == 0, done.stderr
    a, b, c = (np.load(tmp_path / o / "params.npy") for o in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("compressor.k=500", "compressor"),
        ('aggregator.name="median"', "aggregator"),
        ("attack.params.epsilon=0.1", "attack"),
        ("algorithm.params.bogus=1", "algorithm"),
        ("cluster.byzantine=4", "cluster.byzantine"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, override: str, key: str) -> None:
    done = simulate(tmp_path, "bad", override)
    assert done.returncode != 0
    assert key in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bad" / "params.npy").exists()


A9A = Path(__file__).resolve().parents[1] / "experiments" / "a9a" / "base.toml"


def test_single_run_speed_ups_keep_the_a9a_trajectory_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11's speed-ups of a single run (Top-k's batched select, the omniscient cohort's
    skipped shadows, the serial band_mean/combine kernels, numpy for the door's per-message
    checks, index_put_ for small scatters, rounds under inference mode, batch 1's product for
    the gradient's bmm) against the paths they bypass: the same x, bit for bit, on the paper's
    a9a setting (Byz-DM21, Top-1, NNM∘cm, omniscient ALIE)."""
    import torch

    from byzps.common import server_rules
    from byzps.common.aggregators import ops
    from byzps.common.attacks.cohort import ByzantineCohort
    from byzps.common.compressors import sparsifiers
    from byzps.common.config import RunConfig
    from byzps.common.tasks import a9a
    from byzps.common.tasks.a9a import A9aLogRegTask
    from byzps.sim.build import build_simulation

    config = RunConfig.load(A9A, [])
    rounds = 150

    def trajectory() -> list[torch.Tensor]:
        simulation = build_simulation(config)
        assert simulation.inference is A9aLogRegTask.analytic_gradients
        return [simulation.step().clone() for _ in range(rounds)] + [simulation.x.clone()]

    fast = trajectory()
    with monkeypatch.context() as slow:
        slow.setattr(ByzantineCohort, "runs_shadows", property(lambda self: True))
        slow.setattr(ops, "_single_chunk", lambda x: False)
        slow.setattr(server_rules, "_numpy_view", lambda t: False)
        slow.setattr(server_rules, "SMALL_SCATTER", -1)
        slow.setattr(sparsifiers, "_topk_select", sparsifiers._topk_sort)
        slow.setattr(A9aLogRegTask, "analytic_gradients", False)
        slow.setattr(a9a, "_weighted_rows", a9a._bmm_weighted_rows)
        reference = trajectory()
    for t, (a, b) in enumerate(zip(fast, reference, strict=True)):
        assert torch.equal(a, b), f"round {t}" if t < rounds else "final x"


def test_the_progress_line_shows_the_rate_since_the_last_evaluation() -> None:
    """A resumed run's first report is the round it resumed at: the rate counts from there, not
    from round 0 (which would count the rounds run before the kill as this process's)."""
    from byzps.cli.simulate import ProgressLine

    class Bar:
        label, pos = "", 0

        def update(self, n: int) -> None:
            self.pos += n

    now = [100.0]
    bar = Bar()
    line = ProgressLine(bar, clock=lambda: now[0])
    now[0] = 5000.0  # resumed at round 4000 after a long time
    line(4000, {"train_loss": 0.5})
    assert bar.pos == 4000 and "rounds/s" not in bar.label
    now[0] += 2.0
    line(4500, {"train_loss": 0.4, "test_accuracy": 0.8})
    assert bar.pos == 4500
    assert bar.label == "loss 0.40000 | acc 0.8000 | 250 rounds/s"
