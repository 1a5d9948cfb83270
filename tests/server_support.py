"""Shared helpers of the server tests: a tiny a9a run, a token-carrying client, real server
processes and in-process servers with a hand-driven clock. Everything is bounded in time and
cleaned up even when a test fails."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import configs
import grpc
import torch
from torch import Tensor

from byzps.common.codec import decode_model, encode_sparse
from byzps.common.config import RunConfig
from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
from byzps.common.sparse import SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from byzps.server.auth import Authenticator
from byzps.server.checkpoint import CheckpointStore
from byzps.server.coordinator import Coordinator, Settings
from byzps.server.daemon import ServerThread, build_door
from byzps.server.engine import RoundEngine, build_server_parts
from byzps.server.limits import Limits
from byzps.server.service import ParameterServerServicer

SECRET = b"s3cret-for-tests"
N, F = 5, 1


def tiny_config(**kwargs: Any) -> RunConfig:
    """The tiny run as a RunConfig (parsed by RunConfig.load, as the server parses it)."""
    with tempfile.TemporaryDirectory() as tmp:
        return RunConfig.load(write_config(Path(tmp), **kwargs))


def write_config(directory: Path, rounds: int = 20, eval_every: int = 5, k: int = 1) -> Path:
    """The tiny run (seed 3, N workers, F Byzantine, ALIE) as `directory`/run.toml."""
    return configs.write_config(
        directory / "run.toml", rounds=rounds, eval_every=eval_every, k=k, workers=N, byzantine=F
    )


def update(
    indices: list[int], values: list[float], dim: int = 123, **fields: Any
) -> pb.SparseUpdate:
    """A well-formed Top-k update; `fields` then overwrite raw message fields."""
    vec = SparseVector(
        torch.tensor(indices, dtype=torch.int32), torch.tensor(values, dtype=torch.float32), dim
    )
    msg = encode_sparse(vec, compressor="topk")
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def random_update(gen: torch.Generator, k: int = 1, dim: int = 123) -> pb.SparseUpdate:
    idx = torch.randperm(dim, generator=gen)[:k].sort().values
    vals = torch.randn(k, generator=gen)
    return update(idx.tolist(), vals.tolist(), dim)


class Client:
    """A test worker-side client for any worker id (it holds the shared secret); over TLS with
    `credentials`."""

    def __init__(
        self,
        address: str,
        secret: bytes | None = SECRET,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.channel = (
            grpc.insecure_channel(address)
            if credentials is None
            else grpc.secure_channel(address, credentials)
        )
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.secret = secret

    def close(self) -> None:
        self.channel.close()

    def meta(self, worker_id: str, token: str | None = None) -> list[tuple[str, str]]:
        if token is None and self.secret is not None:
            token = token_for(self.secret, worker_id)
        return [] if token is None else [(TOKEN_METADATA_KEY, token)]

    def register(self, worker_id: str, digest: str = "", **kw: Any) -> pb.RegisterReply:
        request = pb.RegisterRequest(worker_id=worker_id, config_digest=digest)
        return self.stub.Register(request, metadata=self.meta(worker_id, **kw), timeout=10)

    def push(
        self, worker_id: str, round: int, seq: int, upd: pb.SparseUpdate | None, **kw: Any
    ) -> pb.Ack:
        request = pb.PushUpdateRequest(worker_id=worker_id, round=round, seq=seq)
        if upd is not None:
            request.update.CopyFrom(upd)
        # 60 s: the push that closes a round runs the aggregator, whose numba kernels compile on
        # a fresh checkout's first call (seconds to tens of seconds on a loaded 2-core machine).
        return self.stub.PushUpdate(request, metadata=self.meta(worker_id, **kw), timeout=60)

    def chunks(
        self,
        worker_id: str = "0",
        round: int = 0,
        known_round: int | None = None,
        wait: bool = False,
        timeout: float = 10,
    ) -> list[pb.ModelChunk]:
        request = pb.GetModelRequest(worker_id=worker_id, round=round, wait=wait)
        if known_round is not None:
            request.known_round = known_round
        return list(self.stub.GetModel(request, metadata=self.meta(worker_id), timeout=timeout))

    def model(self, dim: int = 123, **kw: Any) -> tuple[int, Tensor]:
        return decode_model(self.chunks(**kw), dim=dim)

    def status(self, as_worker: str | None = None) -> pb.StatusReply:
        """Status, anonymous or with `as_worker`'s token (which adds every worker's line)."""
        meta = [] if as_worker is None else self.meta(as_worker)
        return self.stub.Status(pb.StatusRequest(), metadata=meta, timeout=10)


def code_of(call: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def finished_code(call: object, timeout: float) -> grpc.StatusCode | None:
    """The status a streaming call ended with within `timeout` s, None while it still runs."""
    done = threading.Event()
    result: list[grpc.StatusCode] = []

    def drain() -> None:
        try:
            for _ in call:  # type: ignore[attr-defined]
                pass
            result.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            result.append(exc.code())  # type: ignore[attr-defined]
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    done.wait(timeout)
    return result[0] if result else None


# ----------------------------------------------------------------------------------------------
# In-process servers
# ----------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class InProcess:
    coordinator: Coordinator
    address: str
    clock: FakeClock
    server: ServerThread


@dataclass
class TaskShape:
    """Just what the servicer needs of a task (its layout), for engines built by hand."""

    dim: int
    layer_sizes: tuple[int, ...]


def build_coordinator(
    config: RunConfig,
    settings: Settings,
    *,
    parts: tuple[Any, RoundEngine, Any] | None = None,
    **options: Any,
) -> Coordinator:
    """A Coordinator of `config` (not started) with the door the server builds for it, from the
    run's compressor; `parts`: (task, engine, max_nnz), default `build_server_parts(config)`;
    `options` go to the Coordinator (store, clock, metrics, …)."""
    task, engine, max_nnz = build_server_parts(config) if parts is None else parts
    return Coordinator(config, engine, build_door(config, task, max_nnz), settings, **options)


@contextmanager
def in_process(
    config: RunConfig,
    *,
    task: Any = None,
    engine: RoundEngine | None = None,
    max_nnz: Any = None,
    store_dir: Path | None = None,
    secret: bytes | None = SECRET,
    quorum: int = N - F,
    deadline: float = 10.0,
    startup: float = 60.0,
    checkpoint_every: int = 50,
    tls: grpc.ServerCredentials | None = None,
    limits: Limits | None = None,
    bind_certificates: bool = True,
) -> Iterator[InProcess]:
    """A real gRPC server on 127.0.0.1:0 around a Coordinator whose clock the test moves."""
    if engine is None:
        task, engine, max_nnz = build_server_parts(config)
    clock = FakeClock()
    store = None if store_dir is None else CheckpointStore(store_dir, config.digest())
    coordinator = build_coordinator(
        config,
        Settings(quorum, deadline, startup, checkpoint_every),
        parts=(task, engine, max_nnz),
        store=store,
        clock=clock,
    )
    coordinator.start(None)
    servicer = ParameterServerServicer(
        coordinator,
        Authenticator(secret, config.cluster.workers, bind_certificates=bind_certificates),
        config,
        task,
        limits=limits,
    )
    server = ServerThread(servicer, tls=tls)
    try:
        yield InProcess(coordinator, server.address, clock, server)
    finally:
        server.stop()
        coordinator.close(checkpoint=False)


# ----------------------------------------------------------------------------------------------
# Server processes
# ----------------------------------------------------------------------------------------------


def server_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "byzps.cli.main", "server", "--config", str(config), *args]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str
    log: IO[str]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


@contextmanager
def server_process(
    config: Path,
    *args: str,
    secret_file: Path | None = None,
    startup: float = 30,
    open_files: int | None = None,
) -> Iterator[ServerProcess]:
    """`byzps server` on 127.0.0.1:0 (with `open_files` as its soft and hard open-file limit);
    yields once it printed its listening line; always reaped."""
    auth = ["--secret-file", str(secret_file)] if secret_file else ["--no-auth"]
    cmd = server_command(config, "--listen", "127.0.0.1:0", *auth, *args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A file, not a pipe, so a chatty server never blocks; closed in the finally below.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115

    def limit() -> None:
        if open_files is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, preexec_fn=limit
    )
    try:
        line = _read_line(proc, startup)
        prefix = "byzps server listening on "
        if not line.startswith(prefix):
            proc.kill()
            proc.wait(10)
            log.seek(0)
            raise AssertionError(f"server did not start: {line!r}\n{log.read()}")
        yield ServerProcess(proc, line[len(prefix) :].strip(), log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()
