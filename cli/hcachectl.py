"""hcachectl: look at and manage a running hcached."""

import json
from typing import Annotated

import typer

from hcache.cli.plan import plan
from hcache.client.control import ControlClient
from hcache.client.errors import DaemonUnreachable, HCacheError
from hcache.layout.units import format_size

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manage the hcache daemon (hcached).")
app.command()(plan)

EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class _Opts:
    socket: str | None = None
    json: bool = False


@app.callback()
def _main(
    socket: Annotated[str | None, typer.Option(help="hcached's socket (default: $HCACHE_SOCKET or the default "
                                                    "socket)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    _Opts.socket, _Opts.json = socket, as_json


def _call(op: str, **args: object) -> dict:
    try:
        with ControlClient(_Opts.socket) as c:
            return c.call(op, **args)
    except DaemonUnreachable as e:
        typer.echo(f"hcachectl: {e}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except HCacheError as e:
        typer.echo(f"hcachectl: {e}", err=True)
        raise typer.Exit(EXIT_PROBLEM) from None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@app.command()
def status() -> None:
    """The daemon: IO engine, arena, data dirs and their usage."""
    s = _call("status")
    for key in ("ok", "v", "id"):
        s.pop(key, None)
    if _Opts.json:
        typer.echo(json.dumps(s, indent=2))
        return
    a = s["arena"]
    typer.echo(f"hcached {s['version']}  pid {s['pid']}  socket {s['socket']}" + (f"  tcp {s['tcp']}" if s["tcp"]
                                                                                  else ""))
    typer.echo(f"io engine  {s['engine']}")
    typer.echo(f"arena      {format_size(a['used'])} used of {format_size(a['size'])} "
               f"({format_size(a['dirty'])} not yet on disk)  {a['path']}")
    typer.echo(f"contexts   {s['contexts']}   open leases {s['leases']}")
    rows = [["DATA DIR", "IO", "STATE", "USED", "ALLOCATED"]]
    for d in s["data_dirs"]:
        state = "ok" if d["healthy"] else f"out of rotation: {d['error']}"
        rows.append([d["path"], "O_DIRECT" if d["direct_io"] else "buffered+fdatasync", state,
                     format_size(d["used"]), format_size(d["allocated"])])
    typer.echo(_table(rows))
    used = sum(d["used"] for d in s["data_dirs"])
    cap = format_size(s["capacity"]) if s["capacity"] else "unlimited"
    typer.echo(f"disk       {format_size(used)} used, capacity {cap}")


if __name__ == "__main__":
    app()
