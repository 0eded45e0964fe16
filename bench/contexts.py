"""hcached's request latency as the contexts it holds grow to a host's worth (100k): status, append, read."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from report import git_info, host_info, log, run_and_save, subplots

from hcache.client import AsyncHCacheClient
from hcache.daemon.process import DaemonProcess
from hcache.layout.geometry import Geometry

# Small contexts: what a request costs besides its bytes. A host holds this many of a small model's chats.
GEOMETRY = Geometry(num_layers=1, hidden_size=64, num_kv_heads=1, head_dim=64, dtype="float32")
LEVELS = (1_000, 10_000, 50_000, 100_000)
OPENS_IN_FLIGHT = 64
SAMPLE_S = 3.0  # of each request kind, per level



def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="a directory for hcached's state and data; a fresh temp dir is made in it and removed")
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="context counts to measure at")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return p.parse_args()


async def latencies(call, seconds: float) -> dict:
    """Milliseconds per call, one at a time for `seconds`: median, 99th percentile and the worst."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1e3)
    out.sort()
    return {"p50_ms": statistics.median(out), "p99_ms": out[int(len(out) * 0.99)], "max_ms": out[-1], "n": len(out)}


async def open_contexts(client: AsyncHCacheClient, first: int, end: int) -> float:
    """Open contexts c<first> .. c<end - 1>, OPENS_IN_FLIGHT at a time; opens per second."""
    gate = asyncio.Semaphore(OPENS_IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            await client.open(f"c{i}", model="bench", geometry=GEOMETRY)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(first, end)))
    return (end - first) / (time.perf_counter() - started)


async def measure_levels(socket: str, levels: list[int]) -> list[dict]:
    client = await AsyncHCacheClient.connect(socket)
    appended = 0

    async def append() -> None:  # one token more of a small context
        nonlocal appended
        await client.append("probe", [appended], {"hidden": torch.zeros(1, 1, GEOMETRY.hidden_size)})
        appended += 1

    try:
        await client.open("probe", model="bench", geometry=GEOMETRY)
        await append()
        held, rows = 0, []
        for level in sorted(levels):
            rate = await open_contexts(client, held, level)
            held = level
            log(f"{level} contexts (opened at {rate:.0f}/s)")
            rows.append({"contexts": level, "open_per_s": rate,
                         "status": await latencies(client.status, SAMPLE_S),
                         "append": await latencies(append, SAMPLE_S),
                         "read": await latencies(lambda: client.restore("probe", "hidden", [0], 0, 1), SAMPLE_S)})
            log(json.dumps({k: rows[-1][k] for k in ("status", "append", "read")}))
    finally:
        await client.close()
    return rows


def measure(args: argparse.Namespace, root: Path) -> dict:
    # A TTL makes the evictor look at contexts in LRU order twice a second, as a deployment with one would.
    d = DaemonProcess(root, dram="256MiB", extra=["--ttl", "30d"]).start()
    try:
        levels = asyncio.run(measure_levels(d.socket, args.levels))
    finally:
        d.cleanup()
    return {"benchmark": "contexts", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": host_info(root), "git": git_info(), "geometry": GEOMETRY.to_dict(), "ttl": "30d",
            "sample_s": SAMPLE_S, "levels": levels}


def plot(result: dict):  # noqa: ANN201 - a matplotlib figure
    fig, ax = subplots(figsize=(7, 4))
    x = [r["contexts"] for r in result["levels"]]
    for op in ("status", "append", "read"):
        ax.plot(x, [r[op]["p50_ms"] for r in result["levels"]], marker="o", label=f"{op} p50")
        ax.plot(x, [r[op]["max_ms"] for r in result["levels"]], marker="x", linestyle=":", label=f"{op} max")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("contexts held by hcached")
    ax.set_ylabel("request latency, ms")
    ax.set_title("hcached latency against contexts held (TTL on)")
    ax.legend(fontsize=8)
    return fig


def summary(result: dict) -> str:
    lines = [f"{'contexts':>9} {'status p50/max ms':>18} {'append p50/max ms':>18} {'read p50/max ms':>16}"]
    for r in result["levels"]:
        cells = [f"{r[op]['p50_ms']:.2f} / {r[op]['max_ms']:.1f}" for op in ("status", "append", "read")]
        lines.append(f"{r['contexts']:>9} {cells[0]:>18} {cells[1]:>18} {cells[2]:>16}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = run_and_save(args.dir, "hcache-contexts-", lambda root: measure(args, root), lambda r: "contexts-cpu",
                          plot)
    print(json.dumps(result) if args.json else summary(result))


if __name__ == "__main__":
    main()
