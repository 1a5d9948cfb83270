"""Protocol-level attacks against a real server: the guarantee each one tests, end to end.

Every test runs a real `byzps server` subprocess, honest `byzps worker` processes and one
`byzps attack --protocol NAME` process for a short run, and states what byzps promises under
that attack: (a) the attack process exits cleanly with the run, (b) every honest worker finishes
it, and (c) where the attack sends no update the server may apply, the run ends on exactly the
parameters of the same run without the attack, bit for bit (the server's --round-deadline is
far longer than any test: a round closes only when every registered worker has pushed, so the
result is deterministic). Nothing here asserts timing; benchmarks/bench_protocol_attacks.py
measures what the attacks cost.

Several guarantees rest on the server's per-worker fair-share limits (byzps.server.limits): a
server that spends a thread on every waiting or stalled call would let 48 long-polls take all of
its threads and the round could not close. The limits also meet the attacker's own calls; its
clients then back off and the attacks make room for them (byzps.worker.byzantine.protocol.
Priority), so the cohort's gradient pushes still land in their rounds and results stay comparable.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cluster_helpers import Processes, byzps, protocol_tally
from configs import small_config

from byzps.cli.main import main
from byzps.common.codec import COMPRESSOR_IDS
from byzps.common.config import to_toml
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.validation import Rejected, validate_update
from byzps.worker.byzantine import forge, h2
from byzps.worker.byzantine.protocol import PROTOCOL_ATTACKS, Priority, build_protocol_attacks

H, F = 2, 1
#: Seconds one cluster run may take before the test fails (it is killed, nothing left behind).
RUN_TIMEOUT = 60.0
#: The round deadline of the runs whose member is refused: long enough for the member to push
#: on a loaded machine (with 0.3 s, the honest quorum could end a short run before its pushes
#: arrived, and the refusal under test never happened).
REFUSAL_DEADLINE = 5.0


def a9a_config(path: Path, rounds: int = 6) -> Path:
    """The tiny a9a run: h = 2 honest workers and one bit-flipping member, Top-2."""
    path.write_text(to_toml(small_config(
        seed=11, rounds=rounds, eval_every=rounds, workers=H + F, byzantine=F, k=2, attack="bf",
    )))  # fmt: skip
    return path


def multichunk_config(path: Path) -> Path:
    """A quadratic run whose model (d = 1.2e6 float32, 4.8 MB) streams as two chunks."""
    config = small_config(seed=11, rounds=3, eval_every=3, workers=H + F, byzantine=F,
                          attack="bf", lr=0.1)  # fmt: skip
    config["task"] = {"name": "quadratic", "params": {"dim": 1_200_000, "noise": 0.0}}
    config["compressor"] = {"name": "topk", "ratio": 0.001}
    path.write_text(to_toml(config))
    return path


@dataclass
class Outcome:
    params: np.ndarray
    attack_log: str
    logs: dict[str, str]


def free_port() -> int:
    """A port nothing listens on right now, so every process can start at once (a server
    that cannot bind it after all fails the test with its log)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cluster(
    root: Path, config: Path, *attack_args: str, round_deadline: float = 600.0
) -> Outcome:
    """Server, H honest workers and one F-member attack process, all started at once (the
    clients retry until the server listens); asserts that every process exits 0 within
    RUN_TIMEOUT (all are killed otherwise) and returns the run's result."""
    root.mkdir(parents=True, exist_ok=True)
    secret, logs = root / "secret", root / "logs"
    secret.write_text("protocol-attack-tests")
    logs.mkdir()
    address = f"127.0.0.1:{free_port()}"
    procs = Processes()
    try:
        children = {
            "server": procs.start(
                byzps("server", "--config", str(config), "--listen", address,
                      "--out", str(root / "out"), "--secret-file", str(secret),
                      "--round-deadline", str(round_deadline), "--linger", "2"),
                log=logs / "server.log",
            )
        }  # fmt: skip
        common = ["--server", address, "--secret-file", str(secret), "--threads", "1",
                  "--retry-timeout", "30"]  # fmt: skip
        for k in range(H):
            children[f"worker-{k}"] = procs.start(
                byzps("worker", *common, "--id", str(k)), log=logs / f"worker-{k}.log"
            )
        children["attack"] = procs.start(
            byzps("attack", *common, "--count", str(F), "--first-id", str(H), *attack_args),
            log=logs / "attack.log",
        )
        texts = lambda: {p.stem: p.read_text() for p in logs.iterdir()}  # noqa: E731
        deadline = time.monotonic() + RUN_TIMEOUT
        for name, proc in reversed(children.items()):  # the server last: it lingers
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running after {RUN_TIMEOUT:.0f} s: {texts()}")
            assert code == 0, f"{name} exited {code}: {texts()[name][-3000:]}"
        return Outcome(np.load(root / "out" / "params.npy"), texts()["attack"], texts())
    finally:
        procs.kill_all()


