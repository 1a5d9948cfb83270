"""A mutual-TLS PKI for tests, made with `byzps credentials` itself (the real CLI, in process).

Layout of the directory `make_pki` fills:

    ca.pem, ca.key                  the trusted CA
    server.pem, server.key          valid for 127.0.0.1, localhost and byzps-server
    worker-K.pem, worker-K.key      K = 0 … 4: each names worker K only
    operator.pem, operator.key      names no worker (Status only)
    other/ca.pem, other/ca.key      a CA nobody trusts
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from byzps.cli.main import main


def credentials(*args: str) -> None:
    """Run `byzps credentials ARGS`; fail with its output unless it succeeds."""
    result = CliRunner().invoke(main, ["credentials", *args])
    assert result.exit_code == 0, result.output


def make_pki(directory: Path, workers: str = "0-4") -> Path:
    """Fill `directory` as the module doc says; return it."""
    ca = str(directory)
    credentials("ca", "--out", ca, "--days", "2")
    credentials("ca", "--out", str(directory / "other"), "--days", "2")
    credentials("cert", "--ca", ca, "--server", "localhost", "--server", "byzps-server",
                "--ip", "127.0.0.1", "--out", ca, "--days", "2")  # fmt: skip
    credentials("cert", "--ca", ca, "--worker", workers, "--out", ca, "--days", "2")
    credentials("cert", "--ca", ca, "--operator", "--out", ca, "--days", "2")
    return directory
