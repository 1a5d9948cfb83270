"""benchmarks/bench_vs_flower.py: its byzps configs are valid runs, and (slow, with a Flower
interpreter) the whole benchmark runs end to end on a tiny workload.

The fast tests need no Flower. The slow one needs a venv holding flwr (protobuf < 7 conflicts
with byzps's pins, so it cannot live in this one): BYZPS_FLOWER_PYTHON, else
/tmp/flwr-venv/bin/python, made with the command in the benchmark's docstring.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench_support import load_benchmark
from optional import unavailable

from byzps.common.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_vs_flower.py"
FLOWER_PYTHON = Path(os.environ.get("BYZPS_FLOWER_PYTHON", "/tmp/flwr-venv/bin/python"))


def load_bench():
    return load_benchmark("bench_vs_flower")


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_names_the_flower_venv_command():
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    assert "pip install flwr==" in done.stdout
    assert "--flower-python" in done.stdout


def test_refuses_to_run_without_a_flower_interpreter(tmp_path):
    done = bench("--out", str(tmp_path))
    assert done.returncode == 2
    assert "--flower-python is required" in done.stderr
    done = bench("--flower-python", str(tmp_path / "absent"), "--out", str(tmp_path))
    assert done.returncode == 2
    assert "not an executable" in done.stderr


def test_configs_are_valid_byzps_runs(tmp_path):
    load_bench().main(["--write-configs", str(tmp_path), "--dim", "1e6", "--rounds", "3", "10"])
    dense = RunConfig.load(tmp_path / "byzps-dense.toml")
    top1 = RunConfig.load(tmp_path / "byzps-top1.toml")
    for run in (dense, top1):
        assert run.task.name == "quadratic" and run.task.params["dim"] == 1_000_000
        assert (run.cluster.workers, run.cluster.byzantine) == (20, 0)
        assert run.aggregator.name == "mean" and run.aggregator.pre == []
        assert run.run.rounds == 13
    assert dense.compressor.name == "identity"
    assert (top1.compressor.name, top1.compressor.ratio) == ("topk", 0.01)


@pytest.mark.slow
def test_configs_run_in_the_simulator(tmp_path):
    """The same configs, small, through `byzps simulate`: the components build and run."""
    load_bench().main(
        ["--write-configs", str(tmp_path), "--dim", "1000", "--workers", "4", "--rounds", "1", "2"]
    )
    for mode in ("dense", "top1"):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "byzps",
                "simulate",
                "--config",
                str(tmp_path / f"byzps-{mode}.toml"),
                "--out",
                str(tmp_path / mode),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert (tmp_path / mode / "params.npy").exists()


@pytest.mark.slow
def test_end_to_end_with_flower(tmp_path):
    if not os.access(FLOWER_PYTHON, os.X_OK):
        unavailable(f"no Flower interpreter at {FLOWER_PYTHON} (bench_vs_flower.py docstring)")
    done = bench(
        "--flower-python",
        str(FLOWER_PYTHON),
        "--dim",
        "10000",
        "--workers",
        "3",
        "--rounds",
        "1",
        "2",
        "--reps",
        "1",
        "--out",
        str(tmp_path),
        "--timeout",
        "300",
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"byzps dense: [0-9.]+x Flower's speed", done.stdout)
    assert re.search(r"byzps Top-1 %: [0-9.]+x Flower's speed", done.stdout)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout == "", "processes left running: " + leftovers.stdout
