"""Two "hosts": the server in one network namespace, the workers and the Byzantine cohort in
another, joined by a veth pair — the deployment across machines, on one machine.

The test creates both namespaces (unique names), runs BOTH ends inside them (no traffic from the
host namespace), checks that the run through a real IP link lands on the parameters the
in-process simulator computes, and deletes the namespaces whatever happens. It needs root and
iproute2 (and a kernel that lets it make namespaces); without them it is skipped with the reason
(a failure under BYZPS_REQUIRE_TOOLS=1, as in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import Processes, byzps, wait_listening, write_config
from optional import unavailable

#: A /30 from 10.0.0.0/8, private to the namespaces (never routed from the host namespace).
SERVER_IP, WORKER_IP = "10.231.7.1", "10.231.7.2"


def _can_make_namespaces() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


@pytest.fixture(autouse=True)
def _namespaces_possible() -> None:
    missing = _can_make_namespaces()
    if missing is not None:
        unavailable(missing)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    """(server namespace, worker namespace) linked by veth; removed on exit."""
    tag = uuid.uuid4().hex[:6]
    server_ns, worker_ns = f"byzps-s-{tag}", f"byzps-w-{tag}"
    veth_s, veth_w = f"bzs{tag}", f"bzw{tag}"
    try:
        try:
            ip("netns", "add", server_ns)
        except subprocess.CalledProcessError as exc:  # e.g. a container without CAP_SYS_ADMIN
            unavailable(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
        ip("netns", "add", worker_ns)
        ip("link", "add", veth_s, "type", "veth", "peer", "name", veth_w)
        ip("link", "set", veth_s, "netns", server_ns)
        ip("link", "set", veth_w, "netns", worker_ns)
        for ns, dev, addr in ((server_ns, veth_s, SERVER_IP), (worker_ns, veth_w, WORKER_IP)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield server_ns, worker_ns
    finally:
        for ns in (server_ns, worker_ns):  # deleting a namespace also deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture
def procs() -> Iterator[Processes]:
    tracker = Processes()
    yield tracker
    tracker.kill_all()


def test_a_cluster_across_two_hosts_matches_the_simulator(tmp_path: Path, procs: Processes) -> None:
    config = write_config(tmp_path / "run.toml", rounds=30, eval_every=10)
    secret = tmp_path / "secret"
    secret.write_text(uuid.uuid4().hex)
    secret.chmod(0o600)
    subprocess.run(
        byzps("simulate", "--config", str(config), "--out", str(tmp_path / "sim")),
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    expected = np.load(tmp_path / "sim" / "params.npy")
    with two_hosts() as (server_ns, worker_ns):
        server = procs.start(
            in_ns(server_ns, byzps(
                "server", "--config", str(config), "--listen", f"{SERVER_IP}:0",
                "--out", str(tmp_path / "net"), "--secret-file", str(secret), "--linger", "2",
            )),
            stdout=subprocess.PIPE, stderr=(tmp_path / "server.log").open("ab"),
        )  # fmt: skip
        address = wait_listening(server)
        assert address.startswith(f"{SERVER_IP}:")
        common = ["--server", address, "--secret-file", str(secret), "--threads", "1"]
        workers = [
            procs.start(in_ns(worker_ns, byzps("worker", *common, "--id", str(k))),
                        log=tmp_path / f"worker-{k}.log")
            for k in range(4)
        ]  # fmt: skip
        attack = byzps("attack", *common, "--count", "1", "--first-id", "4")
        workers.append(procs.start(in_ns(worker_ns, attack), log=tmp_path / "attack.log"))
        for k, proc in enumerate(workers):
            assert proc.wait(timeout=240) == 0, (tmp_path / f"worker-{k}.log").read_text()[-2000:]
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-2000:]
    got = np.load(tmp_path / "net" / "params.npy")
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert (
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(
            server_ns
        )
        == 0
    )
