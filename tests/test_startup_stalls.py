"""A run that has started never waits for registrations again, and shards open round 0 alike.

* Registrations are not logged, and replaying a push re-registers only its pusher, so a server
  resumed with --resume used to forget a worker that registered and never pushed (a silent
  Byzantine one) and sit in STARTING until --startup-timeout (600 s in the generated
  deployments), waiting for all n again, although the run had long started. A resumed run that
  had opened its first round (past round 0, or its open is on record: the checkpoint store's
  `opened.json`) now opens its recovered round at once, with the rows registered at the open
  among its registered ones, so the round closes by the ordinary rules and never on fewer pushes
  than the quorum merely because nobody has re-registered yet.
* On shards, a worker that registered with shard 0 only made shard 0 (all n registered) open,
  close round 0 and wait at the barrier for shard 1, still STARTING (n − 1 registered) and
  publishing nothing, until shard 0's --peer-timeout stopped it (exit 1). A starting shard now
  opens a round that a peer shard closed, and the run ends as if that worker had registered
  with both and stayed silent: both shards exit 0 with the same model, bit for bit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import configs
import numpy as np
import pytest
import torch
from cluster_helpers import Processes, byzps, wait_listening
from server_support import (
    SECRET,
    Client,
    FakeClock,
    N,
    build_coordinator,
    random_update,
    server_process,
    tiny_config,
    write_config,
)

from byzps.common.config import RunConfig, to_toml
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.checkpoint import OPENED, CheckpointStore
from byzps.server.coordinator import Coordinator, Phase, Settings

QUORUM, DEADLINE, STARTUP = N - 1, 5.0, 600.0


def _update(row: int, round: int) -> pb.SparseUpdate:
    return random_update(torch.Generator().manual_seed(1000 * round + row))


def _coordinator(config: RunConfig, store: CheckpointStore | None, clock: FakeClock) -> Coordinator:
    settings = Settings(QUORUM, DEADLINE, STARTUP, checkpoint_every=50)
    return build_coordinator(config, settings, store=store, clock=clock)


def _push(coordinator: Coordinator, row: int, round: int) -> None:
    seq = {w.row: w.last_seq for w in coordinator.status().workers}.get(row, 0) + 1
    coordinator.push(coordinator.door.receive(row, round, seq, _update(row, round)))


def _killed(coordinator: Coordinator) -> None:
    """What a kill -9 leaves: the log as written, no final checkpoint."""
    assert coordinator._store is not None
    coordinator._store.close()


def _resume(config: RunConfig, directory: Path, clock: FakeClock) -> Coordinator:
    store = CheckpointStore(directory, config.digest())
    resumed = _coordinator(config, store, clock)
    resumed.start(store.recover())
    return resumed


@pytest.fixture
def config() -> RunConfig:
    return tiny_config(rounds=20)


def test_a_resume_opens_at_once_and_remembers_a_worker_that_never_pushed(
    tmp_path: Path, config: RunConfig
) -> None:
    """Rounds 0-1 close on the quorum at their deadline (worker 4 registered, never pushes);
    killed in round 2 with two of its pushes logged. The resumed server is RUNNING at once,
    still counts worker 4 as registered (its only trace is the record of the open), so round 2
    neither closes on the two logged pushes nor on the quorum before the deadline."""
    clock = FakeClock()
    live = _coordinator(config, CheckpointStore(tmp_path, config.digest()), clock)
    live.start(None)
    for w in range(N):
        live.register(w)
    assert json.loads((tmp_path / OPENED).read_text())["registered"].keys() == set("01234")
    for r in range(2):
        for w in range(QUORUM):
            _push(live, w, r)
        clock.now += DEADLINE
        live.tick()
    assert live.round == 2
    for w in range(2):
        _push(live, w, 2)
    x_live = live.engine.x.clone()
    _killed(live)

    resumed = _resume(config, tmp_path, clock)
    status = resumed.status()
    assert (status.round, status.phase) == (2, Phase.RUNNING)  # not waiting for registrations
    assert [w.row for w in status.workers] == list(range(N))  # worker 4 is remembered
    assert torch.equal(resumed.engine.x, x_live)
    for w in range(QUORUM):  # the honest workers come back as before
        assert resumed.register(w) == (2, 3 if w < 2 else 2)
    clock.now += DEADLINE
    resumed.tick()
    assert resumed.round == 2, "closed on 2 < quorum pushes"
    _push(resumed, 2, 2)
    _push(resumed, 3, 2)  # the quorum, past the deadline
    assert resumed.round == 3
    for w in range(QUORUM):  # every registered worker but the silent one: the deadline
        _push(resumed, w, 3)
    assert resumed.round == 3
    clock.now += DEADLINE
    resumed.tick()
    assert resumed.round == 4
    resumed.close(checkpoint=False)


def test_a_resume_in_round_0_opens_at_once_only_if_the_run_had_opened_it(
    tmp_path: Path, config: RunConfig
) -> None:
    """Round 0's pushes are accepted before it opens, so only the record of the open tells a run
    killed in round 0 from one killed while it still waited for its workers: the first resumes
    RUNNING, with the rows registered at the open (one logged push does not close the round);
    the second waits for its registrations as a first start does."""
    clock = FakeClock()
    started, waiting = tmp_path / "started", tmp_path / "waiting"
    live = _coordinator(config, CheckpointStore(started, config.digest()), clock)
    live.start(None)
    for w in range(N):
        live.register(w)
    _push(live, 0, 0)
    _killed(live)
    resumed = _resume(config, started, clock)
    status = resumed.status()
    assert (status.round, status.phase, len(status.workers)) == (0, Phase.RUNNING, N)
    clock.now += DEADLINE
    resumed.tick()
    assert resumed.round == 0, "closed on 1 < quorum pushes"
    for w in range(1, QUORUM):
        _push(resumed, w, 0)
    assert resumed.round == 1
    resumed.close(checkpoint=False)

    live = _coordinator(config, CheckpointStore(waiting, config.digest()), clock)
    live.start(None)
    for w in range(2):  # two of five registered: round 0 has not opened
        live.register(w)
        _push(live, w, 0)
    assert live.status().phase is Phase.STARTING and not (waiting / OPENED).exists()
    _killed(live)
    resumed = _resume(config, waiting, clock)
    assert resumed.status().phase is Phase.STARTING
    clock.now += STARTUP  # the documented bound of a first start
    resumed.tick()
    assert resumed.status().phase is Phase.RUNNING and resumed.round == 1
    assert json.loads((waiting / OPENED).read_text())["registered"].keys() == {"0", "1"}
    resumed.close(checkpoint=False)


def test_a_resumed_server_process_opens_its_round_at_once(tmp_path: Path) -> None:
    """`byzps server` (startup timeout 60 s, deadline 1 s), five workers registered, worker 4
    never pushes; SIGKILLed in round 2, resumed: its round is open as soon as it listens, and
    closes about one deadline after the re-registered workers pushed, not 60 s later."""
    config = write_config(tmp_path, rounds=6, eval_every=6)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    args = ("--out", str(tmp_path / "out"), "--round-deadline", "1", "--startup-timeout", "60",
            "--linger", "0.5")  # fmt: skip
    seqs = dict.fromkeys(range(N), 0)

    def push(client: Client, w: int, round: int) -> None:
        seqs[w] += 1
        ack = client.push(str(w), round, seqs[w], _update(w, round))
        assert ack.status == pb.ACK_STATUS_ACCEPTED, ack

    with server_process(config, *args, secret_file=secret) as srv:
        client = Client(srv.address)
        for w in range(N):
            client.register(str(w))
        for r in range(2):
            for w in range(QUORUM):
                push(client, w, r)
            assert client.model(round=r + 1, wait=True, timeout=20)[0] == r + 1
        push(client, 0, 2)
        client.close()
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
    with server_process(config, *args, "--resume", secret_file=secret) as srv:
        listening = time.monotonic()
        client = Client(srv.address)
        status = client.status()
        assert (status.round, status.phase, status.registered) == (2, "running", N)
        for w in range(QUORUM):
            assert client.register(str(w)).last_seq == seqs[w]
        for w in range(1, QUORUM):
            push(client, w, 2)
        assert client.model(round=3, wait=True, timeout=20)[0] == 3
        closed = time.monotonic() - listening
        print(f"resumed round 2 closed {closed:.1f} s after the server listened")
        assert closed < 15, "the resumed server waited for registrations"
        for r in range(3, 6):
            for w in range(QUORUM):
                push(client, w, r)
            assert client.model(round=r + 1, wait=True, timeout=20)[0] == r + 1
        client.close()
        assert srv.proc.wait(30) == 0
        assert "resumed: the run had opened its first round" in srv.stderr()
    rounds = [
        json.loads(line) for line in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()
    ]
    assert [r["pushes"] for r in rounds if r["round"] >= 2] == [QUORUM] * 4


# --- shards --------------------------------------------------------------------------------


def _sharded_run(tmp: Path, procs: Processes, rounds: int, *, both: bool) -> tuple[np.ndarray, str]:
    """Two shards (startup timeout 60 s, peer timeout 10 s, deadline 1 s); worker 4 registers
    with shard 0 only (`both`: with both) and never pushes; four honest clients push Top-2
    updates of their own every round. The model, and shard 1's log."""
    from byzps.common.credentials import issue_tokens
    from byzps.worker.client import ParameterServerClient, Pushed, RetryPolicy
    from byzps.worker.shard_client import ShardedClient

    run = configs.small_config(seed=7, rounds=rounds, eval_every=rounds, k=2, shards=2)
    (tmp / "run.toml").write_text(to_toml(run))
    (tmp / "secret").write_text("test-secret")
    issue_tokens(b"test-secret", list(range(N)), tmp / "tokens")

    def shard(rank: int) -> subprocess.Popen:
        argv = byzps(
            "server", "--config", str(tmp / "run.toml"), "--listen", "127.0.0.1:0",
            "--out", str(tmp / f"shard-{rank}"), "--shard", str(rank),
            "--peers-file", str(tmp / "shards.txt"), "--round-deadline", "1",
            "--peer-timeout", "10", "--startup-timeout", "60",
            "--secret-file", str(tmp / "secret"), "--linger", "0.5",
        )  # fmt: skip
        log = (tmp / f"shard-{rank}.log").open("wb")
        return procs.start(argv, stdout=subprocess.PIPE, stderr=log)

    servers = [shard(rank) for rank in range(2)]
    addresses = [wait_listening(s) for s in servers]
    (tmp / "shards.txt").write_text("\n".join(addresses) + "\n")

    def token(w: int) -> str:
        return (tmp / "tokens" / f"worker-{w}.token").read_text().strip()

    # Bounded: with the stall, shard 0 stops after its peer timeout and a call fails soon after.
    bounded = {"retry": RetryPolicy(give_up_after=10.0), "max_wait": 30.0}
    began = time.monotonic()
    silent = (
        ShardedClient(addresses, "4", token=token(4), **bounded)
        if both
        else ParameterServerClient(addresses[0], "4", token=token(4), **bounded)
    )
    silent.register()
    honest = [ShardedClient(addresses, str(w), token=token(w), **bounded) for w in range(QUORUM)]
    for client in honest:
        client.register()
    gen = torch.Generator().manual_seed(5)
    for r in range(rounds):
        for w, client in enumerate(honest):
            update = random_update(gen, k=2)
            assert client.push(r, r + 1, update) in (Pushed.ACCEPTED, Pushed.RUN_FINISHED), w
        assert honest[0].get_model(r + 1)[0] == r + 1
    for client in (*honest, silent):
        client.close()
    codes = [s.wait(timeout=30) for s in servers]
    elapsed = time.monotonic() - began
    logs = [(tmp / f"shard-{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(text[-2000:] for text in logs)
    print(f"{'both' if both else 'shard 0 only'}: the run ended {elapsed:.1f} s after it began")
    assert elapsed < 30, "a shard waited for its startup timeout (60 s)"
    return np.load(tmp / "shard-0" / "params.npy"), logs[1]


def test_a_worker_registered_with_one_shard_only_costs_nothing(
    tmp_path: Path, procs: Processes
) -> None:
    """Shard 0 opens round 0 (all five registered), closes it at the deadline on the four
    honest pushes and waits at the barrier; shard 1 (four registered, all pushed) must open the
    round it closed rather than wait for its startup timeout (60 s) past shard 0's peer timeout
    (10 s). Both exit 0, with the model of the run where worker 4 registered with both shards
    and stayed silent, bit for bit."""
    rounds = 3
    (tmp_path / "one").mkdir()
    (tmp_path / "both").mkdir()
    one, shard1 = _sharded_run(tmp_path / "one", procs, rounds, both=False)
    assert "a peer shard opened and closed it; opening it here too" in shard1
    assert "round 0 open with 4 registered workers" in shard1
    both, _ = _sharded_run(tmp_path / "both", procs, rounds, both=True)
    assert np.isfinite(one).all() and np.array_equal(one, both)
