"""The `byzps` command-line entry point."""

from __future__ import annotations

import click

from byzps.cli.attack import attack
from byzps.cli.daemon_common import quiet_idle_threads
from byzps.cli.deploy import deploy
from byzps.cli.launch import launch
from byzps.cli.report import report
from byzps.cli.server import server
from byzps.cli.simulate import simulate
from byzps.cli.status import status
from byzps.cli.sweep import sweep
from byzps.cli.worker import worker

#: Commands that run (or start) network daemons, whose threads must not spin while idle.
DAEMONS = frozenset({"server", "worker", "attack", "launch"})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="byzps")
@click.pass_context
def main(ctx: click.Context) -> None:
    """byzps: a Byzantine-robust parameter server with compressed communication."""
    if ctx.invoked_subcommand in DAEMONS:
        quiet_idle_threads()  # before any option callback or command imports torch


@main.command()
def components() -> None:
    """List every algorithm, compressor, aggregator, attack and task byzps can build by name."""
    from byzps.common.catalog import catalog

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
main.add_command(deploy)

if __name__ == "__main__":
    main()
