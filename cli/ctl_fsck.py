"""hcachectl fsck: verify every chunk on disk and the index's reference counts, or rebuild the index from headers."""

from typing import Annotated

import typer

from hcache.cli.ctl_common import (
    EXIT_PROBLEM,
    LONG_OP_S,
    JsonOpt,
    daemon,
    print_json,
    progress,
    size,
    strip,
    table,
    want_json,
)
from hcache.client.errors import UnknownContext

_INDEX_CHECK = ("chunks_indexed", "shared", "leaked", "dangling")  # the index's reference counts against references


def fsck(rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild the index from the chunk headers "
                                                                 "alone (after it was lost or damaged)")] = False,
         as_json: JsonOpt = False) -> None:
    """Read every chunk back and check its header and crc, and the index's reference counts; exit 1 on a problem."""
    js = want_json(as_json)
    if rebuild:
        with daemon() as client, progress("rebuilding the index from chunk headers") as bar:
            bar.add_task("rebuild", total=None)
            r = strip(client.call("fsck", timeout=LONG_OP_S, rebuild=True))
        if js:
            print_json(r)
        else:
            typer.echo(f"index rebuilt from chunk headers: {r['contexts']} contexts, {r['chunks']} chunks, "
                       f"{r['tokens']} tokens")
        return
    checked = nbytes = 0
    problems: list[dict] = []
    with daemon() as client:
        contexts = client.call("list")["contexts"]
        with progress("verifying chunks") as bar:
            task = bar.add_task("fsck", total=sum(c["bytes"] for c in contexts) or 1)
            for c in contexts:
                try:
                    r = client.call("fsck", timeout=LONG_OP_S, ns=c["namespace"], ctx=c["ctx"])
                except UnknownContext:
                    continue  # deleted since the list
                checked += r["checked"]
                nbytes += r["bytes"]
                problems += r["problems"]
                bar.advance(task, c["bytes"])
        r = client.call("fsck", timeout=LONG_OP_S, index=True)  # the index's reference counts, once
        index = {k: r[k] for k in _INDEX_CHECK}
    bad_refs = index["leaked"] + index["dangling"]
    if js:
        print_json({"contexts": len(contexts), "checked": checked, "bytes": nbytes, "problems": problems, **index})
    else:
        typer.echo(f"checked {checked} chunks ({size(nbytes)}) of {len(contexts)} contexts: "
                   f"{len(problems) or 'no'} problems")
        if problems:
            rows = [["NAMESPACE", "CONTEXT", "LAYER", "REP", "CHUNK", "DATA DIR", "PROBLEM"]]
            rows += [[p["namespace"], p["ctx"], str(p["layer"]), str(p["rep"]), str(p["chunk"]), p["dir"],
                      p["problem"]] for p in problems]
            typer.echo(table(rows, right={2, 3, 4}))
            typer.echo("restoring these chunks fails; remove their contexts (hcachectl rm) or save them again")
        typer.echo(f"index: {index['chunks_indexed']} chunks ({index['shared']} shared by several contexts), "
                   f"{index['leaked']} leaked, {index['dangling']} dangling")
        if bad_refs:
            typer.echo("the index's reference counts disagree with its contexts (a leaked chunk's space is never "
                       "freed, a dangling one may be overwritten while a context still reads it): rebuild the "
                       "index with hcachectl fsck --rebuild, then pin contexts again")
    if problems or bad_refs:
        raise typer.Exit(EXIT_PROBLEM)
