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
