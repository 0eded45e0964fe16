"""What every hcachectl command shares: the daemon connection, exit codes, --json, tables, sizes, progress."""

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hcache.client.control import ControlClient
from hcache.client.errors import DaemonUnreachable, HCacheError
from hcache.layout.units import format_size

EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
LONG_OP_S = 600.0  # flush, evict, fsck: they wait for the disks

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="the context's namespace")]
CtxArg = Annotated[str, typer.Argument(metavar="CTX", help="context id (as the client named it)")]


class Opts:
    """The global options, set by the app callback."""

    socket: str | None = None
    json: bool = False


def want_json(local: bool) -> bool:
    """--json given before the command or after it."""
    Opts.json = Opts.json or local
    return Opts.json


def fail(message: str, code: int = EXIT_PROBLEM, error: str = "problem") -> typer.Exit:
    """Report an error (and with --json, also as JSON on stdout); returns the Exit to raise."""
    typer.echo(f"hcachectl: {message}", err=True)
    if Opts.json:
        typer.echo(json.dumps({"error": error, "message": message}))
    return typer.Exit(code)


@contextlib.contextmanager
def daemon() -> Iterator[ControlClient]:
    """A connection to hcached; a missing daemon exits 3 and a refused request exits 1."""
    try:
        with ControlClient(Opts.socket) as client:
            yield client
    except DaemonUnreachable as e:
        raise fail(str(e), EXIT_UNREACHABLE, "unreachable") from None
    except HCacheError as e:
        raise fail(str(e), EXIT_PROBLEM, e.code) from None


def call(op: str, timeout: float | None = None, **args: Any) -> dict:
    with daemon() as client:
        return strip(client.call(op, timeout=timeout, **args))


def strip(reply: dict) -> dict:
    """A reply without the protocol's own fields."""
    return {k: v for k, v in reply.items() if k not in ("ok", "v", "id")}


def ctx_args(ctx: str, namespace: str) -> dict:
    return {"ns": namespace, "ctx": ctx}


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Aligned columns; columns in `right` (numbers, sizes) are right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                              strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def size(n: int | float) -> str:
    return format_size(n)


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def ratio(logical: int, used: int) -> str:
    """The sharing ratio: '2.4x' when contexts hold 2.4 times the bytes stored; '-' when nothing is."""
    return f"{logical / used:.1f}x" if used else "-"


def ago(t: float, now: float | None = None) -> str:
    """'12s ago', '3m ago', '5h ago', '2d ago'."""
    return span((now or time.time()) - t) + " ago"


def span(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= length:
            return f"{s // length}{unit}"
    return f"{s}s"


def progress(what: str) -> Progress:
    """A progress bar on stderr for long operations; silent when stderr is no terminal or with --json."""
    console = Console(stderr=True)
    return Progress(SpinnerColumn(), TextColumn(what), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=Opts.json or not sys.stderr.isatty())
