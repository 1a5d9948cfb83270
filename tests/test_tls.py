"""TLS and mutual TLS on the server's port, with a real PKI made by openssl for each test run.

A run over TLS lands on the simulator's parameters; a plaintext client, a client trusting another
CA and (under mutual TLS) a client without a certificate are all refused; bad TLS options are
refused with a message naming the option.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import Processes, byzps, wait_listening
from configs import write_config
from optional import need_tool
from server_support import SECRET, in_process, tiny_config

from byzps.common.credentials import channel_tls, server_tls
from byzps.worker.client import ParameterServerClient, RetryPolicy, ServerUnreachable


@pytest.fixture(autouse=True)
def _openssl() -> None:
    need_tool("openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
            f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
            cwd=directory)  # fmt: skip


def make_cert(directory: Path, name: str, ca: str, san: str) -> None:
    """A certificate for `name` signed by `ca`, valid for the subjectAltNames `san`."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (trusted), server (127.0.0.1, localhost, byzps-server), client; and another CA."""
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    make_cert(directory, "server", "ca", "IP:127.0.0.1,DNS:localhost,DNS:byzps-server")
    make_cert(directory, "client", "ca", "DNS:worker")
    return directory


def client(address: str, **options: object) -> ParameterServerClient:
    return ParameterServerClient(
        address, "0", SECRET, retry=RetryPolicy(give_up_after=1.5), **options
    )


def test_only_clients_trusting_the_servers_ca_get_through(pki: Path) -> None:
    with in_process(tiny_config(), tls=server_tls(pki / "server.pem", pki / "server.key")) as srv:
        with client(srv.address, credentials=channel_tls(pki / "ca.pem")) as good:
            assert good.register().model.dim == 123
        with client(srv.address) as plaintext, pytest.raises(ServerUnreachable):
            plaintext.status()
        with (
            client(srv.address, credentials=channel_tls(pki / "other-ca.pem")) as wrong,
            pytest.raises(ServerUnreachable),
        ):
            wrong.status()


def test_the_certificate_name_can_differ_from_the_address(pki: Path) -> None:
    with in_process(tiny_config(), tls=server_tls(pki / "server.pem", pki / "server.key")) as srv:
        port = srv.address.rsplit(":", 1)[1]
        tls = channel_tls(pki / "ca.pem")
        with client(f"127.0.0.1:{port}", credentials=tls, tls_server_name="byzps-server") as c:
            assert c.status().round == 0
        with (
            client(srv.address, credentials=tls, tls_server_name="someone-else") as c,
            pytest.raises(ServerUnreachable),
        ):
            c.status()


def test_mutual_tls_refuses_clients_without_a_certificate(pki: Path) -> None:
    tls = server_tls(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    with in_process(tiny_config(), tls=tls) as srv:
        certified = channel_tls(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        with client(srv.address, credentials=certified) as c:
            assert c.status().round == 0
        with (
            client(srv.address, credentials=channel_tls(pki / "ca.pem")) as anonymous,
            pytest.raises(ServerUnreachable),
        ):
            anonymous.status()


def test_a_run_over_mutual_tls_matches_the_simulator(tmp_path: Path, pki: Path) -> None:
    config = write_config(tmp_path / "run.toml", seed=5, rounds=12, eval_every=6, workers=3,
                          byzantine=0, attack="na", k=2)  # fmt: skip
    subprocess.run(byzps("simulate", "--config", str(config), "--out", str(tmp_path / "sim")),
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    procs = Processes()
    try:
        server = procs.start(
            byzps("server", "--config", str(config), "--listen", "127.0.0.1:0", "--no-auth",
                  "--out", str(tmp_path / "net"), "--linger", "1",
                  "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                  "--tls-client-ca", str(pki / "ca.pem")),
            stdout=subprocess.PIPE, stderr=(tmp_path / "server.log").open("ab"),
        )  # fmt: skip
        address = wait_listening(server)
        tls = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
               "--tls-key", str(pki / "client.key")]  # fmt: skip
        workers = [
            procs.start(byzps("worker", "--server", address, "--id", str(k), "--threads", "1",
                              *tls), log=tmp_path / f"worker-{k}.log")
            for k in range(3)
        ]  # fmt: skip
        status = subprocess.run(byzps("status", "--server", address, *tls),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0 and status.stdout.startswith("round "), status.stderr
        for k, proc in enumerate(workers):
            assert proc.wait(timeout=180) == 0, (tmp_path / f"worker-{k}.log").read_text()[-2000:]
        assert server.wait(timeout=60) == 0
    finally:
        procs.kill_all()
    got = np.load(tmp_path / "net" / "params.npy")
    assert np.allclose(got, np.load(tmp_path / "sim" / "params.npy"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "{pki}/server.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "{pki}/ca.pem"], "--tls-client-ca: needs --tls-cert"),
        (["--tls-cert", "{tmp}/bogus.pem", "--tls-key", "{pki}/server.key"], "not a PEM"),
    ],
)
def test_bad_tls_options_are_refused_by_name(
    tmp_path: Path, pki: Path, extra: list[str], message: str
) -> None:
    config = write_config(tmp_path / "run.toml")
    (tmp_path / "bogus.pem").write_text("not a certificate\n")
    args = [a.format(pki=pki, tmp=tmp_path) for a in extra]
    done = subprocess.run(
        byzps("server", "--config", str(config), "--listen", "127.0.0.1:0", "--no-auth", *args),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
