"""Click options shared by the commands that take a run config, and the loading of that config."""

from __future__ import annotations

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


def load_config(path: Path, overrides: tuple[str, ...]) -> RunConfig:
    """Load, validate and check a config, turning every problem into a one-line CLI error."""
    from byzps.common.catalog import check_components

    try:
        config = RunConfig.load(path, overrides)
        check_components(config)
    except ConfigError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    return config
