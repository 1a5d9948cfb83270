"""Hosts joined by real IP links: the server in one network namespace, the workers and the
Byzantine cohort in others, joined by veth pairs — the deployment across machines, on one machine.

The tests create the namespaces (unique names), run EVERY process inside them (no traffic from
the host namespace), and, whatever happens, kill those processes and delete the namespaces. The
runs are as a deployment would be: TLS with a server certificate for the server's address, mutual
TLS binding each client certificate to the worker id it names, and per-worker token files (the
master secret stays with the server).

- Through the link, the run lands on the parameters the in-process simulator computes, while
  a worker presenting another worker's token, or another worker's certificate, is refused.
- One honest worker sits on a third host whose link is cut mid-run (`ip link set … down`) and
  restored: meanwhile rounds close by the deadline without it; afterwards it rejoins with the
  current model, every update the server acknowledged is in the server's ledger and the
  worker's, and the run ends with finite parameters.

They need root and iproute2 (and a kernel that lets them make namespaces); without them they are
skipped with the reason (a failure under BYZPS_REQUIRE_TOOLS=1, as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_helpers import Processes, byzps, ledger_seqs, wait_for, wait_listening, write_config
from optional import unavailable
from pki_support import credentials

from byzps.common.credentials import write_secret

#: /30s from 10.0.0.0/8, private to the namespaces (never routed from the host namespace): the
#: server ↔ workers link, and the server ↔ third host link (the one that is cut).
SERVER_IP, WORKER_IP = "10.231.7.1", "10.231.7.2"
SERVER_IP_3, THIRD_IP = "10.231.8.1", "10.231.8.2"
#: Workers 0 … 3 are honest, 4 is the cohort (cluster_helpers.write_config).
HONEST = range(4)


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


@dataclass(frozen=True)
class Hosts:
    """The namespaces of one test; `third` and `cut_link` (the server-side end of the third
    host's veth) are empty unless asked for."""

    server: str
    workers: str
    third: str = ""
    cut_link: str = ""


def _join(ns_a: str, ns_b: str, dev_a: str, dev_b: str, ip_a: str, ip_b: str) -> None:
    """A veth pair between two namespaces, addressed as one /30."""
    ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
    for ns, dev, addr in ((ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b)):
        ip("link", "set", dev, "netns", ns)
        ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "link", "set", "lo", "up")


