"""hcachectl commands about contexts: ls, show, evict, pin, unpin, rm, fork, truncate."""

import time
from datetime import datetime
from typing import Annotated

import typer

from hcache.cli.ctl_common import (
    EXIT_PROBLEM,
    EXIT_USAGE,
    LONG_OP_S,
    CtxArg,
    JsonOpt,
    NamespaceOpt,
    ago,
    call,
    ctx_args,
    fail,
    print_json,
    progress,
    size,
    span,
    table,
    want_json,
)
from hcache.layout.units import parse_size


def ls(namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="only this namespace")] = None,
       as_json: JsonOpt = False) -> None:
    """Contexts held, most recently accessed first."""
    js = want_json(as_json)
    args = {"ns": namespace} if namespace is not None else {}
    contexts = sorted(call("list", **args)["contexts"], key=lambda c: -c["accessed"])
    if js:
        print_json({"contexts": contexts})
        return
    if not contexts:
        typer.echo("no contexts")
        return
    now = time.time()
    rows = [["NAMESPACE", "CONTEXT", "MODEL", "TOKENS", "DURABLE", "SIZE", "LAST ACCESS", "PINNED"]]
    for c in contexts:
        rows.append([c["namespace"], c["ctx"], c["model"], str(c["n_tokens"]), str(c["durable_tokens"]),
                     size(c["bytes"]), ago(c["accessed"], now), "pinned" if c["pinned"] else ""])
    typer.echo(table(rows, right={3, 4, 5}))


def show(ctx: CtxArg, namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """One context: model, geometry, tokens, size, where its chunks are, when it was used."""
    js = want_json(as_json)
    c = call("stat", detail=True, **ctx_args(ctx, namespace))
    if js:
        print_json(c)
        return
    g = c["geometry"]
    now = time.time()
    expires = "never (pinned)" if c["pinned"] else "never (no ttl)"
    if c["expires"] is not None:
        expires = f"in {span(c['expires'] - now)}"
    lines = [
        ["context", f"{c['namespace']}/{c['ctx']}"],
        ["model", c["model"]],
        ["geometry", f"{g['num_layers']} layers, hidden {g['hidden_size']}, {g['num_kv_heads']} kv heads x "
                     f"{g['head_dim']}, {g['dtype']}"],
        ["layers", "  ".join(f"{rep} {_ranges(layers)}" for rep, layers in c["layers"].items() if layers)],
        ["tokens", f"{c['n_tokens']} ({c['durable_tokens']} durable)"],
        ["size", f"{size(sum(c['disk_bytes'].values()))} on disk ({size(c['bytes'])} of data)"],
        ["created", f"{_when(c['created'])} ({ago(c['created'], now)})"],
        ["accessed", f"{_when(c['accessed'])} ({ago(c['accessed'], now)})"],
        ["pinned", "yes" if c["pinned"] else "no"],
        ["shares", "yes: its full chunks are shared with contexts that start with the same tokens" if c["share"]
                   else "no: every chunk is its own"],
        ["expires", expires],
    ]
    typer.echo(table(lines))
    typer.echo()
    rows = [["LAYER", "REP", "CHUNKS", "SHARED", "ON DISK", "IN ARENA", "DIRTY"]]
    for s in c["placement"]:
        rows.append([str(s["layer"]), s["rep"], str(s["chunks"]), str(s["shared"]), str(s["on_disk"]),
                     str(s["in_arena"]), str(s["dirty"])])
    typer.echo(table(rows, right={0, 2, 3, 4, 5, 6}))
    typer.echo()
    typer.echo(table([["DATA DIR", "BYTES"], *([d, size(n)] for d, n in c["disk_bytes"].items())], right={1}))


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(out)


def evict(ctx: Annotated[str | None, typer.Argument(metavar="[CTX]", help="the context to evict")] = None,
          until_free: Annotated[str | None, typer.Option("--until-free", metavar="SIZE",
                                                         help="evict least recently used contexts until SIZE "
                                                              "(e.g. 10GiB) is free")] = None,
          namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """Evict one context, or LRU contexts until SIZE is free; pinned contexts are never evicted."""
    js = want_json(as_json)
    if (ctx is None) == (until_free is None):
        raise fail("give either CTX or --until-free SIZE (not both)", EXIT_USAGE, "usage")
    if ctx is not None:
        r = call("evict", timeout=LONG_OP_S, **ctx_args(ctx, namespace))
    else:
        try:
            want = parse_size(until_free)
        except ValueError as e:
            raise fail(str(e), EXIT_USAGE, "usage") from None
        with progress(f"evicting until {size(want)} is free") as bar:
            bar.add_task("evict", total=None)
            r = call("evict", timeout=LONG_OP_S, until_free=want)
    if js:
        print_json(r)
    else:
        for ns, cid in r["evicted"]:
            typer.echo(f"evicted {ns}/{cid}")
        typer.echo(f"freed {size(r['freed'])}; {size(r['free'])} free now")
    if not r.get("reached", True):
        typer.echo(f"hcachectl: only {size(r['free'])} is free: the rest is pinned or in use (unpin contexts, or "
                   "rm them)", err=True)
        raise typer.Exit(EXIT_PROBLEM)


def _pin(ctx: str, namespace: str, as_json: bool, pinned: bool) -> None:
    js = want_json(as_json)
    c = call("pin", pinned=pinned, **ctx_args(ctx, namespace))
    if js:
        print_json(c)
    else:
        typer.echo(f"{'pinned' if pinned else 'unpinned'} {c['namespace']}/{c['ctx']}")


def pin(ctx: CtxArg, namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """Keep a context: it is never evicted (capacity, TTL or evict) until unpinned."""
    _pin(ctx, namespace, as_json, True)


def unpin(ctx: CtxArg, namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """Let a pinned context be evicted again."""
    _pin(ctx, namespace, as_json, False)


def rm(ctx: CtxArg, namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """Delete a context from the arena and disk, pinned or not."""
    js = want_json(as_json)
    call("delete", timeout=LONG_OP_S, **ctx_args(ctx, namespace))
    if js:
        print_json({"removed": [namespace, ctx]})
    else:
        typer.echo(f"removed {namespace}/{ctx}")


def fork(src: Annotated[str, typer.Argument(metavar="SRC", help="the context to fork")],
         dst: Annotated[str, typer.Argument(metavar="DST", help="the new context's id (same namespace)")],
         tokens: Annotated[int, typer.Option("--tokens", "-t", min=1, metavar="N",
                                             help="how many leading tokens of SRC it holds")],
         namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """A new context DST holding the first N tokens of SRC: their full chunks are shared, not copied."""
    js = want_json(as_json)
    c = call("fork", timeout=LONG_OP_S, dst=dst, n=tokens, **ctx_args(src, namespace))
    if js:
        print_json(c)
    else:
        typer.echo(f"forked {namespace}/{src} into {c['namespace']}/{c['ctx']}: {c['n_tokens']} tokens")


def truncate(ctx: CtxArg, tokens: Annotated[int, typer.Option("--tokens", "-t", min=0, metavar="N",
                                                               help="how many leading tokens it keeps")],
             namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """Keep the first N tokens of a context; contexts sharing its chunks keep theirs."""
    js = want_json(as_json)
    c = call("truncate", timeout=LONG_OP_S, n=tokens, **ctx_args(ctx, namespace))
    if js:
        print_json(c)
    else:
        typer.echo(f"truncated {c['namespace']}/{c['ctx']} to {c['n_tokens']} tokens")
