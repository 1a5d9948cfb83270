"""Byz-VR-MARINA over gRPC: its full-gradient rounds travel as dense 'identity' rows, which the
server admits in those rounds only, and a late update is checked under the coin the server
applies it with.

* a real cluster on 127.0.0.1 (`byzps launch`: server, 4 honest workers, a Byzantine cohort)
  finishes every round of a MARINA + Rand-k run, full and compressed rounds both, and
  reproduces the simulator (which runs the same door on its own messages);
* through a real in-process server: a Byzantine worker that skipped a full-gradient round and
  later claims it with a dense +FLT_MAX, in a compressed round whose base ĝ is ~1e32, is refused
  (OUT_OF_RANGE) and changes nothing — before the fix its candidate became +inf.
"""

from __future__ import annotations

import math
from pathlib import Path

import configs
import grpc
import numpy as np
import torch
from cluster_helpers import Processes, byzps, leftovers, log_digest, metrics
from server_support import Client, N, in_process

from byzps.common.codec import encode_sparse
from byzps.common.compressors import randk_indices
from byzps.common.config import RunConfig, to_toml
from byzps.common.server_rules import full_gradient_round
from byzps.common.sparse import INDEX_DTYPE, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.sim.build import build_simulation

SEED, P, K, D = 3, 0.5, 4, 123
#: MARINA's shared coin for run seed 3 and p = 0.5: these of rounds 0 … 5 are full.
FULL = (0, 2, 3, 5)
FLT_MAX = float(torch.finfo(torch.float32).max)


def marina_config(rounds: int = 6, aggregator: str = "cm", attack: str = "bf") -> dict:
    run = configs.small_config(
        seed=SEED, rounds=rounds, eval_every=3, k=K, aggregator=aggregator, pre=(), attack=attack
    )
    run["algorithm"] = {"name": "byz-vr-marina", "lr": 0.5, "params": {"p": P}}
    run["compressor"] = {"name": "randk", "k": K}
    return run


def test_the_coin_has_both_kinds_of_round() -> None:
    assert tuple(r for r in range(6) if full_gradient_round(SEED, r, P)) == FULL


# ----------------------------------------------------------------------------------------------
# A real cluster
# ----------------------------------------------------------------------------------------------


def test_a_marina_cluster_finishes_its_rounds_and_reproduces_the_simulator(
    tmp_path: Path, procs: Processes
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(to_toml(marina_config()))
    out = tmp_path / "net"
    log = tmp_path / "launch.log"
    launch = procs.start(byzps("launch", "--config", str(config), "--out", str(out)), log=log)
    code = launch.wait(timeout=120)
    assert code == 0, log.read_text()[-3000:] + "\n" + log_digest(out / "logs")
    records = metrics(out)
    assert [r["round"] for r in records] == [0, 3, 6]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # Nothing refused: neither an honest worker's rows nor the cohort's, which follow the same
    # honest form (dense in the full rounds, Rand-k with its seeds in the others).
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "INVALID_ARGUMENT" not in logs and "refused" not in logs
    assert leftovers(str(tmp_path)) == []

    simulation = build_simulation(RunConfig.load(config))  # what `byzps simulate` runs
    for _ in range(6):
        simulation.step()
    expected = simulation.x.numpy()
    assert np.allclose(np.load(out / "params.npy"), expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# A late full-round claim, through a real in-process server
# ----------------------------------------------------------------------------------------------


def dense(value: float) -> pb.SparseUpdate:
    vec = SparseVector(torch.arange(D, dtype=INDEX_DTYPE), torch.full((D,), value), D)
    return encode_sparse(vec, compressor="identity")


def randk(seed: int, value: float = 0.01) -> pb.SparseUpdate:
    vec = SparseVector(randk_indices(D, K, seed), torch.full((K,), value), D, seed)
    return encode_sparse(vec, compressor="randk")


def code_of_push(client: Client, worker: int, round: int, seq: int, upd: pb.SparseUpdate) -> str:
    try:
        client.push(str(worker), round, seq, upd)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return "OK"


def test_a_late_full_round_claim_cannot_overflow_a_marina_candidate() -> None:
    """Worker 4 pushes 5e32 in round 0 (so the mean's ĝ stays near 1e32), stays silent in full
    round 2, and in compressed round 4 claims round 2 with a dense +FLT_MAX. The door used to
    check it against round 2's base (0: finite) while the engine added it to ĝ³ (+inf)."""
    config = RunConfig.from_dict(marina_config(rounds=6, aggregator="mean"))
    with in_process(config, quorum=N - 1, deadline=1.0) as server:
        coordinator, engine = server.coordinator, server.coordinator.engine
        client = Client(server.address)
        try:
            for w in range(N):
                client.register(str(w))
            seqs = dict.fromkeys(range(N), 0)

            def push(w: int, r: int, upd: pb.SparseUpdate) -> None:
                seqs[w] += 1
                client.push(str(w), r, seqs[w], upd)

            for w in range(N - 1):
                push(w, 0, dense(0.01))
            push(N - 1, 0, dense(5e32))
            assert engine.round == 1
            for r in (1, 2, 3):  # worker 4 silent
                for w in range(N - 1):
                    push(w, r, dense(0.01) if r in FULL else randk(100 * r + w))
                server.clock.now += 2.0  # past the deadline, with the quorum
                coordinator.tick()
            assert engine.round == 4 and 4 not in FULL
            assert float(engine.last_aggregate.min()) > 9e31
            before = engine.rule.candidates.clone()
            late = code_of_push(client, N - 1, 2, seqs[N - 1] + 1, dense(FLT_MAX))
            assert late == (
                "OUT_OF_RANGE: round 2 is a full-gradient round and round 4, open now, is a "
                "compressed one: MARINA applies a message under its own round's coin, so this one "
                "can no longer be applied"
            )
            # Its own round's delta is checked against ĝ³, the base absorb adds it to.
            overflow = code_of_push(client, N - 1, 4, seqs[N - 1] + 1, randk(7, FLT_MAX))
            assert overflow.startswith("INVALID_ARGUMENT: applying this update would make")
            assert torch.equal(engine.rule.candidates, before)
            push(N - 1, 4, randk(7))  # neither refusal consumed its seq
            for w in range(N - 1):
                push(w, 4, randk(400 + w))
            server.clock.now += 2.0
            coordinator.tick()
            assert engine.round == 5
            assert bool(torch.isfinite(engine.rule.candidates).all())
            assert bool(torch.isfinite(engine.x).all())
        finally:
            client.close()
