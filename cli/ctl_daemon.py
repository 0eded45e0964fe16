"""hcachectl commands about the daemon as a whole: status, df, stats, flush."""

from typing import Annotated

import typer

from hcache.cli.ctl_common import (
    LONG_OP_S,
    JsonOpt,
    NamespaceOpt,
    call,
    daemon,
    percent,
    print_json,
    progress,
    ratio,
    size,
    span,
    strip,
    table,
    want_json,
)
from hcache.client.errors import UnknownContext


def _capacity_line(s: dict) -> str:
    limit = size(s["capacity_limit"]) if s["capacity_limit"] else "what the file systems hold"
    ttl = span(s["ttl"]) if s["ttl"] else "off"
    return (f"capacity   {size(s['capacity'])} (limit: {limit}), {size(s['used'])} used, {size(s['free'])} free; "
            f"watermarks high {s['high_watermark']:.0%} low {s['low_watermark']:.0%}; ttl {ttl}")


def _sharing_ratio(s: dict) -> float | None:
    """What the durable contexts would take on disk with nothing shared, over what is stored; None when nothing is."""
    return round(s["logical"] / s["used"], 2) if s["used"] else None


def _sharing_line(s: dict) -> str:
    return (f"sharing    {ratio(s['logical'], s['used'])}: contexts hold {size(s['logical'])}, "
            f"{size(s['used'])} stored (full chunks they share are stored once)")


def status(as_json: JsonOpt = False) -> None:
    """The daemon: IO engine, arena, data dirs and their usage, capacity, sharing, evictions."""
    js = want_json(as_json)
    s = call("status")
    if js:
        print_json({**s, "sharing_ratio": _sharing_ratio(s)})
        return
    a = s["arena"]
    typer.echo(f"hcached {s['version']}  pid {s['pid']}  socket {s['socket']}" + (f"  tcp {s['tcp']}" if s["tcp"]
                                                                                  else "")
               + (f"  metrics http://{s['metrics']}/metrics" if s["metrics"] else ""))
    typer.echo(f"io engine  {s['engine']}")
    typer.echo(f"arena      {size(a['used'])} used of {size(a['size'])} "
               f"({size(a['dirty'])} not yet on disk)  {a['path']}")
    typer.echo(f"contexts   {s['contexts']} ({s['pinned']} pinned)   open leases {s['leases']}")
    typer.echo(_capacity_line(s))
    typer.echo(_sharing_line(s))
    ev = s["evictions"]
    typer.echo(f"evictions  {sum(ev.values())} ({', '.join(f'{k} {v}' for k, v in ev.items())})")
    if s["maintenance"]:
        typer.echo(f"busy       {s['maintenance']}")
    rows = [["DATA DIR", "IO", "STATE", "USED", "ALLOCATED"]]
    for d in s["data_dirs"]:
        rows.append([d["path"], _io(d), _state(d), size(d["used"]), size(d["allocated"])])
    typer.echo(table(rows, right={3, 4}))


def _io(d: dict) -> str:
    return "O_DIRECT" if d["direct_io"] else "buffered+fdatasync"


def _state(d: dict) -> str:
    return "ok" if d["healthy"] else f"out of rotation: {d['error']}"


def df(as_json: JsonOpt = False) -> None:
    """Disk usage per data dir and in total, against capacity; what sharing saves."""
    js = want_json(as_json)
    s = call("status")
    dirs = s["data_dirs"]
    out = {"data_dirs": [{**d, "free": max(0, d["capacity"] - d["used"])} for d in dirs],
           "total": {"capacity": s["capacity"], "used": s["used"], "free": s["free"],
                     "allocated": sum(d["allocated"] for d in dirs), "logical": s["logical"],
                     "sharing_ratio": _sharing_ratio(s)},
           "capacity_limit": s["capacity_limit"], "dir_capacity_limit": s["dir_capacity_limit"],
           "high_watermark": s["high_watermark"], "low_watermark": s["low_watermark"], "ttl": s["ttl"]}
    if js:
        print_json(out)
        return
    rows = [["DATA DIR", "IO", "CAPACITY", "ALLOCATED", "USED", "FREE", "USE%", "ERRORS", "STATE"]]
    for d in out["data_dirs"]:
        rows.append([d["path"], _io(d), size(d["capacity"]), size(d["allocated"]), size(d["used"]),
                     size(d["free"]), percent(d["used"], d["capacity"]), str(d["errors"]), _state(d)])
    t = out["total"]
    rows.append(["total", "", size(t["capacity"]), size(t["allocated"]), size(t["used"]), size(t["free"]),
                 percent(t["used"], t["capacity"]), str(sum(d["errors"] for d in dirs)), ""])
    typer.echo(table(rows, right={2, 3, 4, 5, 6, 7}))
    typer.echo(_capacity_line(s))
    typer.echo(_sharing_line(s))


def stats(as_json: JsonOpt = False) -> None:
    """The daemon's metrics (the figures its Prometheus endpoint serves)."""
    js = want_json(as_json)
    families = call("stats")["metrics"]
    if js:
        print_json({"metrics": families})
        return
    rows = [["METRIC", "LABELS", "VALUE"]]
    for fam in families:
        if fam["type"] == "histogram":
            rows += _histogram_rows(fam)
            continue
        for sample in fam["samples"]:
            if sample["name"].endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sample["labels"].items())
            value = sample["value"]
            shown = size(value) if "_bytes" in sample["name"] else f"{value:g}"
            rows.append([sample["name"], labels, shown])
    typer.echo(table(rows, right={2}))


def _histogram_rows(fam: dict) -> list[list[str]]:
    samples = fam["samples"]
    count = next((s["value"] for s in samples if s["name"].endswith("_count")), 0)
    total = next((s["value"] for s in samples if s["name"].endswith("_sum")), 0)
    rows = [[f"{fam['name']}_count", "", f"{count:g}"]]
    if count:
        rows.append([f"{fam['name']} mean", "", f"{1000 * total / count:.2f} ms"])
        buckets = [(float(s["labels"]["le"]), s["value"]) for s in samples if s["name"].endswith("_bucket")]
        for q in (0.5, 0.9, 0.99):
            le = next(b for b, n in buckets if n >= q * count)
            rows.append([f"{fam['name']} p{round(q * 100)}", "", f"<= {1000 * le:g} ms" if le != float("inf")
                         else "> largest bucket"])
    return rows


def flush(ctx: Annotated[str | None, typer.Argument(metavar="[CTX]", help="one context (default: all)")] = None,
          namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """Make everything committed durable on disk (tails padded); returns once it is."""
    js = want_json(as_json)
    durable: dict[str, int] = {}
    with daemon() as client:
        if ctx is not None:
            targets = [(namespace, ctx)]
        else:
            targets = [(c["namespace"], c["ctx"]) for c in client.call("list")["contexts"]]
        with progress("flushing") as bar:
            task = bar.add_task("flush", total=len(targets))
            for ns, cid in targets:
                try:
                    durable.update(strip(client.call("flush", timeout=LONG_OP_S, ns=ns, ctx=cid))["durable"])
                except UnknownContext:
                    if ctx is not None:
                        raise
                bar.advance(task)
    if js:
        print_json({"durable": durable})
        return
    typer.echo(f"flushed {len(durable)} contexts: everything committed is durable")