@pytest.fixture(scope="module")
def a9a_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The a9a run without a protocol attack: its config and final parameters."""
    root = tmp_path_factory.mktemp("a9a")
    config = a9a_config(root / "run.toml")
    return config, run_cluster(root / "baseline", config).params


def attacked(root: Path, config: Path, name: str, *params: str) -> Outcome:
    args = ["--protocol", name, *(a for p in params for a in ("--protocol-param", p))]
    return run_cluster(root, config, *args)


def calls_made(outcome: Outcome, name: str) -> dict[str, int]:
    """The attack's own count of how its calls ended (logged when it stops)."""
    return protocol_tally(outcome.attack_log, name)


def assert_same_params(outcome: Outcome, baseline: np.ndarray) -> None:
    assert outcome.params.tobytes() == baseline.tobytes(), (
        "the attack changed the run's result: max |Δ| "
        f"{np.abs(outcome.params - baseline).max():.3e}"
    )


# --- the attacks that send no accepted update: same result as without them ---------------------


@pytest.mark.slow  # a whole cluster run; push-storm keeps one in the default suite
def test_longpoll_flood_leaves_the_run_unchanged(
    tmp_path: Path, a9a_baseline: tuple[Path, np.ndarray]
) -> None:
    """Long-polls held open by the dozen per member must not starve the pushes that close a
    round (today every poll holds a server thread)."""
    config, baseline = a9a_baseline
    outcome = attacked(tmp_path, config, "longpoll-flood", "polls=48", "deadline=300")
    assert calls_made(outcome, "longpoll-flood").get("OK", 0) > 0
    assert_same_params(outcome, baseline)


def test_push_storm_is_refused_and_leaves_the_run_unchanged(
    tmp_path: Path, a9a_baseline: tuple[Path, np.ndarray]
) -> None:
    """Replays are acknowledged as DUPLICATE, gaps and malformed updates refused; none applied."""
    config, baseline = a9a_baseline
    outcome = attacked(tmp_path, config, "push-storm", "calls=12")
    counts = calls_made(outcome, "push-storm")
    assert "ACCEPTED" not in counts
    assert counts.get("DUPLICATE", 0) > 0
    assert counts.get("FAILED_PRECONDITION", 0) > 0
    assert counts.get("INVALID_ARGUMENT", 0) > 0
    assert_same_params(outcome, baseline)


@pytest.mark.slow  # a whole cluster run; push-storm keeps one in the default suite
def test_register_storm_leaves_the_run_unchanged(
    tmp_path: Path, a9a_baseline: tuple[Path, np.ndarray]
) -> None:
    config, baseline = a9a_baseline
    outcome = attacked(tmp_path, config, "register-storm", "calls=12")
    assert calls_made(outcome, "register-storm").get("OK", 0) > 0
    assert_same_params(outcome, baseline)


@pytest.mark.slow  # a whole cluster run; push-storm keeps one in the default suite
def test_padded_requests_are_bounded_and_leave_the_run_unchanged(
    tmp_path: Path, a9a_baseline: tuple[Path, np.ndarray]
) -> None:
    """Megabytes of unknown fields and oversized updates: never applied, and the run goes on."""
    config, baseline = a9a_baseline
    outcome = attacked(tmp_path, config, "padded", "pad_bytes=2097152", "oversize_bytes=6291456")
    counts = calls_made(outcome, "padded")
    assert "ACCEPTED" not in counts
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0  # the oversized ones, at least
    assert_same_params(outcome, baseline)


@pytest.mark.slow  # a whole cluster run; push-storm keeps one in the default suite
def test_slowloris_leaves_the_run_unchanged(
    tmp_path: Path, a9a_baseline: tuple[Path, np.ndarray]
) -> None:
    """Requests that trickle in a few bytes at a time must not hold what honest calls need."""
    config, baseline = a9a_baseline
    outcome = attacked(tmp_path, config, "slowloris", "connections=8", "interval=0.5")
    assert calls_made(outcome, "slowloris").get("OPENED", 0) > 0
    assert_same_params(outcome, baseline)


@pytest.mark.slow
def test_slow_reader_leaves_the_run_unchanged(tmp_path: Path) -> None:
    """Model streams stalled after their first chunk must not hold what honest calls need."""
    config = multichunk_config(tmp_path / "run.toml")
    baseline = run_cluster(tmp_path / "baseline", config).params
    outcome = attacked(tmp_path / "attacked", config, "slow-reader", "streams=16", "hold=300")
    assert calls_made(outcome, "slow-reader").get("STALLED", 0) > 0
    assert_same_params(outcome, baseline)


# --- the attack that delays real updates: the run still finishes -------------------------------


