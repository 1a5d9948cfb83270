"""Click options shared by the commands that take a run config, and the loading of that config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from byzps.common.config import ConfigError, RunConfig

F = TypeVar("F", bound=Callable[..., object])


def config_options(command: F) -> F:
    """`--config FILE` (→ config_path) and repeatable `--set SECTION.KEY=VALUE` (→ overrides)."""
    command = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override a config key (repeatable).",
    )(command)
    return click.option(
        "--config",
        "config_path",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="The run's TOML config (every key: docs/config.md).",
    )(command)


def downlink_option(command: F) -> F:
    """`--downlink sparse|dense` (→ downlink), for `byzps server` and the server `launch` starts."""
    return click.option(
        "--downlink",
        type=click.Choice(["sparse", "dense"]),
        default="sparse",
        show_default=True,
        help="sparse: send the change of the aggregate when it is exact and smaller (mean, cm, "
        "cwtm); dense: always the whole model (a baseline for benchmarks; same results).",
    )(command)


def device_option(command: F) -> F:
    """`--device cpu|cuda|cuda:N` (→ device): `run.device` for the process that computes (the
    server, the simulator), without editing the config the workers read too."""
    return click.option(
        "--device",
        default=None,
        metavar="DEVICE",
        help="Keep the model, the per-worker states and the aggregation on DEVICE: cpu, cuda or "
        "cuda:N (sets run.device; default: the config's, cpu).",
    )(command)


def load_config(path: Path, overrides: tuple[str, ...], device: str | None = None) -> RunConfig:
    """Load, validate and check a config, turning every problem into a one-line CLI error;
    `device` (the --device option), when given, overrides `run.device`."""
    from byzps.common.catalog import check_components

    if device is not None:
        overrides = (*overrides, f"run.device={json.dumps(device)}")
    try:
        config = RunConfig.load(path, overrides)
        check_components(config)
    except ConfigError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    return config


def split_address(text: str, *, listen: bool) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPV6]:PORT; ValueError saying what is wrong. A listening
    address may use port 0 (the system picks a free one); one to connect to may not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r} (the port is missing)")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"the port of {text!r} is not a number")
    number = int(port)
    lowest = 0 if listen else 1
    if not lowest <= number <= 65535:
        raise ValueError(f"port {number} is outside {lowest}…65535")
    return host, number


class Address(click.ParamType):
    """HOST:PORT (or [IPV6]:PORT), checked when the command line is parsed; with `many`, one or
    more of them comma-separated (the shards of a sharded server)."""

    name = "HOST:PORT"

    def __init__(self, *, listen: bool = False, many: bool = False) -> None:
        self.listen = listen
        self.many = many
        if many:
            self.name = "HOST:PORT[,HOST:PORT…]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        text = str(value)
        try:
            for part in text.split(",") if self.many else [text]:
                split_address(part.strip(), listen=self.listen)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return text


def check_bindable(listen: str, option: str = "--listen") -> None:
    """Fail at once, naming `option`, when the address cannot be bound (in use, not local):
    a plain socket tries it before any slow start-up work, so a taken port costs no data
    loading and leaves no files. Port 0 always binds. The server's own bind stays the real
    check; this only makes the common failure immediate."""
    import socket

    host, port = split_address(listen, listen=True)
    if port == 0:
        return
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.BadParameter(f"{host}: {exc.strerror}", param_hint=option) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise click.BadParameter(
                f"cannot bind {listen}: {exc.strerror}", param_hint=option
            ) from None
