"""A QSGD run over real gRPC (`byzps launch`: server, honest workers and the attack process on
127.0.0.1) ends on the parameters `byzps simulate` computes, with a finite, decreasing loss: the
packed updates decode on the server to the very values the workers' error feedback committed.

Needs `compressor.params` in the run config (to set QSGD's levels); skipped until it exists."""

from __future__ import annotations

import dataclasses
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import Processes, byzps, metrics
from configs import small_config

from byzps.common.config import CompressorSection, to_toml

pytestmark = pytest.mark.skipif(
    "params" not in {f.name for f in dataclasses.fields(CompressorSection)},
    reason="the run config has no compressor.params yet",
)


@pytest.mark.slow  # ~75 s: a simulated run and a launched cluster
def test_launch_with_qsgd_matches_simulate(tmp_path: Path) -> None:
    data = small_config(seed=7, rounds=20, eval_every=10, attack="bf")
    data["compressor"] = {"name": "qsgd", "params": {"levels": 4}}
    config = tmp_path / "run.toml"
    config.write_text(to_toml(data))
    sim = subprocess.run(
        byzps("simulate", "--config", str(config), "--out", str(tmp_path / "sim")),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    out = tmp_path / "net"
    procs = Processes()
    try:
        launch = procs.start(byzps("launch", "--config", str(config), "--out", str(out)),
                             log=tmp_path / "launch.log")  # fmt: skip
        assert launch.wait(timeout=180) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        procs.kill_all()
    expected, got = np.load(tmp_path / "sim" / "params.npy"), np.load(out / "params.npy")
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7)
    losses = [m["train_loss"] for m in metrics(out)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
