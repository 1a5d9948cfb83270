"""The `byzps` command-line entry point."""

from __future__ import annotations

import click

from byzps.cli.attack import attack
from byzps.cli.cluster import follow_parent
from byzps.cli.confirm import confirm
from byzps.cli.credentials import credentials
from byzps.cli.daemon_common import keep_freed_memory, quiet_idle_threads
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


#: Optional dependencies by import name: what to install when one is missing.
OPTIONAL = {"sklearn": "pip install 'byzps[tasks]' (scikit-learn, for the digits-mlp task)"}


def environment_error(exc: BaseException) -> str | None:
    """One line a user can act on for an error of the environment (a missing file, package or
    permission), or None for anything else (a bug: that keeps its traceback)."""
    if isinstance(exc, ModuleNotFoundError):
        name = (exc.name or "").split(".")[0]
        hint = OPTIONAL.get(name, f"pip install {name}")
        return f"the optional dependency {name!r} is not installed: {hint}"
    if isinstance(exc, FileNotFoundError) and exc.filename is None:
        return str(exc)  # our own messages (a data set not found) say what to install
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return None


class Main(click.Group):
    """The command group, turning environment errors into one line and exit code 1 (with
    --debug, or BYZPS_DEBUG=1, the traceback instead)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (OSError, ModuleNotFoundError) as exc:
            message = environment_error(exc)
            if message is None or ctx.params.get("debug"):
                raise
            click.echo(f"Error: {message} (--debug shows the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="byzps")
@click.option(
    "--debug",
    is_flag=True,
    envvar="BYZPS_DEBUG",
    help="Show the traceback of an environment error (missing file, package, permission).",
)
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """byzps: a Byzantine-robust parameter server with compressed communication."""
    del debug  # read by Main.invoke
    if ctx.invoked_subcommand in DAEMONS:
        quiet_idle_threads()  # before any option callback or command imports torch
        keep_freed_memory()
        follow_parent()  # a child of `byzps launch` ends with it


@main.command()
@click.argument("name", required=False)
@click.option("-v", "--verbose", is_flag=True, help="Each component's doc line and parameters.")
@click.option(
    "--markdown", is_flag=True, help="The whole config reference (docs/config.md) as Markdown."
)
def components(name: str | None, verbose: bool, markdown: bool) -> None:
    """List every algorithm, compressor, aggregator, attack and task byzps can build by name.

    With NAME, describe that component: its doc line and its parameters with their defaults.
    """
    from byzps.cli import reference
    from byzps.common.catalog import registries

    if markdown:
        if name is not None or verbose:
            raise click.UsageError("--markdown takes neither NAME nor --verbose")
        click.echo(reference.config_reference(), nl=False)
        return
    if name is not None:
        found = reference.find(name)
        if not found:
            known = ", ".join(sorted(n for r in registries().values() for n in r.names()))
            raise click.BadParameter(f"no component {name!r}; known: {known}", param_hint="NAME")
        for _, registry in found:
            click.echo(f"{registry.kind} {name}")
            click.echo("\n".join(reference.component_text(registry, name, indent="  ")))
        return
    for kind, registry in registries().items():
        if not verbose:
            click.echo(f"{kind:12s} {', '.join(registry.names())}")
            continue
        click.echo(f"{kind}:")
        for component in registry.names():
            click.echo(f"  {component}")
            click.echo("\n".join(reference.component_text(registry, component, indent="      ")))


main.add_command(simulate)
main.add_command(sweep)
main.add_command(report)
main.add_command(confirm)
main.add_command(server)
main.add_command(status)
main.add_command(worker)
main.add_command(attack)
main.add_command(launch)
main.add_command(deploy)
main.add_command(credentials)

if __name__ == "__main__":
    main()
