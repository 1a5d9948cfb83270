"""No run is lost or mixed: an output directory belongs to one run, a live one is locked, bad
addresses are refused before anything starts, and `byzps launch` takes its children with it
however it ends (SIGHUP and SIGKILL included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import Processes, byzps, leftovers, pid_of, wait_for, wait_listening
from cluster_helpers import write_config as cluster_config
from configs import write_config

from byzps.cli.options import split_address
from byzps.cli.rundir import RunDirError, claim, lock
from byzps.common.runlock import RunLock


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(byzps(*args), capture_output=True, text=True, timeout=timeout)


# --- the directory rules, in-process ---------------------------------------------------------


def test_claim_refuses_a_run_unless_told_and_overwrite_removes_only_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim(out, can_resume=True)  # absent: fine
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "other.txt").write_text("not ours")
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl.*--resume"):
        claim(out, can_resume=True, owned=("metrics.jsonl",))
    with pytest.raises(RunDirError, match=r"pass --overwrite to replace it"):
        claim(out, can_resume=False, owned=("metrics.jsonl",))
    claim(out, resume=True, can_resume=True, owned=("metrics.jsonl",))  # nothing touched
    assert (out / "metrics.jsonl").exists()
    claim(out, overwrite=True, can_resume=True, owned=("metrics.jsonl",))
    assert sorted(p.name for p in out.iterdir()) == ["other.txt"]
    with pytest.raises(RunDirError, match="exclude each other"):
        claim(out, resume=True, overwrite=True, can_resume=True)


def test_a_lock_is_exclusive_names_its_holder_and_tidies_up(tmp_path: Path) -> None:
    out = tmp_path / "new"
    held = lock(out, "server")
    assert (out / "server.lock").read_text().strip() == str(os.getpid())
    holder = subprocess.run(
        [sys.executable, "-c", "from byzps.common.runlock import RunLock; RunLock("
         f"__import__('pathlib').Path({str(out)!r}), 'server')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert holder.returncode != 0 and f"in use by another byzps process (PID {os.getpid()})" in (
        holder.stderr
    )
    refusal = rf"in use by another byzps process \(PID {os.getpid()}\)"
    with pytest.raises(RunDirError, match=refusal):  # the CLI's: one line, exit 2
        lock(out, "server")
    held.release(tidy=True)
    assert not out.exists()  # it made the directory, wrote nothing else: gone again
    RunLock(out, "server").release()


@pytest.mark.parametrize(
    ("text", "listen", "message"),
    [
        ("127.0.0.1:99999", True, "outside 0…65535"),
        ("localhost", False, "the port is missing"),
        ("localhost:0", False, "outside 1…65535"),
        ("::1:5000", True, "needs brackets"),
        ("host:port", False, "not a number"),
        ("[::1:5000", True, r"expected \[IPV6\]:PORT"),
    ],
)
def test_bad_addresses(text: str, listen: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_address(text, listen=listen)


def test_good_addresses() -> None:
    assert split_address("[::1]:50051", listen=False) == ("[::1]", 50051)
    assert split_address("0.0.0.0:0", listen=True) == ("0.0.0.0", 0)


# --- the commands ------------------------------------------------------------------------------


def test_address_errors_name_the_option_and_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml")
    bad_listen = run("server", "--config", str(config), "--listen", "127.0.0.1:99999", "--no-auth")
    assert bad_listen.returncode == 2 and "--listen" in bad_listen.stderr
    assert "outside 0…65535" in bad_listen.stderr
    no_port = run("worker", "--server", "localhost", "--id", "0")
    assert no_port.returncode == 2 and "'--server'" in no_port.stderr
    assert "the port is missing" in no_port.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = tmp_path / "out"
        in_use = run("server", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                     "--no-auth", "--out", str(out))  # fmt: skip
    assert in_use.returncode == 2 and "Address already in use" in in_use.stderr
    assert "Traceback" not in in_use.stderr and "add_port.cc" not in in_use.stderr  # no C log
    assert not out.exists()  # nothing left behind


def test_a_second_server_on_a_live_run_is_refused_and_changes_nothing(
    tmp_path: Path, procs: Processes
) -> None:
    config = write_config(tmp_path / "run.toml", rounds=50)
    out = tmp_path / "out"
    args = ["server", "--config", str(config), "--listen", "127.0.0.1:0", "--no-auth",
            "--out", str(out)]  # fmt: skip
    first = procs.start(byzps(*args), stdout=subprocess.PIPE)
    wait_listening(first)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = run(*args, *extra)
        assert second.returncode == 2, second.stderr
        assert f"in use by another byzps process (PID {first.pid})" in second.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    again = run(*args, "--startup-timeout", "0.1", "--linger", "0", timeout=60)
    assert again.returncode == 2 and "--resume to continue it or --overwrite" in again.stderr


def test_simulate_refuses_to_overwrite_a_finished_run(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", rounds=5)
    out = tmp_path / "sim"
    assert run("simulate", "--config", str(config), "--out", str(out)).returncode == 0
    before = (out / "summary.json").read_bytes()
    refused = run("simulate", "--config", str(config), "--out", str(out), "--set", "run.seed=9")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert (out / "summary.json").read_bytes() == before
    replaced = run("simulate", "--config", str(config), "--out", str(out), "--set", "run.seed=9",
                   "--overwrite")  # fmt: skip
    assert replaced.returncode == 0 and (out / "summary.json").read_bytes() != before


@pytest.mark.slow  # three launches of a 400-round run
def test_launch_refuses_an_existing_run_and_resumes_it_when_asked(
    tmp_path: Path, procs: Processes
) -> None:
    config = cluster_config(tmp_path / "run.toml", rounds=400, eval_every=50)
    out = tmp_path / "out"
    args = ["launch", "--config", str(config), "--out", str(out)]
    first = procs.start(byzps(*args), log=tmp_path / "first.log")
    wait_for(lambda: any(r["round"] >= 100 for r in records(out)), 240, "round 100")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 128 + signal.SIGINT
    before = records(out)
    refused = run(*args)
    assert refused.returncode == 2 and "--resume to continue it or --overwrite" in refused.stderr
    assert records(out) == before
    other = run(*args, "--resume", "--set", "run.rounds=500", timeout=300)
    assert other.returncode != 0  # another config: the server will not resume this run
    assert records(out) == before
    resumed = run(*args, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = records(out)
    assert after[: len(before)] == before  # continued, not restarted
    assert [r["round"] for r in after] == list(range(0, 401, 50))
    replaced = run(*args, "--overwrite", "--set", "run.rounds=20", timeout=300)
    assert replaced.returncode == 0
    assert [r["round"] for r in records(out)] == [0, 20]


def records(out: Path) -> list[dict[str, object]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.parametrize("how", [signal.SIGHUP, signal.SIGKILL])
def test_launch_takes_every_child_with_it(tmp_path: Path, procs: Processes, how: int) -> None:
    config = cluster_config(tmp_path / "run.toml", rounds=100_000, eval_every=1000)
    launch = procs.start(
        byzps("launch", "--config", str(config), "--out", str(tmp_path / "out")),
        log=tmp_path / "launch.log",
    )
    wait_for(lambda: len(leftovers(str(tmp_path))) >= 7, 120, "server, 4 workers and cohort")
    pid_of(str(tmp_path), " server ")
    launch.send_signal(how)
    code = launch.wait(timeout=60)
    assert code == (128 + signal.SIGHUP if how == signal.SIGHUP else -signal.SIGKILL)
    wait_for(lambda: leftovers(str(tmp_path)) == [], 60, "every child to end")
    time.sleep(0.5)
    assert leftovers(str(tmp_path)) == []
