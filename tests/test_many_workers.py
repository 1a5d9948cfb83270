"""Many identities against one real server (issue 12, item 3): n = 1,000 on loopback, nothing lost.

The end-to-end runs drive benchmarks/bench_many_workers.py's `run_one`: a `byzps server` process
on 127.0.0.1 and fleet processes (byzps.worker.fleet) holding the identities, each with its own
token, seq and estimator row. "Nothing lost" is checked three ways: the server's per-worker
`byzps_updates_accepted` is exactly the number of rounds for every id (with no duplicate, refusal
or throttled call), every identity's ledger holds exactly the seqs 1 … rounds, and the final
params.npy is bit-identical to `byzps simulate` of the same config.

The fair-share and file-descriptor tests pin what keeps n = 1,000 safe and possible.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_support import load_benchmark

from byzps.server.limits import Admission, Group, Limits
from byzps.server.validation import Rejected


def load_bench():
    return load_benchmark("bench_many_workers")


def run(tmp_path: Path, n: int, rounds: int, processes: int, timeout: float):
    bench = load_bench()
    args = argparse.Namespace(
        rounds=rounds, dim=10_000, aggregator="cm", pre=[], f=0, attack="bf", protocol=None,
        processes=processes, per_connection=128, pushers=8, fetch_each=False, timeout=timeout,
        out=tmp_path,
    )  # fmt: skip
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the daemons run (children inherit)
    return bench.run_one(n, args)


def test_two_hundred_identities_lose_nothing(tmp_path: Path) -> None:
    result = run(tmp_path, n=200, rounds=5, processes=1, timeout=240)
    assert result.problems == []
    assert result.pushes == 200 * 5
    assert result.rounds_per_s > 0


@pytest.mark.slow  # ~2 min on the 2-core machine
def test_a_thousand_identities_run_thirty_rounds_and_lose_nothing(tmp_path: Path) -> None:
    result = run(tmp_path, n=1000, rounds=30, processes=2, timeout=600)
    assert result.problems == []
    assert result.pushes == 1000 * 30


def test_a_workers_rate_shrinks_with_n_so_f_workers_take_f_over_n() -> None:
    limits = Limits()
    assert limits.worker_rate(20) == (limits.per_second, limits.burst)  # small runs: unchanged
    for n in (200, 500, 1000):
        rate, burst = limits.worker_rate(n)
        assert n * rate <= limits.total_per_second + 1e-9  # the server's total stays fixed
        assert rate >= limits.min_per_second and burst >= 2 * limits.per_round
    # Without the cap, 100 Byzantine workers of 1,000 could call 100 × 50/s: 5,000 calls/s.
    now = [0.0]
    adm = Admission(limits, 1000, clock=lambda: now[0])
    admitted = 0
    for _ in range(100):  # one flooding worker, 10 s, 100 calls every 0.1 s
        now[0] += 0.1
        for _ in range(100):
            try:
                with adm.enter(7, Group.STATUS):
                    admitted += 1
            except Rejected:
                pass
    rate, burst = limits.worker_rate(1000)
    assert admitted <= burst + 10 * rate + 1  # 32 + 20, not 256 + 500
    assert admitted >= burst  # the bucket it starts with is its own


def test_a_status_call_pays_for_its_per_worker_table() -> None:
    """Status with a credential answers a line per worker (O(n) under the coordinator's lock),
    so at n = 1,000 it takes n / 64 tokens: a flooding worker gets ~16× fewer of them."""
    limits = Limits()
    assert limits.status_cost(5) == 1.0 and limits.status_cost(1000) == 1000 / 64
    now = [0.0]
    adm = Admission(limits, 1000, clock=lambda: now[0])
    cost = limits.status_cost(1000)
    admitted = 0
    for _ in range(100):  # 10 s of a Status flood
        now[0] += 0.1
        for _ in range(10):
            try:
                with adm.enter(7, Group.STATUS, cost):
                    admitted += 1
            except Rejected:
                pass
    rate, burst = limits.worker_rate(1000)
    assert admitted <= (burst + 10 * rate) / cost + 1  # 3, where one token a call gave 52
    assert admitted >= 1


def test_an_honest_worker_at_n_1000_is_never_throttled() -> None:
    """A round's calls (re-register, fetch, push, a few retries) fit the refill of every closed
    round, however slow the rounds are."""
    now = [0.0]
    adm = Admission(Limits(), 1000, clock=lambda: now[0])
    for _ in range(50):  # slow rounds: 3 s each, 6 calls a round
        now[0] += 3.0
        for group in (Group.REGISTER, Group.MODEL, Group.PUSH, Group.PUSH, Group.MODEL):
            with adm.enter(3, group):
                pass
        adm.round_closed()
    assert not any(adm.refused.values())


def test_the_server_raises_its_open_file_limit_for_n_workers() -> None:
    """A soft limit of 512 (below the 1,000 connections of n = 1,000) is raised up to the hard
    limit, so workers past it can still connect."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2256:
        pytest.skip(f"the hard open-file limit here is {hard}, below what n = 1,000 needs")
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1]))\n"
        "from byzps.server.daemon import raise_descriptor_limit\n"
        "print(raise_descriptor_limit(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    returned, now = map(int, done.stdout.split())
    assert returned == now >= 2 * 1000 + 256


