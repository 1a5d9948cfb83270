"""TLS and mutual TLS on the server's port, with a real PKI made by `byzps credentials` for each
test run (tests/pki_support.py).

A run over TLS lands on the simulator's parameters; a plaintext client, a client trusting another
CA and (under mutual TLS) a client without a certificate are all refused; bad TLS options are
refused with a message naming the option. Under mutual TLS the worker id is bound to the client
certificate: worker 3's certificate cannot call as worker 4 (not even with worker 4's token), an
operator's certificate may call Status only — and the facts of gRPC's auth context that binding
relies on are checked here against the installed grpcio.
"""

from __future__ import annotations

import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from cluster_helpers import Processes, byzps, wait_listening
from configs import write_config
from pki_support import make_pki
from server_support import SECRET, Client, code_of, in_process, tiny_config, update

from byzps.common.credentials import channel_tls, server_tls
from byzps.worker.client import ParameterServerClient, RetryPolicy, ServerUnreachable


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (trusted), server (127.0.0.1, localhost, byzps-server), worker-0 … worker-4, operator;
    and another CA (other/)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


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
            client(srv.address, credentials=channel_tls(pki / "other" / "ca.pem")) as wrong,
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
        certified = channel_tls(pki / "ca.pem", pki / "operator.pem", pki / "operator.key")
        with client(srv.address, credentials=certified) as c:
            assert c.status().round == 0
        with (
            client(srv.address, credentials=channel_tls(pki / "ca.pem")) as anonymous,
            pytest.raises(ServerUnreachable),
        ):
            anonymous.status()


def test_a_run_over_mutual_tls_matches_the_simulator(tmp_path: Path, pki: Path) -> None:
    """Each worker presents its own certificate (bound to its id; no tokens: --no-auth) and
    `byzps status` the operator's."""
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

        def tls(name: str) -> list[str]:
            return ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / f"{name}.pem"),
                    "--tls-key", str(pki / f"{name}.key")]  # fmt: skip

        # Before the workers start: the server waits for them, so it is surely still up (a
        # 12-round run can finish, and the server exit, before a loaded machine starts a CLI).
        status = subprocess.run(byzps("status", "--server", address, *tls("operator")),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0 and status.stdout.startswith("round "), status.stderr
        workers = [
            procs.start(byzps("worker", "--server", address, "--id", str(k), "--threads", "1",
                              *tls(f"worker-{k}")), log=tmp_path / f"worker-{k}.log")
            for k in range(3)
        ]  # fmt: skip
        for k, proc in enumerate(workers):
            assert proc.wait(timeout=180) == 0, (tmp_path / f"worker-{k}.log").read_text()[-2000:]
        assert server.wait(timeout=60) == 0
    finally:
        procs.kill_all()
    got = np.load(tmp_path / "net" / "params.npy")
    assert np.allclose(got, np.load(tmp_path / "sim" / "params.npy"), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ ids bound to certificates


def mutual_tls(pki: Path) -> grpc.ServerCredentials:
    return server_tls(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")


def holding(address: str, pki: Path, name: str) -> Client:
    """A client presenting certificate `name`, with every worker's valid token (the secret):
    whatever it is refused, the certificate refused it."""
    tls = channel_tls(pki / "ca.pem", pki / f"{name}.pem", pki / f"{name}.key")
    return Client(address, SECRET, credentials=tls)


def worker_calls(client: Client, worker_id: str, seq: int) -> dict[str, grpc.StatusCode]:
    """The status of Register, PushUpdate and a long-polling GetModel as `worker_id`."""
    return {
        "Register": code_of(lambda: client.register(worker_id)),
        "PushUpdate": code_of(lambda: client.push(worker_id, 0, seq, update([seq], [1.0]))),
        "GetModel": code_of(lambda: client.chunks(worker_id, wait=True, timeout=5)),
    }


def test_a_worker_certificate_calls_as_its_own_worker_only(pki: Path) -> None:
    ok = dict.fromkeys(["Register", "PushUpdate", "GetModel"], grpc.StatusCode.OK)
    denied = dict.fromkeys(ok, grpc.StatusCode.PERMISSION_DENIED)
    with in_process(tiny_config(), tls=mutual_tls(pki)) as srv:
        three = holding(srv.address, pki, "worker-3")
        operator = holding(srv.address, pki, "operator")
        try:
            assert worker_calls(three, "4", 1) == denied  # with worker 4's valid token
            assert worker_calls(three, "3", 1) == ok
            assert worker_calls(operator, "0", 1) == denied
            assert code_of(operator.status) == grpc.StatusCode.OK  # needs no worker identity
        finally:
            three.close()
            operator.close()


def test_binding_can_be_turned_off_for_certificates_that_name_no_worker(pki: Path) -> None:
    """bind_certificates=False: mutual TLS as transport security only; the tokens bind ids."""
    with in_process(tiny_config(), tls=mutual_tls(pki), bind_certificates=False) as srv:
        operator = holding(srv.address, pki, "operator")
        try:
            assert code_of(lambda: operator.register("0")) == grpc.StatusCode.OK
            bad = code_of(lambda: operator.register("1", token="0" * 64))
            assert bad == grpc.StatusCode.UNAUTHENTICATED
        finally:
            operator.close()


def test_the_auth_context_carries_what_the_binding_reads(pki: Path) -> None:
    """What byzps.server.auth relies on, against the installed grpcio: under mutual TLS the
    context has the PEM, the CN and the URI SAN of the client's certificate; a server that does
    not require client certificates never requests one, so none appears even when the client
    has one (a certificate in the context is always a verified one)."""
    seen: list[dict[str, list[bytes]]] = []

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append({k: list(v) for k, v in context.auth_context().items()})
        return b""

    key_pair = ((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())
    ca = (pki / "ca.pem").read_bytes()
    for require in (True, False):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}),))  # fmt: skip
        creds = grpc.ssl_server_credentials([key_pair], ca, require_client_auth=require)
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        tls = channel_tls(pki / "ca.pem", pki / "worker-3.pem", pki / "worker-3.key")
        try:
            with grpc.secure_channel(f"127.0.0.1:{port}", tls) as channel:
                channel.unary_unary("/t.T/M")(b"", timeout=10)
        finally:
            server.stop(0)
    verified, unrequested = seen
    assert verified["x509_pem_cert"][0].startswith(b"-----BEGIN CERTIFICATE-----")
    assert verified["x509_common_name"] == [b"byzps-worker-3"]
    assert b"spiffe://byzps/worker/3" in verified["x509_subject_alternative_name"]
    assert not any(k.startswith("x509_") for k in unrequested)


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
