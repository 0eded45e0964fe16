"""hcachectl: look at and manage a running hcached. Commands live in ctl_* modules and are registered here."""

from typing import Annotated

import typer

from hcache.cli import ctl_contexts, ctl_daemon, ctl_fsck
from hcache.cli.ctl_common import Opts
from hcache.cli.plan import plan

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Manage the hcache daemon (hcached). Exit codes: 0 ok, 1 a problem found, 2 usage error, "
                       "3 daemon unreachable.")


@app.callback()
def _main(
    socket: Annotated[str | None, typer.Option(help="hcached's socket (default: $HCACHE_SOCKET or the default "
                                                    "socket)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    Opts.socket, Opts.json = socket, as_json


for command in (ctl_daemon.status, ctl_daemon.df, ctl_contexts.ls, ctl_contexts.show, ctl_contexts.evict,
                ctl_contexts.pin, ctl_contexts.unpin, ctl_contexts.rm, ctl_contexts.fork, ctl_contexts.truncate,
                ctl_daemon.flush, ctl_fsck.fsck, ctl_daemon.stats, plan):
    app.command()(command)


if __name__ == "__main__":
    app()
