"""`byzps attack` registers under no id but its own: --first-id is required, the run config is
read by registering one of the process's own ids, and an id range outside the run is refused
before anything is registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from server_support import SECRET, F, N, in_process, tiny_config

from byzps.cli.main import main
from byzps.worker.byzantine.daemon import _read_config, run_attack
from byzps.worker.session import WorkerError


def registered(address: str) -> list[str]:
    from server_support import Client

    client = Client(address)
    try:
        return sorted(w.worker_id for w in client.status(as_worker="0").workers)
    finally:
        client.close()


def test_first_id_is_required() -> None:
    result = CliRunner().invoke(main, ["attack", "--server", "127.0.0.1:1", "--count", "1"])
    assert result.exit_code == 2  # click's usage error, before any connection
    assert "Missing option '--first-id'" in result.output


def test_first_id_must_not_be_negative() -> None:
    args = ["attack", "--server", "127.0.0.1:1", "--count", "1", "--first-id", "-1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--first-id" in result.output


def test_reading_the_config_registers_only_an_own_id() -> None:
    config = tiny_config()
    with in_process(config) as srv:
        reply = _read_config(srv.address, SECRET, N - 1, None)
        assert reply.config_json  # the run config came back
        assert registered(srv.address) == [str(N - 1)]  # no honest id, no "0"


def test_ids_outside_the_run_register_nothing() -> None:
    config = tiny_config()
    with in_process(config) as srv:
        with pytest.raises(WorkerError, match=rf"member id {N}\b.*outside \[0, {N}\)"):
            run_attack(srv.address, SECRET, count=F + 1, first_id=N - F)
        assert registered(srv.address) == []


def test_cli_refuses_ids_outside_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the command line: exit 2 with the server's reason, and no id registered."""
    monkeypatch.setattr("signal.signal", lambda *args: None)  # keep pytest's SIGTERM handler
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    config = tiny_config()
    with in_process(config) as srv:
        args = ["attack", "--server", srv.address, "--secret-file", str(secret), "--count", "2",
                "--first-id", str(N - 1), "--retry-timeout", "5"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert f"member id {N} " in caplog.text
        assert registered(srv.address) == []
