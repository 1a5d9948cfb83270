"""The `byzps` command-line entry point."""

from __future__ import annotations

import click

from byzps.cli.attack import attack
from byzps.cli.launch import launch
from byzps.cli.report import report
from byzps.cli.server import server
from byzps.cli.simulate import simulate
from byzps.cli.status import status
from byzps.cli.sweep import sweep
from byzps.cli.worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="byzps")
def main() -> None:
    """byzps: a Byzantine-robust parameter server with compressed communication."""


@main.command()
def components() -> None:
    """List every algorithm, compressor, aggregator, attack and task byzps can build by name."""
    from byzps.cli.catalog import catalog

    for kind, names in catalog().items():
        click.echo(f"{kind:12s} {', '.join(names)}")


main.add_command(simulate)
main.add_command(sweep)
main.add_command(report)
main.add_command(server)
main.add_command(status)
main.add_command(worker)
main.add_command(attack)
main.add_command(launch)

if __name__ == "__main__":
    main()