def test_idle_connections_cannot_take_the_descriptors_the_server_writes_with(
    tmp_path: Path,
) -> None:
    """A server whose open-file limit is 400 (hard: it cannot raise it) meets 500 idle HTTP/2
    connections, which need no credential: they are held to the connection cap, its limit less
    the 256 descriptors kept for files, so the checkpoint of the round that closes during the
    flood is written and the workers connected before it go on. Uncapped, the connections took
    every descriptor and each checkpoint failed (EMFILE)."""
    import contextlib
    import socket

    import torch
    from server_support import SECRET, Client, N, random_update, server_process, write_config

    from byzps.worker.byzantine.h2 import PREFACE, SETTINGS, frame

    def newest(directory: Path) -> str:
        return max((p.name for p in directory.glob("ckpt-*.pt")), default="")

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    config = write_config(tmp_path, rounds=4, eval_every=1)
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--round-deadline", "60")
    with server_process(config, *args, secret_file=secret, open_files=400) as srv:
        client = Client(srv.address)
        for w in range(N):
            client.register(str(w))
        host, port = srv.address.rsplit(":", 1)
        flood = []
        try:
            for _ in range(500):
                sock = socket.create_connection((host, int(port)), timeout=5)
                flood.append(sock)
                with contextlib.suppress(OSError):  # turned away past the cap
                    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
            held = len(list(Path(f"/proc/{srv.proc.pid}/fd").iterdir()))
            written = newest(ckpt)
            gen = torch.Generator().manual_seed(0)
            for w in range(N):
                client.push(str(w), 0, 1, random_update(gen))
            deadline = time.monotonic() + 30
            while newest(ckpt) <= written:  # round 1's checkpoint, written in the background
                assert time.monotonic() < deadline, srv.stderr()[-2000:]
                time.sleep(0.1)
        finally:
            for sock in flood:
                sock.close()
            client.close()
        assert held < 400 - 100, held
        assert srv.proc.poll() is None
        assert "Too many open files" not in srv.stderr()


def test_a_fleet_runs_every_identity_under_its_own_token(tmp_path: Path) -> None:
    """A fleet over shared connections (`per_connection`) takes a run to its end with every
    identity's own seqs; given another id's token, it cannot act as that id."""
    from server_support import SECRET, N, in_process, tiny_config

    from byzps.common.credentials import token_for
    from byzps.worker.fleet import parse_ids, run_fleet

    assert parse_ids("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    config = tiny_config(rounds=4)
    ids = list(range(N))
    with in_process(config) as srv:
        wrong = {"0": token_for(SECRET, "1")}
        with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
            run_fleet(srv.address, [0], wrong, per_connection=1)
        tokens = {str(i): token_for(SECRET, str(i)) for i in ids}
        ledger = tmp_path / "ledger.jsonl"
        fleet = run_fleet(srv.address, ids, tokens, per_connection=2, ledger_path=ledger)
        assert fleet.last_seq == [4] * N
        assert srv.coordinator.round == 4
        seqs = {}
        for line in ledger.read_text().splitlines():
            entry = json.loads(line)
            seqs.setdefault(entry["worker"], []).append(entry["seq"])
        assert seqs == {str(i): [1, 2, 3, 4] for i in ids}


def test_a_scrape_flood_takes_at_most_its_share_of_the_server_at_n_1000() -> None:
    """/metrics at n = 1,000 renders thousands of series (~0.1 s holding the GIL): after each
    answer the endpoint waits 1 / MAX_BUSY_SHARE times its rendering before the next."""
    import urllib.request

    from byzps.server.metrics import MAX_BUSY_SHARE, MetricsEndpoint, PrometheusMetrics

    metrics = PrometheusMetrics(1000)
    for row in range(1000):
        metrics.update_acked(row, duplicate=False, wire_bytes=800)
    endpoint = MetricsEndpoint("127.0.0.1:0", metrics.registry)
    try:
        ends, renders = [], []
        for _ in range(3):  # back to back: a flood
            body = urllib.request.urlopen(endpoint.url, timeout=60).read()
            ends.append(time.monotonic())
            renders.append(endpoint._httpd.rendering.seconds)
            assert b'byzps_updates_accepted_total{worker="999"} 1.0' in body
        assert ends[2] - ends[0] >= 0.9 * (renders[0] + renders[1]) / MAX_BUSY_SHARE
    finally:
        endpoint.close()
