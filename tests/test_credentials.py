"""Per-worker credentials: a worker holds only its own.

- `byzps credentials secret|issue|ca|cert`: file modes, id lists and their errors, no overwrite
  without --force, certificates that name what they should.
- `byzps worker --token-file` / `byzps attack --token-dir`: the daemons take only their own ids'
  tokens; the legacy --secret-file still works, with a warning.
- A real run (`byzps server` and worker processes on 127.0.0.1) with token files only lands on
  the simulator's parameters, while the cohort's tokens are tried as every honest id throughout
  — Register, PushUpdate, GetModel(wait) — and refused UNAUTHENTICATED every time.
- `byzps launch` hands the master secret to the server only, each honest worker its own token
  file and the cohort a directory of its ids' tokens.
"""

from __future__ import annotations

import itertools
import logging
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from cluster_helpers import Processes, byzps, wait_listening, write_config
from cryptography import x509
from server_support import SECRET, Client, code_of, in_process, tiny_config, update

from byzps.cli.credentials import parse_ids
from byzps.cli.launch import client_commands, issue_credentials
from byzps.cli.main import main
from byzps.common.credentials import TOKEN_METADATA_KEY, read_token, token_for, write_secret
from byzps.proto.v1 import parameter_server_pb2 as pb


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- the commands


def test_secret_goes_to_stdout_or_to_an_owner_only_file(tmp_path: Path) -> None:
    code, out = invoke("credentials", "secret")
    assert code == 0 and len(out.strip()) == 64 and int(out, 16) >= 0
    path = tmp_path / "secret"
    assert invoke("credentials", "secret", "--out", str(path))[0] == 0
    first = path.read_text()
    assert len(first) == 64 and mode(path) == 0o600
    code, out = invoke("credentials", "secret", "--out", str(path))
    assert code == 1 and "exists; pass --force" in out
    assert path.read_text() == first
    path.chmod(0o644)
    assert invoke("credentials", "secret", "--out", str(path), "--force")[0] == 0
    assert path.read_text() != first and mode(path) == 0o600


def test_issue_writes_one_owner_only_token_per_id(tmp_path: Path) -> None:
    secret, out = tmp_path / "secret", tmp_path / "tokens"
    write_secret(secret)
    code, output = invoke("credentials", "issue", "--secret-file", str(secret),
                          "--ids", "0,3,5-7", "--out", str(out))  # fmt: skip
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == [f"worker-{i}.token" for i in (0, 3, 5, 6, 7)]
    assert mode(out) == 0o700
    key = secret.read_bytes()
    for i in (0, 3, 5, 6, 7):
        path = out / f"worker-{i}.token"
        assert mode(path) == 0o600
        assert read_token(path) == token_for(key, str(i))


def test_issue_refuses_to_overwrite_any_token_unless_forced(tmp_path: Path) -> None:
    secret, out = tmp_path / "secret", tmp_path / "tokens"
    write_secret(secret)
    args = ["credentials", "issue", "--secret-file", str(secret), "--out", str(out)]
    assert invoke(*args, "--ids", "2")[0] == 0
    code, output = invoke(*args, "--ids", "0-3")
    assert code == 1 and "worker-2.token: exists; pass --force" in output
    assert sorted(p.name for p in out.iterdir()) == ["worker-2.token"]  # nothing half-written
    assert invoke(*args, "--ids", "0-3", "--force")[0] == 0
    assert len(list(out.iterdir())) == 4


