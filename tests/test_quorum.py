"""cluster.quorum: a run with f = 0 survives a dead worker when its quorum allows it.

A round closes when every registered worker has pushed, or when `quorum` have and its deadline
has passed. The default quorum is n − f, so with f = 0 one worker that registered and then died
would stall the run forever (tests/test_server_rounds.py shows the stall with a hand-moved
clock); `cluster.quorum = n − 1` lets each round close at its deadline without it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cluster_helpers import Processes, byzps, wait_listening
from configs import small_config, write_config
from server_support import Client

from byzps.common.config import ConfigError, RunConfig

ROUNDS = 8


def test_quorum_defaults_to_n_minus_f_and_is_checked() -> None:
    assert RunConfig.from_dict(small_config(workers=5, byzantine=1)).quorum == 4
    config = small_config(workers=5, byzantine=1)
    config["cluster"]["quorum"] = 2
    assert RunConfig.from_dict(config).quorum == 2
    for bad in (0, 6):
        config["cluster"]["quorum"] = bad
        with pytest.raises(ConfigError, match=r"^cluster.quorum: must be in \[1, n = 5\]"):
            RunConfig.from_dict(config)


def test_a_run_without_byzantine_workers_survives_a_dead_worker(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.toml", rounds=ROUNDS, workers=3, byzantine=0, attack="na", pre=()
    )
    out = tmp_path / "out"
    processes = Processes()
    try:
        # Round 0 opens once all three have registered (the startup timeout is only a backstop),
        # so every round has the same cast: two live workers and one that registered and died.
        server = processes.start(
            byzps("server", "--config", str(config), "--set", "cluster.quorum=2",
                  "--listen", "127.0.0.1:0", "--no-auth", "--out", str(out),
                  "--startup-timeout", "120", "--round-deadline", "0.2", "--linger", "0.5"),
            stdout=subprocess.PIPE, stderr=(tmp_path / "server.log").open("wb"),
        )  # fmt: skip
        address = wait_listening(server)
        dead = Client(address, secret=None)
        dead.register("2")  # worker 2 registers, then never pushes
        dead.close()
        for worker in ("0", "1"):
            processes.start(
                byzps("worker", "--server", address, "--id", worker, "--retry-timeout", "20"),
                log=tmp_path / f"worker-{worker}.log",
            )
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()
    finally:
        processes.kill_all()
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["pushes"] == 2 for r in rounds)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
