"""`byzps deploy slurm` for real: a single-node Slurm cluster runs the generated sbatch script.

The test starts munge, slurmctld and slurmd (Slurm 22.05, Debian's slurm-wlm) with a private
config, the two Slurm daemons inside a network namespace of their own (Slurm listens on every
address and has no bind option; the namespace keeps it, and the job's gRPC traffic, off the
host's network). It submits the script `byzps deploy slurm` wrote, waits for the job, and checks
that it completed with exit code 0 and that the server's final parameters equal `byzps
simulate`'s on the same config (the launch test's tolerance). Then it requeues the finished job:
the second run starts the server with --resume and the workers from their checkpoints on the
shared run directory, and must end on the same parameters. Everything it started is stopped and
the namespace deleted, whatever happens.

Needs root, iproute2, nsenter and slurm-wlm + munge (installed with apt when absent and allowed,
tests/deploy_support.py; otherwise skipped with the reason).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import byzps, leftovers, wait_for, write_config
from deploy_support import need_packages, need_root

pytestmark = pytest.mark.slow

#: A /30 from the benchmarking range, on a veth pair that lives inside the namespace only:
#: Slurm resolves its own address with AI_ADDRCONFIG, which fails with loopback alone.
VETH_ADDR = "198.18.0.1/30"
TIMEOUT = 240


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_root("a private Slurm cluster")
    need_packages(["ip"], ["iproute2"])
    need_packages(["nsenter", "runuser"], ["util-linux"])
    need_packages(["slurmctld", "slurmd", "sbatch", "munged"], ["slurm-wlm", "munge"])


SLURM_CONF = """\
ClusterName=byzps
SlurmctldHost={host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 RealMemory=1000 State=UNKNOWN
PartitionName=byzps Nodes={host} Default=YES MaxTime=30 State=UP OverSubscribe=FORCE:4
"""


@dataclass
class Cluster:
    """A running single-node Slurm: its config, and `run` for commands inside its namespace."""

    conf: Path
    netns: str

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *args]

    def run(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "SLURM_CONF": str(self.conf)},
        )  # fmt: skip
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout


def _kill_pidfile(path: Path) -> None:
    if path.exists():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(path.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[Cluster]:
    """munged (its own socket), slurmctld and slurmd in a fresh namespace; all torn down."""
    # Not under tmp_path: pytest's base directory is 0700, and the daemons run as slurm/munge.
    state = Path(tempfile.mkdtemp(prefix="byzps-slurm-"))
    state.chmod(0o755)
    for sub in ("state", "spool", "log", "munge"):
        (state / sub).mkdir()
    shutil.chown(state / "state", "slurm", "slurm")
    shutil.chown(state / "log", "slurm", "slurm")
    shutil.chown(state / "munge", "munge", "munge")
    host = socket.gethostname()
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, d=state, ctld_port=6817, d_port=6818))
    netns = f"byzps-slurm-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(conf, netns)
    socket_path = state / "munge" / "munge.socket"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True, timeout=10)
        inside = ["ip", "-n", netns]
        for args in (["link", "set", "lo", "up"],
                     ["link", "add", "bzs0", "type", "veth", "peer", "name", "bzs1"],
                     ["addr", "add", VETH_ADDR, "dev", "bzs0"],
                     ["link", "set", "bzs0", "up"], ["link", "set", "bzs1", "up"]):  # fmt: skip
            subprocess.run([*inside, *args], check=True, capture_output=True, timeout=10)
        # munge's own socket (not the system's /run/munge), so a munged already running is
        # left alone; Slurm finds it through AuthInfo.
        with conf.open("a") as f:
            f.write(f"AuthInfo=socket={socket_path}\n")
        subprocess.run(
            ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={socket_path}",
             f"--pid-file={state / 'munge' / 'munged.pid'}", "--force"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        subprocess.run(cluster.argv("slurmctld"), check=True, env=env, timeout=30)
        subprocess.run(cluster.argv("slurmd", "-N", host), check=True, env=env, timeout=30)
        wait_for(lambda: "idle" in _sinfo(cluster), 60, "the Slurm node to become idle", 0.5)
        yield cluster
    finally:
        subprocess.run(cluster.argv("scancel", "--full", "-u", "root"), env=env,
                       capture_output=True, timeout=30)  # fmt: skip
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not _queue(cluster), 30, "the cancelled jobs to end", 0.5)
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            _kill_pidfile(state / pidfile)
        time.sleep(2)
        # What outlived the daemons: slurmstepd (its environment names this cluster's config)
        # and the job's processes (their command lines name this test's directory).
        jobs = [int(line.split(":", 1)[0]) for line in leftovers(str(tmp_path))]
        for pid in _stepds(conf) + jobs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
        shutil.rmtree(state, ignore_errors=True)


def _daemon_logs(cluster: Cluster, lines: int = 40) -> str:
    """The last lines of slurmctld's and slurmd's logs (for a failure's message)."""
    tails = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = cluster.conf.parent / "log" / name
        text = path.read_text(errors="replace") if path.exists() else "(none)"
        tails.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(tails)


def _queue(cluster: Cluster) -> str:
    try:
        return cluster.run("squeue", "-h", timeout=10).strip()
    except (AssertionError, subprocess.TimeoutExpired):
        return ""


def _stepds(conf: Path) -> list[int]:
    """Pids of the slurmstepd processes of the cluster configured by `conf`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry / "comm").read_text().strip() != "slurmstepd":
                continue
            if f"SLURM_CONF={conf}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
    return found


def _sinfo(cluster: Cluster) -> str:
    try:
        return cluster.run("sinfo", "-h", "-o", "%T", timeout=10)
    except AssertionError:
        return ""


def _job_state(cluster: Cluster, job: str) -> dict[str, str]:
    text = cluster.run("scontrol", "show", "job", "-o", job)
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def _wait_job(cluster: Cluster, job: str, restarts: int, run_dir: Path) -> dict[str, str]:
    """The job's final state, once it finished its `restarts`-th requeue; the job's output in
    the error when it does not finish in time."""
    try:
        return wait_for(lambda: _finished(cluster, job, restarts), TIMEOUT, f"job {job}", 1.0)
    except TimeoutError as exc:
        output = run_dir / f"byzps-{job}.out"
        tail = output.read_text()[-3000:] if output.exists() else "(no output)"
        raise AssertionError(f"{exc}: {_job_state(cluster, job)}\n{tail}") from None


def _finished(cluster: Cluster, job: str, restarts: int) -> dict[str, str] | None:
    state = _job_state(cluster, job)
    done = state["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
    return state if done and int(state.get("Restarts", "0")) >= restarts else None


def _simulate(config: Path, out: Path) -> np.ndarray:
    subprocess.run(byzps("simulate", "--config", str(config), "--out", str(out)),
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return np.load(out / "params.npy")


def _prepare_job(config: Path, run_dir: Path) -> str:
    """`byzps deploy slurm` into `run_dir` with a fresh secret and tokens for ids 0 … 4; the
    --export for sbatch (this interpreter's byzps, every server address on 127.0.0.1)."""
    subprocess.run(
        byzps("deploy", "slurm", "--config", str(config), "--out", str(run_dir)),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    subprocess.run(byzps("credentials", "secret", "--out", str(run_dir / "secret")),
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    subprocess.run(
        byzps("credentials", "issue", "--secret-file", str(run_dir / "secret"), "--ids", "0-4",
              "--out", str(run_dir / "credentials")),
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    python_bin = Path(byzps()[0]).parent
    return (f"ALL,BYZPS={python_bin / 'byzps'},BYZPS_SERVER_HOST=127.0.0.1,"
            f"PATH={python_bin}:{os.environ['PATH']}")  # fmt: skip


def test_the_generated_sbatch_script_runs_and_matches_the_simulator(
    tmp_path: Path, slurm: Cluster
) -> None:
    config = write_config(tmp_path / "config.toml", rounds=30, eval_every=10)
    expected = _simulate(config, tmp_path / "sim")
    run_dir = tmp_path / "job"
    exports = _prepare_job(config, run_dir)
    started = time.monotonic()
    job = slurm.run("sbatch", "--parsable", f"--chdir={run_dir}", f"--export={exports}",
                    str(run_dir / "byzps.sbatch")).strip()  # fmt: skip
    state = _wait_job(slurm, job, 0, run_dir)
    output = (run_dir / f"byzps-{job}.out").read_text()
    print(f"slurm job {job}: {state['JobState']} exit {state['ExitCode']} "
          f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), output[-8000:]
    got = np.load(run_dir / "server" / "params.npy")
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    print(f"slurm vs simulate: relative error {rel:.3e}")
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7), rel
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"worker-{k}" for k in range(4)
    ]

    # A requeue (what Slurm does after a node failure or a preemption) resumes: the server
    # from its checkpoint and write-ahead log, the workers from theirs.
    slurm.run("scontrol", "requeue", job)
    # Slurm holds a requeued job back for a while (BeginTime, from cred_expire); release it now,
    # but not within the second its credential was revoked in: slurmd refuses a launch whose
    # credential is not newer than the revocation ("Job credential revoked"; the run then fails
    # in 0 s without output, as it did here about one time in eight).
    wait_for(lambda: _job_state(slurm, job)["JobState"] == "PENDING", 60, "the requeue", 0.5)
    time.sleep(2.0)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = _wait_job(slurm, job, 1, run_dir)
    output = (run_dir / f"byzps-{job}.out").read_text()  # both runs: --open-mode=append
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"{state}\n{output[-4000:]}\n{_daemon_logs(slurm)}"
    )
    assert output.count("round 0/30 |") == 1, output[-8000:]  # resumed, not started over
    assert "nothing to resume" not in output
    # Both times the script ended the server's linger with SIGTERM, and it stopped gracefully.
    assert output.count(f"signal {int(signal.SIGTERM)}: shutting down") == 2, output[-8000:]
    assert np.allclose(np.load(run_dir / "server" / "params.npy"), expected,
                       rtol=1e-5, atol=1e-7)  # fmt: skip
    wait_for(lambda: not leftovers(str(tmp_path)) and not _stepds(slurm.conf), 30,
             "the job's processes to end")  # fmt: skip


def test_a_sharded_run_runs_as_one_step_per_shard(tmp_path: Path, slurm: Cluster) -> None:
    """cluster.shards = 2: the script starts the two shards as steps server-0 and server-1
    (ports PORT and PORT + 1), the workers push to both, and shard 0 writes the simulator's
    model (which runs the same two column shards); both shards end by SIGTERM, gracefully."""
    config = write_config(tmp_path / "config.toml", rounds=30, eval_every=10)
    config.write_text(config.read_text().replace("[cluster]\n", "[cluster]\nshards = 2\n"))
    expected = _simulate(config, tmp_path / "sim")
    run_dir = tmp_path / "job"
    exports = _prepare_job(config, run_dir)
    job = slurm.run("sbatch", "--parsable", f"--chdir={run_dir}", f"--export={exports}",
                    str(run_dir / "byzps.sbatch")).strip()  # fmt: skip
    state = _wait_job(slurm, job, 0, run_dir)
    output = (run_dir / f"byzps-{job}.out").read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), output[-8000:]
    assert output.count(f"signal {int(signal.SIGTERM)}: shutting down") == 2, output[-8000:]
    got = np.load(run_dir / "server-0" / "params.npy")
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not (run_dir / "server-1" / "params.npy").exists()  # rank 0 writes the results
    wait_for(lambda: not leftovers(str(tmp_path)) and not _stepds(slurm.conf), 30,
             "the job's processes to end")  # fmt: skip