@pytest.mark.slow  # a whole cluster run; push-storm keeps one in the default suite
def test_deadline_holds_pushes_and_the_run_finishes(tmp_path: Path) -> None:
    """Pushes held until just before the round deadline: a slowdown bounded by the deadline
    (not asserted here), and every process finishes the run."""
    config = a9a_config(tmp_path / "run.toml", rounds=4)
    outcome = run_cluster(
        tmp_path / "run", config, "--protocol", "deadline",
        "--protocol-param", "deadline=0.6", "--protocol-param", "margin=0.2",
        round_deadline=0.6,
    )  # fmt: skip
    # Held at least once (a round may close on the quorum before a late member pushes).
    assert calls_made(outcome, "deadline").get("HELD", 0) > 0
    assert np.isfinite(outcome.params).all()


# --- a member whose pushes are refused carries on ---------------------------------------------


@pytest.mark.slow  # a whole cluster run; push-storm keeps one in the default suite
def test_refused_pushes_do_not_stop_the_cohort(tmp_path: Path) -> None:
    """Gaussian noise of σ = 1e39 overflows float32: every member push carries ±inf and is
    refused at the door (INVALID_ARGUMENT). The member logs it, keeps its seq and mirror, and
    plays every round to the end; the rounds close on the honest quorum."""
    config = a9a_config(tmp_path / "run.toml", rounds=2)
    text = config.read_text().replace('name = "bf"', 'name = "gauss"\nparams = { sigma = 1e39 }')
    config.write_text(text)
    # Each round waits REFUSAL_DEADLINE for the member, so its push is refused, not too late.
    outcome = run_cluster(tmp_path / "run", config, round_deadline=REFUSAL_DEADLINE)
    assert "refused (INVALID_ARGUMENT" in outcome.attack_log
    assert "attack gauss: done" in outcome.attack_log
    assert np.isfinite(outcome.params).all()


@pytest.mark.slow
def test_overflowing_pushes_are_refused_and_the_run_stays_finite(tmp_path: Path) -> None:
    """`overflow`: the second push of ±FLT_MAX would make the member's state ±inf; the server
    refuses it at the door, the member carries on, and the model stays finite. Round 0 closes
    on all three pushes, round 1 on the deadline after the refusal."""
    config = a9a_config(tmp_path / "run.toml", rounds=2)
    config.write_text(config.read_text().replace('name = "bf"', 'name = "overflow"'))
    outcome = run_cluster(tmp_path / "run", config, round_deadline=REFUSAL_DEADLINE)
    assert "refused (INVALID_ARGUMENT" in outcome.attack_log
    assert np.isfinite(outcome.params).all()


# --- selection from the command line -------------------------------------------------------


def test_every_protocol_attack_is_offered_by_the_cli() -> None:
    result = CliRunner().invoke(main, ["attack", "--help"], terminal_width=400)
    help_text = " ".join(result.output.split()).replace("- ", "-")
    assert all(name in help_text for name in PROTOCOL_ATTACKS.names()), help_text