@contextmanager
def hosts(procs: Processes, *, third: bool = False) -> Iterator[Hosts]:
    """Server and worker namespaces linked by veth (and a third host on its own link to the
    server, routed to SERVER_IP, when `third`); on exit every process `procs` started is killed
    and the namespaces are deleted (which deletes their veth ends)."""
    tag = uuid.uuid4().hex[:6]
    names = [f"byzps-s-{tag}", f"byzps-w-{tag}", *([f"byzps-t-{tag}"] if third else [])]
    made: list[str] = []
    try:
        for ns in names:
            try:
                ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:  # e.g. a container without CAP_SYS_ADMIN
                unavailable(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
            made.append(ns)
        _join(names[0], names[1], f"bzs{tag}", f"bzw{tag}", SERVER_IP, WORKER_IP)
        if not third:
            yield Hosts(names[0], names[1])
            return
        _join(names[0], names[2], f"bzc{tag}", f"bzt{tag}", SERVER_IP_3, THIRD_IP)
        ip("-n", names[2], "route", "add", f"{SERVER_IP}/32", "via", SERVER_IP_3)
        yield Hosts(names[0], names[1], names[2], f"bzc{tag}")
    finally:
        procs.kill_all()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """A run's credentials, as an operator hands them out (certificates named as in
    tests/pki_support.py; here the server's names SERVER_IP)."""

    secret: Path  # the server's alone
    tokens: Path  # worker-K.token for the honest K = 0 … 3
    cohort_tokens: Path  # worker-4.token alone
    pki: Path

    def server_args(self) -> list[str]:
        return [
            "--secret-file", str(self.secret), "--tls-cert", str(self.pki / "server.pem"),
            "--tls-key", str(self.pki / "server.key"), "--tls-client-ca", str(self.pki / "ca.pem"),
        ]  # fmt: skip

    def tls(self, cert: str) -> list[str]:
        """Client TLS options presenting the certificate `cert` (e.g. "worker-3", "operator")."""
        return [
            "--tls-ca", str(self.pki / "ca.pem"), "--tls-cert", str(self.pki / f"{cert}.pem"),
            "--tls-key", str(self.pki / f"{cert}.key"),
        ]  # fmt: skip

    def worker(self, k: int, token: int | None = None, cert: int | None = None) -> list[str]:
        """`byzps worker` options of worker k, with worker `token`'s token file and worker
        `cert`'s certificate (its own unless told)."""
        token_file = self.tokens / f"worker-{k if token is None else token}.token"
        return ["--id", str(k), "--token-file", str(token_file),
                *self.tls(f"worker-{k if cert is None else cert}")]  # fmt: skip

    def cohort(self) -> list[str]:
        return ["--count", "1", "--first-id", "4", "--token-dir", str(self.cohort_tokens),
                *self.tls("worker-4")]  # fmt: skip


def make_credentials(tmp: Path) -> Credentials:
    """The master secret, a token file per honest worker, the cohort's apart, and a CA with
    certificates for the server (at SERVER_IP), workers 0 … 4 and an operator — all made with
    `byzps credentials`."""
    secret, tokens, cohort, pki = tmp / "secret", tmp / "tokens", tmp / "cohort", tmp / "pki"
    write_secret(secret)
    credentials("issue", "--secret-file", str(secret), "--ids", "0-3", "--out", str(tokens))
    credentials("issue", "--secret-file", str(secret), "--ids", "4", "--out", str(cohort))
    credentials("ca", "--out", str(pki), "--days", "2")
    credentials("cert", "--ca", str(pki), "--server", "byzps-server", "--ip", SERVER_IP,
                "--out", str(pki), "--days", "2")  # fmt: skip
    credentials("cert", "--ca", str(pki), "--worker", "0-4", "--out", str(pki), "--days", "2")
    credentials("cert", "--ca", str(pki), "--operator", "--out", str(pki), "--days", "2")
    return Credentials(secret, tokens, cohort, pki)


# --------------------------------------------------------------------------- the cluster


def start_server(
    procs: Processes, ns: str, tmp: Path, config: Path, creds: Credentials, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`byzps server` with TLS inside `ns`, writing tmp/net; (process, its HOST:PORT)."""
    server = procs.start(
        in_ns(ns, byzps("server", "--config", str(config), "--listen", f"{SERVER_IP}:0",
                        "--out", str(tmp / "net"), *creds.server_args(), *extra)),
        stdout=subprocess.PIPE, stderr=(tmp / "server.log").open("ab"),
    )  # fmt: skip
    address = wait_listening(server)
    assert address.startswith(f"{SERVER_IP}:")
    return server, address


def start_clients(
    procs: Processes, tmp: Path, address: str, creds: Credentials, where: dict[int, str]
) -> dict[str, subprocess.Popen[bytes]]:
    """Honest workers 0 … 3 (worker k in namespace where[k], each with an ack ledger) and the
    cohort (in where[4]), by log name."""
    common = ["--server", address, "--threads", "1"]
    started = {
        f"worker-{k}": procs.start(
            in_ns(where[k], byzps("worker", *common, *creds.worker(k),
                                  "--ledger", str(tmp / f"ledger-{k}.jsonl"))),
            log=tmp / f"worker-{k}.log",
        )
        for k in HONEST
    }  # fmt: skip
    started["attack"] = procs.start(
        in_ns(where[4], byzps("attack", *common, *creds.cohort())), log=tmp / "attack.log"
    )
    return started


def wait_all(tmp: Path, started: dict[str, subprocess.Popen[bytes]], timeout: float) -> None:
    for name, proc in started.items():
        code = proc.wait(timeout=timeout)
        assert code == 0, (tmp / f"{name}.log").read_text()[-2000:]


def assert_gone(net: Hosts) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert not [ns for ns in (net.server, net.workers, net.third) if ns and ns in listed.stdout]


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# --------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_a_tls_cluster_across_two_hosts_matches_the_simulator(
    tmp_path: Path, procs: Processes
) -> None:
    """TLS, certificates bound to worker ids, token files: the run through the veth link lands
    on the simulator's parameters, and impostors meanwhile are refused: worker 0 with worker 1's
    token (UNAUTHENTICATED), worker 0 with worker 1's certificate (PERMISSION_DENIED), a
    certificate from a CA the server does not trust (no connection at all)."""
    config = write_config(tmp_path / "run.toml", rounds=30, eval_every=10)
    subprocess.run(
        byzps("simulate", "--config", str(config), "--out", str(tmp_path / "sim")),
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    creds = make_credentials(tmp_path)
    credentials("ca", "--out", str(tmp_path / "other"), "--days", "2")
    credentials("cert", "--ca", str(tmp_path / "other"), "--worker", "0",
                "--out", str(tmp_path / "other"), "--days", "2")  # fmt: skip
    with hosts(procs) as net:
        server, address = start_server(procs, net.server, tmp_path, config, creds, "--linger", "2")
        everyone = dict.fromkeys(range(5), net.workers)
        started = start_clients(procs, tmp_path, address, creds, everyone)
        common = ["--server", address, "--threads", "1", "--retry-timeout", "3"]
        untrusted = [*creds.worker(0)[:4], "--tls-ca", str(creds.pki / "ca.pem"),
                     "--tls-cert", str(tmp_path / "other" / "worker-0.pem"),
                     "--tls-key", str(tmp_path / "other" / "worker-0.key")]  # fmt: skip
        impostors = {
            name: procs.start(in_ns(net.workers, byzps("worker", *common, *args)),
                              log=tmp_path / f"{name}.log")
            for name, args in (("token-of-1", creds.worker(0, token=1)),
                               ("cert-of-1", creds.worker(0, cert=1)),
                               ("untrusted-ca", untrusted))
        }  # fmt: skip
        wait_all(tmp_path, started, timeout=240)
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-2000:]
        codes = {name: proc.wait(timeout=60) for name, proc in impostors.items()}
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in impostors}
    # exit 4: refused by the server; exit 3: no server reachable (the handshake fails)
    assert codes == {"token-of-1": 4, "cert-of-1": 4, "untrusted-ca": 3}, logs
    assert "UNAUTHENTICATED" in logs["token-of-1"], logs["token-of-1"][-2000:]
    assert "PERMISSION_DENIED" in logs["cert-of-1"], logs["cert-of-1"][-2000:]
    got, expected = (np.load(tmp_path / run / "params.npy") for run in ("net", "sim"))
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert_gone(net)


#: The link-cut run: the third host (worker CUT) loses its link for CUT_SECONDS once round
#: CUT_AT has closed; rounds may close DEADLINE seconds after they open with the quorum n − f = 4.
CUT, CUT_AT, CUT_SECONDS, DEADLINE, ROUNDS = 3, 8, 6.0, 1.0, 60


def server_status(ns: str, address: str, creds: Credentials) -> dict[str, Any]:
    """`byzps status --json` from inside the server's namespace, as the operator (whose
    certificate adds every worker's line)."""
    argv = byzps("status", "--server", address, "--json", *creds.tls("operator"))
    done = subprocess.run(in_ns(ns, argv), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_worker_whose_link_is_cut_mid_run_rejoins_and_loses_nothing(
    tmp_path: Path, procs: Processes
) -> None:
    config = write_config(tmp_path / "run.toml", rounds=ROUNDS)
    creds = make_credentials(tmp_path)
    rounds_log = tmp_path / "net" / "rounds.jsonl"
    with hosts(procs, third=True) as net:
        timing = ["--round-deadline", str(DEADLINE), "--linger", "60"]
        server, address = start_server(procs, net.server, tmp_path, config, creds, *timing)
        where = {**dict.fromkeys(range(5), net.workers), CUT: net.third}
        started = start_clients(procs, tmp_path, address, creds, where)
        wait_for(lambda: len(jsonl(rounds_log)) >= CUT_AT, 180, f"round {CUT_AT} to close")
        cut = time.time()
        ip("-n", net.server, "link", "set", net.cut_link, "down")
        time.sleep(CUT_SECONDS)
        ip("-n", net.server, "link", "set", net.cut_link, "up")
        restored = time.time()
        wait_all(tmp_path, started, timeout=300)
        status = server_status(net.server, address, creds)
        os.killpg(server.pid, signal.SIGTERM)  # it lingers; a graceful stop ends it
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-2000:]
    closed = jsonl(rounds_log)
    assert [r["round"] for r in closed] == list(range(ROUNDS))
    # During the cut, rounds closed by the deadline with the other four (n − f = 4) only.
    during = [r for r in closed if r["opened"] >= cut + 0.5 and r["closed"] <= restored]
    assert len(during) >= 2, closed
    assert all(r["pushes"] == 4 for r in during), during
    assert all(r["closed"] - r["opened"] >= DEADLINE - 0.01 for r in during), during
    # The cut worker's acknowledged seqs are contiguous, its rounds increasing, none in the cut.
    acked = jsonl(tmp_path / f"ledger-{CUT}.jsonl")
    seqs, claimed = [e["seq"] for e in acked], [e["round"] for e in acked]
    assert seqs == list(range(1, len(seqs) + 1))
    assert claimed == sorted(set(claimed))
    assert not {r["round"] for r in during} & set(claimed)
    # It rejoined with the current model: after the cut it skipped the rounds it missed and
    # pushed for (nearly) every later round, to the last ones.
    after = [r for r in claimed if r > during[-1]["round"]]
    assert after and after[-1] >= ROUNDS - 3, claimed
    assert len(after) >= 0.8 * (ROUNDS - after[0]), claimed
    full = [r for r in closed if r["closed"] > restored and r["pushes"] == 5]
    assert full, closed
    # Nothing acknowledged is lost: the server's last seq of every honest worker is the last seq
    # that worker recorded as acknowledged, over contiguous seqs.
    workers = {w["worker_id"]: w for w in status["workers"]}
    for k in HONEST:
        seqs_k = ledger_seqs(tmp_path / f"ledger-{k}.jsonl")[str(k)]
        assert seqs_k == list(range(1, len(seqs_k) + 1))
        assert workers[str(k)]["last_seq"] == seqs_k[-1], (k, workers)
    assert workers[str(CUT)]["last_round"] == claimed[-1] and status["finished"]
    assert np.isfinite(np.load(tmp_path / "net" / "params.npy")).all()
    assert_gone(net)
    missing = sorted(set(range(ROUNDS)) - set(claimed))
    without = [r["round"] for r in closed if r["pushes"] == 4]
    print(
        f"\nlink cut {CUT_SECONDS:.0f} s at round {CUT_AT}: rounds {without} closed by the "
        f"{DEADLINE:.0f} s deadline with 4/5 pushes ({len(during)} wholly inside the cut); "
        f"first round with all 5 after the link came back: {full[0]['round']}, closed "
        f"{full[0]['closed'] - restored:.1f} s after; worker {CUT} acknowledged seqs 1…{seqs[-1]} "
        f"for {len(claimed)} of {ROUNDS} rounds, missing {missing}"
        f"; server last_seq per worker {[workers[str(k)]['last_seq'] for k in range(5)]}"
    )


# --------------------------------------------------------------------------- shards on two hosts

#: Each shard host's own address (on its loopback, /32), reachable from every other namespace
#: through the veth links below: workers ↔ shard 0, workers ↔ shard 1, shard 0 ↔ shard 1.
SHARD_IPS = ("10.231.9.1", "10.231.9.2")
SHARD_LINKS = {  # (namespace a, namespace b): the /30 between them, a's end .1, b's .2
    ("s0", "w"): "10.231.10",
    ("s1", "w"): "10.231.11",
    ("s0", "s1"): "10.231.12",
}


@contextmanager
def shard_hosts(procs: Processes) -> Iterator[dict[str, str]]:
    """Three namespaces — shard 0's host, shard 1's host, the workers' host — pairwise linked,
    each shard host addressed by SHARD_IPS[rank] from everywhere; on exit every process is
    killed and the namespaces deleted."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"byzps-{role}-{tag}" for role in ("s0", "s1", "w")}
    made: list[str] = []
    try:
        for ns in names.values():
            try:
                ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                unavailable(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
            made.append(ns)
        for (a, b), net in SHARD_LINKS.items():
            _join(names[a], names[b], f"bz{a}{b}{tag}"[:15], f"bz{b}{a}{tag}"[:15],
                  f"{net}.1", f"{net}.2")  # fmt: skip
        for rank, role in enumerate(("s0", "s1")):
            ip("-n", names[role], "addr", "add", f"{SHARD_IPS[rank]}/32", "dev", "lo")
        routes = {  # in namespace: (shard address, via its end of the link to that shard)
            "w": [(SHARD_IPS[0], "10.231.10.1"), (SHARD_IPS[1], "10.231.11.1")],
            "s0": [(SHARD_IPS[1], "10.231.12.2")],
            "s1": [(SHARD_IPS[0], "10.231.12.1")],
        }
        for role, pairs in routes.items():
            for address, via in pairs:
                ip("-n", names[role], "route", "add", f"{address}/32", "via", via)
        yield names
    finally:
        procs.kill_all()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.mark.slow
def test_two_shards_on_two_hosts_serve_one_model(tmp_path: Path, procs: Processes) -> None:
    """cluster.shards = 2 with each shard on a host of its own and the workers on a third, as a
    deployment would be: TLS everywhere (the shards call each other presenting their server
    certificate, under mutual TLS), a token file per worker, the master secret on the shard
    hosts only. The shards exchange their parts over the link between them, the workers push
    each shard its part over theirs, and the run lands on the simulator's model for the same
    config (which runs the same two column shards in one process). A worker's certificate and
    token cannot read a shard's parts."""
    import sys

    from byzps.common.credentials import TOKEN_METADATA_KEY

    config = write_config(tmp_path / "run.toml", rounds=30, eval_every=10)
    config.write_text(config.read_text().replace("[cluster]\n", "[cluster]\nshards = 2\n"))
    subprocess.run(
        byzps("simulate", "--config", str(config), "--out", str(tmp_path / "sim")),
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    secret, tokens, cohort, pki = (tmp_path / name for name in ("secret", "t", "c", "pki"))
    write_secret(secret)
    credentials("issue", "--secret-file", str(secret), "--ids", "0-3", "--out", str(tokens))
    credentials("issue", "--secret-file", str(secret), "--ids", "4", "--out", str(cohort))
    credentials("ca", "--out", str(pki), "--days", "2")
    credentials("cert", "--ca", str(pki), "--server", "byzps-server", "--ip", SHARD_IPS[0],
                "--ip", SHARD_IPS[1], "--out", str(pki), "--days", "2")  # fmt: skip
    credentials("cert", "--ca", str(pki), "--worker", "0-4", "--out", str(pki), "--days", "2")

    def tls(name: str) -> list[str]:
        return ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / f"{name}.pem"),
                "--tls-key", str(pki / f"{name}.key")]  # fmt: skip

    peers = ",".join(f"{address}:50061" for address in SHARD_IPS)
    with shard_hosts(procs) as ns:
        shards = [
            procs.start(
                in_ns(ns[f"s{rank}"], byzps(
                    "server", "--config", str(config), "--listen", f"{SHARD_IPS[rank]}:50061",
                    "--out", str(tmp_path / f"shard-{rank}"), "--shard", str(rank),
                    "--peers", peers, "--secret-file", str(secret), "--linger", "2",
                    "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                    "--tls-client-ca", str(pki / "ca.pem"))),
                stdout=subprocess.PIPE, stderr=(tmp_path / f"shard-{rank}.log").open("ab"),
            )
            for rank in range(2)
        ]  # fmt: skip
        for shard in shards:
            wait_listening(shard)
        common = ["--server", peers, "--threads", "1"]
        started = {
            f"worker-{k}": procs.start(
                in_ns(ns["w"], byzps("worker", *common, "--id", str(k), "--token-file",
                                     str(tokens / f"worker-{k}.token"), *tls(f"worker-{k}"))),
                log=tmp_path / f"worker-{k}.log",
            )
            for k in HONEST
        }  # fmt: skip
        started["attack"] = procs.start(
            in_ns(ns["w"], byzps("attack", *common, "--count", "1", "--first-id", "4",
                                 "--token-dir", str(cohort), *tls("worker-4"))),
            log=tmp_path / "attack.log",
        )  # fmt: skip
        probe = tmp_path / "probe.py"
        probe.write_text(
            "import grpc, sys\n"
            "from byzps.common.credentials import channel_tls\n"
            "from byzps.proto.v1 import shard_peer_pb2 as p, shard_peer_pb2_grpc as g\n"
            "from pathlib import Path\n"
            f"pki = Path({str(pki)!r})\n"
            "tls = channel_tls(pki / 'ca.pem', pki / 'worker-0.pem', pki / 'worker-0.key')\n"
            f"token = open({str(tokens / 'worker-0.token')!r}).read().strip()\n"
            f"with grpc.secure_channel('{SHARD_IPS[0]}:50061', tls) as c:\n"
            "    try:\n"
            "        g.ShardPeerStub(c).FetchPart(p.FetchPartRequest(kind=1), timeout=10,\n"
            f"            metadata=(({TOKEN_METADATA_KEY!r}, token),))\n"
            "    except grpc.RpcError as e:\n"
            "        print(e.code().name); sys.exit(0)\n"
            "print('READ'); sys.exit(1)\n"
        )
        refused = subprocess.run(in_ns(ns["w"], [sys.executable, str(probe)]),
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        wait_all(tmp_path, started, timeout=300)
        for rank, shard in enumerate(shards):
            log = (tmp_path / f"shard-{rank}.log").read_text()[-2000:]
            assert shard.wait(timeout=60) == 0, log
    assert refused.stdout.strip() == "UNAUTHENTICATED", refused
    got = np.load(tmp_path / "shard-0" / "params.npy")
    assert np.allclose(got, np.load(tmp_path / "sim" / "params.npy"), rtol=1e-5, atol=1e-7)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert not [n for n in ns.values() if n in listed.stdout]
