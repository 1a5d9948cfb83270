"""The command line keeps the usual conventions: help on every option, `python -m byzps`,
--version, and environment errors as one line a user can act on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from byzps.cli.main import environment_error, main


def every_option(command: click.Command, path: tuple[str, ...] = ("byzps",)):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from every_option(sub, (*path, name))
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            yield " ".join(path), param


def test_every_option_says_what_it_does() -> None:
    missing = [f"{where} {param.opts[0]}" for where, param in every_option(main) if not param.help]
    assert missing == []


def test_python_dash_m_byzps_is_the_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "byzps", "--version"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("byzps, version ")


def test_environment_errors_are_one_line() -> None:
    missing = ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    assert "pip install 'byzps[tasks]'" in (environment_error(missing) or "")
    denied = PermissionError(13, "Permission denied", "/runs/out")
    assert environment_error(denied) == "/runs/out: Permission denied"
    ours = FileNotFoundError("Fashion-MNIST not found: install dataset-fashion-mnist")
    assert environment_error(ours) == str(ours)
    assert environment_error(ValueError("a bug")) is None  # keeps its traceback


def test_a_missing_data_set_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[task]\nname = "fmnist-cnn"\n[compressor]\nratio = 0.1\n')
    env = {"BYZPS_FASHION_MNIST_DIR": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "byzps"]
    args = ["simulate", "--config", str(config), "--out", str(tmp_path / "out")]
    plain = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("Error: Fashion-MNIST not found")
    assert "dataset-fashion-mnist" in plain.stderr and len(plain.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    debug = subprocess.run(
        [*base, "--debug", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_an_unwritable_out_is_one_line_naming_the_option(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = Path(__file__).resolve().parents[1] / "experiments" / "cluster" / "a9a.toml"
    done = subprocess.run(
        [sys.executable, "-m", "byzps", "simulate", "--config", str(config), "--out",
         str(blocker / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--out {blocker / 'out'}: cannot write there" in done.stderr


def test_a_worker_without_a_server_says_how_long_it_keeps_trying() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "byzps", "worker", "--server", "127.0.0.1:1", "--id", "0",
         "--retry-timeout", "7"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3  # unreachable, as the exit codes document
    assert "retrying for up to 7 s" in done.stderr and "s left before giving up" in done.stderr
    assert "Traceback" not in done.stderr