@pytest.mark.parametrize(
    ("names", "params", "match"),
    [
        (["flood"], [], "unknown protocol attack 'flood'"),
        (["push-storm", "push-storm"], [], "named twice"),
        (["push-storm"], ["calls"], r"\[NAME\.\]KEY=VALUE"),
        (["push-storm"], ["nope=1"], "has no parameter 'nope'"),
        (["push-storm", "padded"], ["calls=2"], "name the attack"),
        (["push-storm"], ["padded.calls=2"], "not a selected"),
        (["push-storm"], ["calls=0"], "calls must be an int"),
        (["deadline"], ["margin=20"], "below the deadline"),
        (["slow-reader"], ["hold=-1"], "hold must be seconds"),
    ],
)
def test_bad_protocol_selections_are_refused(
    names: list[str], params: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_protocol_attacks(names, params)


def test_parameters_go_to_the_named_attack() -> None:
    storm, padded = build_protocol_attacks(
        ["push-storm", "padded"], ["push-storm.calls=3", "padded.pause=0.5", "padded.calls=1"]
    )
    assert (storm.calls, padded.pause, padded.calls) == (3, 0.5, 1)  # type: ignore[attr-defined]


def test_the_cli_refuses_a_bad_selection_before_connecting() -> None:
    args = ["attack", "--server", "127.0.0.1:1", "--count", "1", "--first-id", "0",
            "--protocol", "push-storm", "--protocol-param", "calls=none"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "calls must be an int" in result.output


# --- the pieces: forged bodies, hand-made HTTP/2, making room for the cohort -------------------


@pytest.mark.parametrize(("compressor", "k_max"), [("topk", 4), ("randk", 4), ("identity", 50)])
def test_forged_updates_are_judged_as_intended(compressor: str, k_max: int) -> None:
    """The plausible update passes the door (so only its seq decides), every malformation is
    INVALID_ARGUMENT, and unknown fields inside an update make it RESOURCE_EXHAUSTED."""
    registration = pb.RegisterReply(
        model=pb.ModelSpec(dim=50), compressor=COMPRESSOR_IDS[compressor], k_max=k_max
    )

    def judge(update: pb.SparseUpdate) -> str:
        try:
            validate_update(update, dim=50, k_max=k_max, compressor=compressor)
        except Rejected as exc:
            return exc.code.name
        return "OK"

    assert judge(forge.plausible_update(registration)) == "OK"
    for kind in forge.MALFORMATIONS:
        assert judge(forge.malformed_update(registration, kind)) == "INVALID_ARGUMENT", kind
    assert judge(forge.oversized_update(registration, 4096)) == "RESOURCE_EXHAUSTED"


def test_forged_seqs_are_never_the_next_one() -> None:
    assert forge.never_next(7, replay=True) == 7
    assert forge.never_next(0, replay=True) > 1  # nothing to replay yet: a gap
    assert forge.never_next(7, replay=False) > 10**9


def test_padding_is_an_unknown_field_outside_the_update() -> None:
    request = pb.PushUpdateRequest(worker_id="3", seq=2, update=pb.SparseUpdate(dim=5))
    padded = request.SerializeToString() + forge.unknown_field(1 << 20)
    parsed = pb.PushUpdateRequest.FromString(padded)
    assert parsed.update == request.update and parsed.seq == 2
    assert parsed.ByteSize() > 1 << 20 > parsed.update.ByteSize()


def test_hpack_integers_and_frames() -> None:
    assert h2.hpack_integer(10, 5) == b"\x0a"  # RFC 7541, C.1.1
    assert h2.hpack_integer(1337, 5) == bytes([31, 154, 10])  # C.1.2
    frames = h2.frame(h2.SETTINGS, 0, 0) + h2.frame(h2.DATA, 0, 1, b"abc")
    reader = h2.FrameReader()
    got = [*reader.feed(frames[:5]), *reader.feed(frames[5:])]
    assert [(f.kind, f.stream, f.payload) for f in got] == [(h2.SETTINGS, 0, b""), (0, 1, b"abc")]


def test_the_hand_made_peer_answers_settings_and_ping() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        incoming = h2.frame(h2.SETTINGS, 0, 0) + h2.frame(h2.PING, 0, 0, b"12345678")
        h2.answer(ours, h2.FrameReader().feed(incoming), stream=1)
        acks = list(h2.FrameReader().feed(theirs.recv(1024)))
        assert [(f.kind, f.flags, f.payload) for f in acks] == [
            (h2.SETTINGS, h2.ACK, b""), (h2.PING, h2.ACK, b"12345678"),
        ]  # fmt: skip
        with pytest.raises(h2.PeerClosed):
            h2.answer(ours, h2.FrameReader().feed(h2.frame(h2.RST_STREAM, 0, 1, bytes(4))), 1)


def test_a_member_backing_off_pauses_the_attacks_and_cancels_held_calls() -> None:
    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    now = [100.0]
    priority = Priority(clock=lambda: now[0])
    stop = threading.Event()
    call = Call()
    with priority.held(call):  # type: ignore[arg-type]
        priority.backoff(0.0)
    assert call.cancelled
    waiter = threading.Thread(target=priority.wait_turn, args=(stop,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # paused for the backoff's grace
    now[0] += Priority.GRACE + 0.01
    waiter.join(5)
    assert not waiter.is_alive()


def test_the_first_push_waits_for_each_burst_loops_first_answer_and_no_longer() -> None:
    """A burst attack holds the members' first push until every loop's first burst was
    answered; a loop that never answers holds it only `within` seconds, and once."""
    attack = PROTOCOL_ATTACKS.get("push-storm")()
    ctx = type("Ctx", (), {"stop": threading.Event()})()
    attack.hold_push(ctx, 0, 0.0)  # nothing announced: no wait at all
    attack.first_bursts.expect(2, within=30.0)
    holder = threading.Thread(target=attack.hold_push, args=(ctx, 0, 0.0))
    holder.start()
    attack.first_bursts.answered()
    holder.join(0.3)
    assert holder.is_alive()  # one loop has not been answered yet
    attack.first_bursts.answered()
    holder.join(5)
    assert not holder.is_alive()
    attack.first_bursts.expect(1, within=0.2)
    began = time.monotonic()
    attack.hold_push(ctx, 0, 0.0)  # never answered: gives up after `within`
    assert 0.15 < time.monotonic() - began < 5
    began = time.monotonic()
    attack.hold_push(ctx, 1, 0.0)  # and does not wait again
    assert time.monotonic() - began < 0.1