@pytest.mark.parametrize(
    ("text", "ids"),
    [("0-11", list(range(12))), ("0,3,5-7", [0, 3, 5, 6, 7]), ("4", [4]), ("3,1-2,2", [1, 2, 3])],
)
def test_id_lists_and_ranges(text: str, ids: list[int]) -> None:
    assert parse_ids(text) == ids


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "'' is not an id"),
        ("1,,2", "'' is not an id"),
        ("a", "'a' is not an id"),
        ("-1", "'-1' is not an id"),
        ("3-", "'3-' is not an id"),
        ("7-5", "ends before it starts"),
        ("1.5", "'1.5' is not an id"),
        ("0-100000", "more than 100000 ids"),
    ],
)
def test_bad_id_lists_are_refused_naming_the_option(tmp_path: Path, text: str, reason: str) -> None:
    secret = tmp_path / "secret"
    write_secret(secret)
    code, output = invoke("credentials", "issue", "--secret-file", str(secret), "--ids", text,
                          "--out", str(tmp_path / "tokens"))  # fmt: skip
    assert code == 2 and "Invalid value for '--ids'" in output and reason in output, output
    assert not (tmp_path / "tokens").exists()


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def test_ca_and_certificates(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert invoke("credentials", "ca", "--out", str(pki))[0] == 0
    for args in (["--worker", "3,4"], ["--server", "byzps-server", "--ip", "10.0.0.5"],
                 ["--operator"]):  # fmt: skip
        code, output = invoke("credentials", "cert", "--ca", str(pki), *args, "--out", str(pki))
        assert code == 0, output
    assert mode(pki) == 0o700
    ca = certificate(pki / "ca.pem")
    for stem in ("ca", "worker-3", "worker-4", "server", "operator"):
        assert mode(pki / f"{stem}.key") == 0o600
        cert = certificate(pki / f"{stem}.pem")
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
    worker = certificate(pki / "worker-3.pem")
    assert worker.subject.rfc4514_string() == "CN=byzps-worker-3"
    assert uris(worker) == ["spiffe://byzps/worker/3"]
    assert certificate(pki / "operator.pem").subject.rfc4514_string() == "CN=byzps-operator"
    assert uris(certificate(pki / "operator.pem")) == []
    san = certificate(pki / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["byzps-server"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    before = (pki / "worker-3.key").read_text()
    code, output = invoke("credentials", "cert", "--ca", str(pki), "--worker", "3",
                          "--out", str(pki))  # fmt: skip
    assert code == 1 and "exists; pass --force" in output
    assert invoke("credentials", "ca", "--out", str(pki))[0] == 1  # the CA neither
    assert (pki / "worker-3.key").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --worker, --server, --operator"),
        (["--worker", "1", "--operator"], "exactly one of"),
        (["--worker", "1", "--ip", "10.0.0.1"], "--ip: only with --server"),
        (["--server", "s", "--ip", "nope"], "'nope' is not an IP address"),
        (["--worker", "x"], "Invalid value for '--worker'"),
    ],
)
def test_bad_certificate_requests_are_refused(
    tmp_path: Path, args: list[str], message: str
) -> None:
    pki = tmp_path / "pki"
    assert invoke("credentials", "ca", "--out", str(pki))[0] == 0
    code, output = invoke("credentials", "cert", "--ca", str(pki), *args, "--out", str(pki))
    assert code != 0 and message in output, output
    assert sorted(p.name for p in pki.iterdir()) == ["ca.key", "ca.pem"]


# --------------------------------------------------------------------------- the daemons' options


@pytest.fixture
def no_sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("signal.signal", lambda *args: None)  # keep pytest's SIGTERM handler


def issued(tmp_path: Path, ids: str, name: str) -> Path:
    """Token files of `ids` under tmp_path/name, from SECRET."""
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_bytes(SECRET)
    assert invoke("credentials", "issue", "--secret-file", str(secret), "--ids", ids,
                  "--out", str(tmp_path / name))[0] == 0  # fmt: skip
    return tmp_path / name


@pytest.mark.usefixtures("no_sigterm_handler")
def test_a_worker_with_another_workers_token_is_refused(tmp_path: Path) -> None:
    tokens = issued(tmp_path, "0-1", "tokens")
    with in_process(tiny_config()) as srv:
        code, _ = invoke("worker", "--server", srv.address, "--id", "0", "--token-file",
                         str(tokens / "worker-1.token"), "--retry-timeout", "5")  # fmt: skip
        assert code == 4  # EXIT_REFUSED: the server said UNAUTHENTICATED


def test_token_options_exclude_the_master_secret(tmp_path: Path) -> None:
    tokens = issued(tmp_path, "0-4", "tokens")
    secret = str(tmp_path / "secret")
    code, output = invoke("worker", "--server", "127.0.0.1:1", "--id", "0", "--token-file",
                          str(tokens / "worker-0.token"), "--secret-file", secret)  # fmt: skip
    assert code == 2 and "--token-file and --secret-file exclude each other" in output
    code, output = invoke("attack", "--server", "127.0.0.1:1", "--count", "1", "--first-id", "4",
                          "--token-dir", str(tokens), "--secret-file", secret)  # fmt: skip
    assert code == 2 and "--token-dir and --secret-file exclude each other" in output


def test_a_token_file_must_hold_a_token(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.token"
    bogus.write_text("-----BEGIN PRIVATE KEY-----\n")
    code, output = invoke("worker", "--server", "127.0.0.1:1", "--id", "0", "--token-file",
                          str(bogus))  # fmt: skip
    assert code == 2 and "--token-file" in output and "not a worker token" in output


def test_the_cohort_needs_a_token_file_for_each_of_its_ids(tmp_path: Path) -> None:
    tokens = issued(tmp_path, "3", "cohort")
    code, output = invoke("attack", "--server", "127.0.0.1:1", "--count", "2", "--first-id", "3",
                          "--token-dir", str(tokens))  # fmt: skip
    assert code == 2 and "--token-dir" in output and "worker-4.token" in output, output


@pytest.mark.usefixtures("no_sigterm_handler")
def test_the_legacy_secret_file_still_works_but_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cohort registers with tokens derived from --secret-file (its run then fails on ids
    outside the run, before it trains: enough to show the derived tokens were accepted)."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with caplog.at_level(logging.WARNING), in_process(tiny_config()) as srv:
        code, _ = invoke("attack", "--server", srv.address, "--secret-file", str(secret),
                         "--count", "2", "--first-id", "4", "--retry-timeout", "5")  # fmt: skip
    assert code == 2  # id 5 is outside the run: PERMISSION_DENIED, not UNAUTHENTICATED
    assert "can act as any worker" in caplog.text
    assert "member id 5 " in caplog.text


# --------------------------------------------------------------------------- a real run


@dataclass
class Attempts:
    """Impersonation attempts with the cohort's tokens, and what the server answered."""

    codes: list[grpc.StatusCode] = field(default_factory=list)
    rounds: set[int] = field(default_factory=set)
    #: The code that ended the attempts when the server went away mid-call (UNAVAILABLE, or
    #: CANCELLED for a call in flight at its shutdown), with the round last seen before it.
    ended_by: tuple[grpc.StatusCode, int] | None = None


def impersonate(address: str, cohort_tokens: list[str], honest: list[str],
                stop: threading.Event, attempts: Attempts) -> None:  # fmt: skip
    """Until `stop` or the server's end: as every honest id, with every cohort token (and with
    none), Register, PushUpdate and a long-polling GetModel; records the codes and the rounds
    seen meanwhile."""
    client = Client(address, secret=None)
    last_round = -1
    try:
        for seq in itertools.count(1):
            if stop.is_set():
                break
            for wid, token in itertools.product(honest, [*cohort_tokens, ""]):
                codes = try_as(client, wid, token, seq)
                ending = [c for c in codes if c in SHUTDOWN_CODES]
                if ending:  # the run ended and the server with it
                    attempts.codes.extend(codes[: codes.index(ending[0])])
                    attempts.ended_by = (ending[0], last_round)
                    return
                attempts.codes.extend(codes)
            try:
                last_round = client.status().round
                attempts.rounds.add(last_round)
            except grpc.RpcError:
                break  # the server is gone
            time.sleep(0.02)
    finally:
        client.close()


#: What a call gets from a server that is shutting down: refused, or cancelled in flight.
SHUTDOWN_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def try_as(client: Client, wid: str, token: str, seq: int) -> list[grpc.StatusCode]:
    """The codes of Register, PushUpdate and GetModel(wait=true) as `wid` presenting `token`
    (in the metadata, and in RegisterRequest.token too)."""
    meta = [(TOKEN_METADATA_KEY, token)] if token else []
    register = pb.RegisterRequest(worker_id=wid, token=token.encode())
    push = pb.PushUpdateRequest(worker_id=wid, round=0, seq=seq, update=update([0], [1e3]))
    get = pb.GetModelRequest(worker_id=wid, round=0, wait=True)
    return [
        code_of(lambda: client.stub.Register(register, metadata=meta, timeout=5)),
        code_of(lambda: client.stub.PushUpdate(push, metadata=meta, timeout=5)),
        code_of(lambda: list(client.stub.GetModel(get, metadata=meta, timeout=5))),
    ]


@pytest.fixture(scope="module")
def token_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Attempts]]:
    """The cluster tests' run (5 workers, worker 4 Byzantine) with token files only: workers
    0 … 3 each get theirs, the cohort a directory with worker-4.token alone; meanwhile the
    cohort's token is tried as every honest id. Yields (tmp dir, attempts)."""
    tmp = tmp_path_factory.mktemp("tokens")
    config = write_config(tmp / "run.toml", rounds=12)
    sim = subprocess.run(byzps("simulate", "--config", str(config), "--out", str(tmp / "sim")),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    secret = tmp / "secret"
    write_secret(secret)
    issue = ["credentials", "issue", "--secret-file", str(secret)]
    assert invoke(*issue, "--ids", "0-3", "--out", str(tmp / "honest"))[0] == 0
    assert invoke(*issue, "--ids", "4", "--out", str(tmp / "cohort"))[0] == 0
    procs, stop, attempts = Processes(), threading.Event(), Attempts()
    try:
        server = procs.start(
            byzps("server", "--config", str(config), "--listen", "127.0.0.1:0",
                  "--secret-file", str(secret), "--out", str(tmp / "net"), "--linger", "1"),
            stdout=subprocess.PIPE, stderr=(tmp / "server.log").open("ab"),
        )  # fmt: skip
        address = wait_listening(server)
        cohort_tokens = [read_token(p) for p in sorted((tmp / "cohort").iterdir())]
        thread = threading.Thread(
            target=impersonate,
            args=(address, cohort_tokens, ["0", "1", "2", "3"], stop, attempts),
            daemon=True,
        )
        thread.start()
        common = ["--server", address, "--threads", "1"]
        workers = [
            procs.start(byzps("worker", *common, "--id", str(k), "--token-file",
                              str(tmp / "honest" / f"worker-{k}.token")),
                        log=tmp / f"worker-{k}.log")
            for k in range(4)
        ]  # fmt: skip
        workers.append(procs.start(
            byzps("attack", *common, "--count", "1", "--first-id", "4",
                  "--token-dir", str(tmp / "cohort")), log=tmp / "worker-4.log"))  # fmt: skip
        for k, proc in enumerate(workers):
            assert proc.wait(timeout=240) == 0, (tmp / f"worker-{k}.log").read_text()[-2000:]
        assert server.wait(timeout=60) == 0, (tmp / "server.log").read_text()[-2000:]
        stop.set()
        thread.join(timeout=30)
        yield tmp, attempts
    finally:
        stop.set()
        procs.kill_all()


def test_workers_with_only_their_token_files_match_the_simulator(
    token_run: tuple[Path, Attempts],
) -> None:
    """...although the cohort's token was tried as every honest id all along."""
    tmp, _ = token_run
    got = np.load(tmp / "net" / "params.npy")
    assert np.allclose(got, np.load(tmp / "sim" / "params.npy"), rtol=1e-5, atol=1e-7)


def test_the_cohorts_tokens_cannot_act_as_an_honest_worker(
    token_run: tuple[Path, Attempts],
) -> None:
    _, attempts = token_run
    assert attempts.codes, "no attempt was made"
    assert set(attempts.codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert len(attempts.rounds) >= 2, f"the attempts saw rounds {sorted(attempts.rounds)} only"
    if attempts.ended_by is not None:  # only the server's own end may stop them early
        code, last_round = attempts.ended_by
        assert last_round == 12, f"{code} at round {last_round}, before the run's end"


# --------------------------------------------------------------------------- byzps launch


def test_launch_hands_each_process_only_its_own_tokens(tmp_path: Path) -> None:
    config = tiny_config()  # 5 workers, worker 4 Byzantine
    secret = tmp_path / "secret"
    write_secret(secret)
    credentials = issue_credentials(config, secret, tmp_path / "credentials")
    commands = dict(client_commands(config, "127.0.0.1:1", credentials, tmp_path, False))
    assert sorted(commands) == ["attack", "worker-0", "worker-1", "worker-2", "worker-3"]
    key = secret.read_bytes()
    for name, argv in commands.items():
        assert "--secret-file" not in argv and str(secret) not in argv
        if name == "attack":
            directory = Path(argv[argv.index("--token-dir") + 1])
            assert [p.name for p in directory.iterdir()] == ["worker-4.token"]
            assert read_token(directory / "worker-4.token") == token_for(key, "4")
            assert mode(directory) == 0o700
        else:
            k = name.split("-")[1]
            path = Path(argv[argv.index("--token-file") + 1])
            assert argv[argv.index("--id") + 1] == k
            assert path.name == f"worker-{k}.token" and mode(path) == 0o600
            assert read_token(path) == token_for(key, k)
            assert "--token-dir" not in argv
