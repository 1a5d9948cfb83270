"""`byzps server --metrics`: the Prometheus endpoint of a live server, parsed with the client
library's own parser and, in the slow test, scraped by a real Prometheus server.

One server process serves the whole module: five workers register and push three rounds, one
duplicate and one refused update, and a call under a wrong token; /metrics is read before and
after the refusals, so each test compares exact counts with what was sent."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from click.testing import CliRunner, Result
from deploy_support import need_packages
from prometheus_client.parser import text_string_to_metric_families
from server_support import (
    SECRET,
    Client,
    N,
    ServerProcess,
    server_process,
    update,
    write_config,
)

from byzps.cli.main import main
from byzps.common.credentials import token_for
from byzps.server.metrics import MAX_REQUESTS_PER_SECOND, MetricsEndpoint, PrometheusMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "byzps.json"
ROUNDS = 3  # rounds pushed; the run has more, so the server is still serving when read
METRICS_LINE = re.compile(r"metrics on (http://\S+/metrics)")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample of /metrics as {(name, sorted labels): value}, and each sample name's
    series name as docs/metrics.md lists it (a counter's with _total, a histogram's bare)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples: Samples = {}
    names = {}
    for family in text_string_to_metric_families(text):
        listed = f"{family.name}_total" if family.type == "counter" else family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
            names[s.name] = listed
    return samples, names


def settled(url: str, timeout: float = 10) -> Samples:
    """/metrics once no call is in progress: a refused caller hears its status a moment before
    the server counts the call, and the in-progress gauge drops last."""
    end = time.monotonic() + timeout
    while True:
        samples, _ = scrape(url)
        busy = sum(v for k, v in samples.items() if k[0] == "byzps_calls_in_progress")
        if busy == 0 or time.monotonic() > end:
            return samples
        time.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def per_worker(samples: Samples, name: str) -> dict[str, float]:
    """{worker id: value} of a family labelled by worker alone."""
    return {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == name}


@dataclass
class Run:
    url: str
    before: Samples  # after the rounds and the duplicate
    after: Samples  # after the refused push and the bad token too
    names: dict[str, str]  # sample name → listed series name
    round: int
    norm: float


def metrics_url(srv: ServerProcess) -> str:
    found = METRICS_LINE.search(srv.stderr())
    assert found, srv.stderr()
    return found.group(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("metrics")
    config = write_config(tmp, rounds=ROUNDS + 5)
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    args = ("--metrics", "127.0.0.1:0", "--round-deadline", "600", "--checkpoint-every", "0")
    with server_process(config, *args, secret_file=secret) as srv:
        url = metrics_url(srv)
        client = Client(srv.address)
        try:
            for w in range(N):
                client.register(str(w))
            gen = torch.Generator().manual_seed(0)
            for r in range(ROUNDS):
                for w in range(N):
                    idx = int(torch.randint(123, (1,), generator=gen))
                    client.push(str(w), r, r + 1, update([idx], [float(r + 1)]))
            client.push("4", ROUNDS - 1, ROUNDS, update([0], [1.0]))  # a duplicate of seq 3
            before = settled(url)
            with pytest.raises(grpc.RpcError) as refused:
                client.push("1", ROUNDS, ROUNDS + 1, update([1, 2], [math.nan, 1.0]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as forged:  # worker 2's id, worker 0's token
                client.push("2", ROUNDS, ROUNDS + 1, update([1], [1.0]),
                            token=token_for(SECRET, "0"))  # fmt: skip
            assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
            after = settled(url)
            _, names = scrape(url)
            status = client.status(as_worker="0")
            _, x = client.model(round=ROUNDS)
            yield Run(url, before, after, names, status.round, float(x.double().norm()))
        finally:
            client.close()


def test_rounds_closed_is_the_servers_round_and_the_histograms_count_them(run: Run) -> None:
    assert run.round == ROUNDS
    assert value(run.after, "byzps_rounds_closed_total") == ROUNDS
    assert value(run.after, "byzps_round") == ROUNDS
    for name in ("byzps_round_duration_seconds", "byzps_aggregation_duration_seconds"):
        buckets = sorted(
            (float(dict(k[1])["le"]), v) for k, v in run.after.items() if k[0] == f"{name}_bucket"
        )
        counts = [v for _, v in buckets]
        assert len(counts) > 10 and counts == sorted(counts)  # cumulative
        assert buckets[-1] == (math.inf, ROUNDS) == (math.inf, value(run.after, f"{name}_count"))
        assert value(run.after, f"{name}_sum") > 0
    assert value(run.after, "byzps_model_norm") == pytest.approx(run.norm, rel=1e-6)
    assert run.norm > 0


def test_per_worker_counts_are_what_each_worker_sent(run: Run) -> None:
    ids = [str(w) for w in range(N)]
    assert per_worker(run.before, "byzps_updates_accepted_total") == dict.fromkeys(ids, ROUNDS)
    # Top-1 float32: an index and a value, 8 bytes per update
    assert per_worker(run.before, "byzps_update_bytes_total") == dict.fromkeys(ids, 8 * ROUNDS)
    assert per_worker(run.before, "byzps_registrations_total") == dict.fromkeys(ids, 1)
    duplicates = per_worker(run.before, "byzps_updates_duplicate_total")
    assert duplicates == {**dict.fromkeys(ids, 0), "4": 1}
    assert value(run.before, "byzps_workers_registered") == N == value(run.before, "byzps_workers")
    assert value(run.before, "byzps_calls_total", method="PushUpdate", code="OK") == N * ROUNDS + 1
    assert value(run.before, "byzps_received_bytes_total") > 0
    assert value(run.before, "byzps_sent_bytes_total") > 0


def test_a_refused_push_counts_for_its_worker_and_reason_only(run: Run) -> None:
    changed = {
        key: (run.before.get(key, 0.0), v)
        for key, v in run.after.items()
        if key[0].startswith("byzps_")
        and not key[0].endswith("_created")
        and run.before.get(key, 0.0) != v
    }
    refused = ("byzps_updates_refused_total", (("reason", "INVALID_ARGUMENT"), ("worker", "1")))
    assert changed.pop(refused) == (0.0, 1.0)
    for code in ("INVALID_ARGUMENT", "UNAUTHENTICATED"):
        key = ("byzps_calls_total", (("code", code), ("method", "PushUpdate")))
        assert changed.pop(key) == (0.0, 1.0)
    # The forged call names worker 2 but proved no id: it is charged to nobody.
    assert set(changed) <= {("byzps_received_bytes_total", ())}, changed


def test_worker_labels_are_the_configured_ids_only(run: Run) -> None:
    labels = {dict(key[1])["worker"] for key in run.after if "worker" in dict(key[1])}
    assert labels == {str(w) for w in range(N)}
    metrics = PrometheusMetrics(N)
    metrics.update_acked(N, duplicate=False, wire_bytes=8)  # the operator's row, or a bug
    metrics.call_ended("PushUpdate", "ipv4:1", "INVALID_ARGUMENT", N)
    metrics.registered(-1)
    exported = {
        s.labels.get("worker") for family in metrics.registry.collect() for s in family.samples
    }
    assert exported == {None, *map(str, range(N))}
    with pytest.raises(ValueError, match="num_workers"):
        PrometheusMetrics(0)


def test_the_endpoint_is_read_only_and_serves_metrics_only(run: Run) -> None:
    base = run.url.removesuffix("/metrics")
    with pytest.raises(urllib.error.HTTPError) as elsewhere:
        urllib.request.urlopen(base + "/", timeout=10)
    assert elsewhere.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(run.url, b"x", method="POST"), timeout=10)
    assert posted.value.code == 405


def test_the_endpoint_answers_at_most_20_requests_a_second() -> None:
    endpoint = MetricsEndpoint("127.0.0.1:0", PrometheusMetrics(2).registry)
    try:
        began = time.monotonic()
        for _ in range(11):
            with urllib.request.urlopen(endpoint.url, timeout=10) as reply:
                assert b"byzps_workers 2.0" in reply.read()
        assert time.monotonic() - began >= 10 / MAX_REQUESTS_PER_SECOND == 0.5
    finally:
        endpoint.close()
    with socket.socket() as again:  # closed: the port can be listened on again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        again.bind(("127.0.0.1", endpoint.port))
        again.listen()


def listed(run: Run) -> set[str]:
    """The byzps series names, without prometheus-client's `_created` timestamps."""
    names = run.names.values()
    return {n for n in names if n.startswith("byzps_") and not n.endswith("_created")}


