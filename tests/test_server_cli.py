"""`byzps server` and `byzps status` as processes: config errors, a whole tiny run to its
results and exit 0, health and reflection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_support import Client, N, random_update, server_command, server_process, write_config


@pytest.mark.parametrize(
    ("override", "key"),
    [("compressor.ratoi=0.1", "compressor.ratoi"), ("cluster.byzantine=3", "cluster.byzantine")],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, override: str, key: str) -> None:
    config = write_config(tmp_path)
    done = subprocess.run(
        [*server_command(config, "--listen", "127.0.0.1:0", "--no-auth"), "--set", override],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert key in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_missing_secret_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "BYZPS_SECRET"}
    done = subprocess.run(
        server_command(config, "--listen", "127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 2 and "secret" in done.stderr


BYZPS = [sys.executable, "-m", "byzps.cli.main"]


def test_a_whole_run_writes_results_and_exits_0(tmp_path: Path) -> None:
    config = write_config(tmp_path, rounds=3, eval_every=2)
    out = tmp_path / "out"
    # A round closes only when all N pushed (not at a deadline while status runs).
    with server_process(
        config, "--out", str(out), "--linger", "0.5", "--round-deadline", "600"
    ) as srv:
        client = Client(srv.address, secret=None)
        with grpc.insecure_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="byzps.v1.ParameterServer"), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            services = {s.name for s in next(stream).list_services_response.service}
            assert "byzps.v1.ParameterServer" in services
        for w in range(N):
            client.register(str(w))
        gen = torch.Generator().manual_seed(0)
        for r in range(2):
            for w in range(N):
                client.push(str(w), r, r + 1, random_update(gen))
        # Asked mid-run: once the last round closes the server only lingers briefly.
        status, as_json = (
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "byzps.cli.main",
                    "status",
                    "--server",
                    srv.address,
                    *json_flag,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for json_flag in ([], ["--json"])
        )
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("round 2/3 (running)")
        # --no-auth: every caller is the operator, so the suspicion line and column are shown
        assert status.stdout.splitlines()[1].startswith("most discounted by the rule (suspicion)")
        assert len(status.stdout.splitlines()) == 3 + N
        record = json.loads(as_json.stdout)
        assert (record["round"], record["rounds"], record["finished"]) == (2, 3, False)
        assert [w["worker_id"] for w in record["workers"]] == [str(w) for w in range(N)]
        assert len(record["suspicion"]) == N and all(0 <= v <= 1 for v in record["suspicion"])
        for w in range(N):
            client.push(str(w), 2, 3, random_update(gen))
        round, x = client.model(known_round=2, wait=True, timeout=10)
        assert round == 3
        client.close()
        assert srv.proc.wait(30) == 0  # exits by itself once the linger time passed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 2, 3]
    assert records[-1]["bytes_uplink"] == 3 * N * 8 / N  # Top-1 float32: 8 B per message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final"] == records[-1]
    assert np.array_equal(np.load(out / "params.npy"), x.numpy())
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt"))
