"""The gRPC cluster end to end: real server, worker and attack processes on 127.0.0.1.

* `byzps launch` reproduces `byzps simulate` (same params.npy up to float rounding);
* a worker killed with SIGKILL does not stop the run (rounds close by the deadline);
* a server killed with SIGKILL and restarted with --resume loses no acknowledged update and
  applies none twice, and the workers finish against it;
* launch leaves no process behind, after a normal end or after SIGINT.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import configs
import numpy as np
import pytest
from cluster_helpers import (
    Processes,
    byzps,
    ledger_seqs,
    leftovers,
    log_digest,
    metrics,
    pid_of,
    wait_for,
    wait_listening,
    write_config,
)

from byzps.common.config import to_toml


def simulate(config: Path, out: Path) -> np.ndarray:
    done = subprocess.run(
        byzps("simulate", "--config", str(config), "--out", str(out)),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return np.load(out / "params.npy")


def launch(config: Path, out: Path, procs: Processes) -> np.ndarray:
    """`byzps launch` the run into `out` (its log beside it) and return its params.npy."""
    log = out.parent / "launch.log"
    started = procs.start(byzps("launch", "--config", str(config), "--out", str(out)), log=log)
    assert started.wait(timeout=180) == 0, log.read_text()[-3000:]
    return np.load(out / "params.npy")


def test_launch_reproduces_simulate(tmp_path: Path, procs: Processes) -> None:
    config = write_config(tmp_path / "run.toml", rounds=60)
    expected = simulate(config, tmp_path / "sim")
    out = tmp_path / "net"
    got = launch(config, out, procs)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    print(f"launch vs simulate: relative error {rel:.3e}")
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7), rel
    sim_final, net_final = metrics(tmp_path / "sim")[-1], metrics(out)[-1]
    assert net_final["round"] == sim_final["round"] == 60
    assert net_final["train_loss"] == pytest.approx(sim_final["train_loss"], rel=1e-5)
    assert net_final["bytes_uplink"] == sim_final["bytes_uplink"]
    # The same states, aggregated by the same rule: the same suspicion scores.
    assert net_final["suspicion"] == pytest.approx(sim_final["suspicion"], abs=0.01)
    assert (out / "secret").stat().st_mode & 0o777 == 0o600
    assert {p.name for p in (out / "logs").iterdir()} >= {"server.log", "worker-0.log",
                                                          "attack.log"}  # fmt: skip
    assert leftovers(str(tmp_path)) == []


def test_launch_reproduces_simulate_under_the_authors_protocol(
    tmp_path: Path, procs: Processes
) -> None:
    """Shuffled batches that cross a pass (60 rounds × 200 rows > a shard of 8 140 rows) and the
    data split over the 4 honest workers, under label flipping: the worker daemons and the
    cohort map ids to shards and draw batches exactly as the simulator does."""
    run = configs.small_config(seed=7, rounds=60, eval_every=60, k=2, attack="lf")
    run["task"] |= {"batch_size": 200, "sampling": "shuffle", "split_over": "honest"}
    config = tmp_path / "run.toml"
    config.write_text(to_toml(run))
    expected = simulate(config, tmp_path / "sim")
    assert np.allclose(launch(config, tmp_path / "net", procs), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # a run long enough to kill a worker in
def test_a_killed_worker_does_not_stop_the_run(tmp_path: Path, procs: Processes) -> None:
    config = write_config(tmp_path / "run.toml", rounds=16, eval_every=2)
    out = tmp_path / "net"
    launch = procs.start(
        byzps("launch", "--config", str(config), "--out", str(out), "--round-deadline", "1"),
        log=tmp_path / "launch.log",
    )
    wait_for(lambda: any(r["round"] >= 4 for r in metrics(out)), 120, "round 4")
    victim = pid_of(str(out), "worker", "--id 1 ")
    os.kill(victim, signal.SIGKILL)
    assert launch.wait(timeout=180) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    records = metrics(out)
    assert records[-1]["round"] == 16
    assert math.isfinite(records[-1]["train_loss"])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert "worker-1 exited with code -9" in (tmp_path / "launch.log").read_text()
    assert leftovers(str(tmp_path)) == []


def test_launch_stops_everything_on_sigint(tmp_path: Path, procs: Processes) -> None:
    config = write_config(tmp_path / "run.toml", rounds=100000, eval_every=10)
    out = tmp_path / "net"
    launch = procs.start(byzps("launch", "--config", str(config), "--out", str(out)),
                         log=tmp_path / "launch.log")  # fmt: skip
    wait_for(lambda: any(r["round"] >= 10 for r in metrics(out)), 120, "round 10")
    assert len(leftovers(str(out))) >= 6  # launch, server, 4 workers, attack
    launch.send_signal(signal.SIGINT)
    assert launch.wait(timeout=60) == 128 + signal.SIGINT
    assert leftovers(str(tmp_path)) == []


def status(address: str, secret: bytes) -> dict[str, int]:
    """The server's per-worker last_seq (listed for callers with a credential: worker 0's)."""
    from byzps.worker.client import ParameterServerClient, RetryPolicy, ServerUnreachable

    retry = RetryPolicy(give_up_after=1.0)
    try:
        with ParameterServerClient(address, "0", secret, retry=retry) as c:
            reply = c.status()
    except ServerUnreachable:
        return {"round": -1}
    return {"round": reply.round, **{w.worker_id: w.last_seq for w in reply.workers}}


def test_a_killed_server_resumes_without_losing_or_repeating_updates(
    tmp_path: Path, procs: Processes
) -> None:
    rounds = 600
    config = write_config(tmp_path / "run.toml", rounds=rounds, eval_every=10)
    reference = simulate(config, tmp_path / "sim")
    out, ckpt = tmp_path / "net", tmp_path / "net" / "checkpoints"
    secret = tmp_path / "secret"
    secret.write_text("test-secret")
    logs = tmp_path / "logs"
    logs.mkdir()

    def server(listen: str, *extra: str) -> subprocess.Popen:
        argv = byzps(
            "server", "--config", str(config), "--listen", listen, "--out", str(out),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5", "--round-deadline", "2",
            "--secret-file", str(secret), "--linger", "3", *extra,
        )  # fmt: skip
        return procs.start(argv, stdout=subprocess.PIPE, stderr=(logs / "server.log").open("ab"))

    first = server("127.0.0.1:0")
    address = wait_listening(first)
    common = ["--server", address, "--secret-file", str(secret), "--retry-timeout", "60"]
    workers = [
        procs.start(
            byzps(
                "worker",
                *common,
                "--id",
                str(k),
                "--ledger",
                str(tmp_path / "ledgers" / f"{k}.jsonl"),
            ),
            log=logs / f"worker-{k}.log",
        )
        for k in range(4)
    ]
    workers.append(procs.start(
        byzps("attack", *common, "--count", "1", "--first-id", "4", "--ledger",
              str(tmp_path / "ledgers" / "attack.jsonl")),
        log=logs / "attack.log"))  # fmt: skip

    key = secret.read_bytes()
    wait_for(lambda: status(address, key)["round"] >= 50, 120, "round 50")
    first.kill()
    first.wait(timeout=10)
    killed_at = max(r["round"] for r in metrics(out))
    assert killed_at < rounds - 50, f"the run was nearly over ({killed_at}) when killed"
    print(f"server killed at round >= {killed_at}")
    time.sleep(1.0)
    second = server(address, "--resume")
    assert wait_listening(second) == address

    final = wait_for(
        lambda: (s := status(address, b"test-secret"))["round"] >= rounds and s, 180, "the end"
    )
    assert second.wait(timeout=60) == 0
    for proc in workers:
        assert proc.wait(timeout=60) == 0, log_digest(logs)

    acked: dict[str, list[int]] = {}
    for ledger in (tmp_path / "ledgers").iterdir():
        acked.update(ledger_seqs(ledger))
    for wid in map(str, range(5)):
        seqs = acked[wid]
        assert seqs == list(range(1, len(seqs) + 1)), f"worker {wid}: {seqs}"  # none twice
        assert final[wid] == seqs[-1], f"worker {wid}: server {final[wid]}, ledger {seqs[-1]}"
    got = np.load(out / "params.npy")
    loss = metrics(out)[-1]["train_loss"]
    sim_loss = metrics(tmp_path / "sim")[-1]["train_loss"]
    print(
        f"restart: final loss {loss:.6f} vs uninterrupted {sim_loss:.6f}, "
        f"params rel diff {np.linalg.norm(got - reference) / np.linalg.norm(reference):.2e}"
    )
    assert loss == pytest.approx(sim_loss, rel=0.05)
    assert all(p.poll() is not None for p in procs.started)


@pytest.mark.slow  # a run long enough to kill a worker in
def test_a_killed_worker_restarts_from_its_checkpoint(tmp_path: Path, procs: Processes) -> None:
    """kill -9 a worker with --checkpoint-dir and start it again: it settles its pending update
    with the server (commit or resend) and continues with contiguous seqs."""
    rounds = 400
    config = write_config(tmp_path / "run.toml", rounds=rounds, eval_every=10)
    out, secret, logs = tmp_path / "net", tmp_path / "secret", tmp_path / "logs"
    secret.write_text("test-secret")
    logs.mkdir()
    server = procs.start(
        byzps("server", "--config", str(config), "--listen", "127.0.0.1:0", "--out", str(out),
              "--round-deadline", "0.5", "--secret-file", str(secret), "--linger", "3"),
        stdout=subprocess.PIPE, stderr=(logs / "server.log").open("ab"),
    )  # fmt: skip
    address = wait_listening(server)
    common = ["--server", address, "--secret-file", str(secret)]

    def worker(k: int) -> subprocess.Popen:
        return procs.start(
            byzps("worker", *common, "--id", str(k), "--checkpoint-dir", str(tmp_path / f"w{k}"),
                  "--ledger", str(tmp_path / "ledgers" / f"{k}.jsonl")),
            log=logs / f"worker-{k}.log",
        )  # fmt: skip

    workers = [worker(k) for k in range(4)]
    attack = procs.start(
        byzps("attack", *common, "--count", "1", "--first-id", "4"), log=logs / "attack.log"
    )
    wait_for(lambda: any(r["round"] >= 50 for r in metrics(out)), 120, "round 50")
    workers[2].kill()
    workers[2].wait(timeout=10)
    assert max(r["round"] for r in metrics(out)) < rounds - 50
    workers[2] = worker(2)
    assert server.wait(timeout=180) == 0
    for proc in [*workers, attack]:
        assert proc.wait(timeout=60) == 0, (logs / "worker-2.log").read_text()[-2000:]
    seqs = ledger_seqs(tmp_path / "ledgers" / "2.jsonl")["2"]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "resuming at round" in (logs / "worker-2.log").read_text()
    assert math.isfinite(metrics(out)[-1]["train_loss"])