def test_the_documentation_lists_every_series(run: Run) -> None:
    table = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(byzps_\w+)`", table, re.MULTILINE))
    assert documented == listed(run)


def dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\b(?:byzps|process)_\w+", e)}


def test_the_grafana_dashboard_shows_every_exported_series(run: Run) -> None:
    used = dashboard_metrics()
    assert used <= run.names.keys(), used - run.names.keys()
    assert {run.names[m] for m in used if m.startswith("byzps_")} == listed(run)


def server_cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["server", "--config", str(config), "--no-auth", *args])


@pytest.mark.parametrize(
    ("address", "message"),
    [("localhost", "the port is missing"), ("127.0.0.1:99999", "outside 0…65535")],
)
def test_a_bad_metrics_address_is_one_line_naming_the_option(
    tmp_path: Path, address: str, message: str
) -> None:
    done = server_cli(write_config(tmp_path), "--listen", "127.0.0.1:0", "--metrics", address)
    assert done.exit_code == 2 and "'--metrics'" in done.stderr and message in done.stderr
    assert done.stdout == ""


def test_a_metrics_port_in_use_is_refused_like_listen(tmp_path: Path) -> None:
    config, out = write_config(tmp_path), tmp_path / "out"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = server_cli(
            config, "--listen", "127.0.0.1:0", "--metrics", address, "--out", str(out)
        )
        listen = server_cli(config, "--listen", address)
    assert done.exit_code == listen.exit_code == 2
    expected = f"cannot bind {address}: Address already in use"
    assert done.stderr.splitlines()[-1] == f"Error: Invalid value for --metrics: {expected}"
    assert listen.stderr.splitlines()[-1] == f"Error: Invalid value for --listen: {expected}"
    assert not out.exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------
# A real Prometheus server scraping a live run
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(api: str, expr: str) -> dict:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_prometheus_scrapes_a_live_run(tmp_path: Path) -> None:
    need_packages(["prometheus"], ["prometheus"])
    config = write_config(tmp_path, rounds=50)
    with server_process(config, "--metrics", "127.0.0.1:0", "--round-deadline", "600") as srv:
        target = urllib.parse.urlparse(metrics_url(srv)).netloc
        client = Client(srv.address, secret=None)
        for w in range(N):
            client.register(str(w))
        for r in range(2):
            for w in range(N):
                client.push(str(w), r, r + 1, update([r], [1.0]))
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs:\n  - job_name: byzps\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        web = f"127.0.0.1:{_free_port()}"
        with tempfile.TemporaryFile() as log:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
                stdout=log, stderr=log,
            )  # fmt: skip
            try:
                found = _poll(f"http://{web}", "byzps_rounds_closed_total", deadline=90)
                assert found is not None, _tail(log)
                print(f"\nprometheus: byzps_rounds_closed_total = {found}")
                assert found == [target, "2"]
                for expr in _dashboard_exprs():  # every panel's query is valid PromQL
                    assert _query(f"http://{web}", expr)["status"] == "success", expr
            finally:
                prometheus.terminate()
                prometheus.wait(30)
        client.close()


def _poll(api: str, expr: str, deadline: float) -> list[str] | None:
    """[instance, value] of the first series `expr` returns with a value > 0, or None."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            for series in _query(api, expr)["data"]["result"]:
                if float(series["value"][1]) > 0:
                    return [series["metric"]["instance"], series["value"][1]]
        except (OSError, ValueError, KeyError):
            pass  # not up yet
        time.sleep(0.5)
    return None


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "1m") for p in panels for t in p["targets"]]


def _tail(log: object) -> str:
    log.seek(0)  # type: ignore[attr-defined]
    return log.read().decode()[-2000:]  # type: ignore[attr-defined]


def test_suspicion_scores_are_one_gauge_per_configured_worker(run: Run) -> None:
    scores = per_worker(run.after, "byzps_worker_suspicion")
    assert set(scores) == {str(w) for w in range(N)}
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
