"""hcached's figures as Prometheus metrics: served as text on an opt-in HTTP port, and to 'hcachectl stats'."""

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from hcache.daemon.store import Store

log = logging.getLogger("hcache.daemon.metrics")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def restore_latency_histogram() -> Histogram:
    """Seconds from a read request to its chunks being in the arena (disk reads included)."""
    return Histogram("hcache_restore_latency_seconds", "Time to bring a restore request's chunks into the arena",
                     buckets=_LATENCY_BUCKETS, registry=None)


class _StoreCollector:
    """Reads the store's counters at scrape time (on the event loop: no locks, no torn figures)."""

    def __init__(self, store: "Store") -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        s = self.store
        yield _counter("hcache_saved_bytes", "Bytes of hidden states, K/V and token ids saved", s.bytes_saved)
        yield _counter("hcache_restored_bytes", "Bytes restored to clients", s.bytes_restored)
        yield _counter("hcache_written_bytes", "Chunk image bytes written to data dirs", s.flusher.bytes_written)
        hits = CounterMetricFamily("hcache_chunk_reads", "Chunks a restore found in the arena or read from disk",
                                   labels=["source"])
        hits.add_metric(["arena"], s.cache.hits)
        hits.add_metric(["disk"], s.cache.misses)
        yield hits
        ev = CounterMetricFamily("hcache_evictions", "Contexts evicted, by reason", labels=["reason"])
        ev_bytes = CounterMetricFamily("hcache_evicted_bytes", "Disk bytes freed by eviction, by reason",
                                       labels=["reason"])
        for reason, n in s.evictor.counts.items():
            ev.add_metric([reason], n)
            ev_bytes.add_metric([reason], s.evictor.bytes[reason])
        yield ev
        yield ev_bytes
        engine = GaugeMetricFamily("hcache_io_engine_info", "The IO engine in use", labels=["engine"])
        engine.add_metric([s.engine.name], 1)
        yield engine
        yield GaugeMetricFamily("hcache_contexts", "Contexts held", value=len(s.contexts))
        yield GaugeMetricFamily("hcache_leases", "Open arena leases", value=len(s.leases))
        arena = GaugeMetricFamily("hcache_arena_bytes", "Arena bytes by state", labels=["state"])
        arena.add_metric(["size"], s.arena.size)
        arena.add_metric(["used"], s.arena.used)
        arena.add_metric(["dirty"], s.dirty_bytes())
        yield arena
        yield GaugeMetricFamily("hcache_capacity_bytes", "Disk bytes hcached may use over all data dirs",
                                value=s.space.capacity())
        yield GaugeMetricFamily("hcache_logical_bytes", "Disk bytes the durable contexts would take if they shared "
                                "no chunks (over the data dirs' used bytes: the sharing ratio)", value=s.usage.logical)
        families = {name: GaugeMetricFamily(f"hcache_data_dir_{name}_bytes", f"Data dir {name} bytes",
                                            labels=["dir"]) for name in ("capacity", "allocated", "used")}
        healthy = GaugeMetricFamily("hcache_data_dir_healthy", "1 while the data dir is in rotation", labels=["dir"])
        direct = GaugeMetricFamily("hcache_data_dir_direct_io", "1 when the data dir uses O_DIRECT", labels=["dir"])
        errors = CounterMetricFamily("hcache_data_dir_errors", "IO errors and corrupt chunks seen in the data dir",
                                     labels=["dir"])
        for d in s.dirs:
            label = [str(d.path)]
            families["capacity"].add_metric(label, s.space.dir_capacity(d))
            families["allocated"].add_metric(label, d.allocated_bytes)
            families["used"].add_metric(label, d.used_bytes)
            healthy.add_metric(label, int(d.healthy))
            direct.add_metric(label, int(d.direct))
            errors.add_metric(label, d.errors)
        yield from families.values()
        yield from (healthy, direct, errors)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Metrics:
    """One registry holding the store's figures and the restore latency histogram."""

    def __init__(self, store: "Store") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StoreCollector(store))
        self.registry.register(store.restore_latency)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def figures(self) -> list[dict[str, Any]]:
        """The same figures as plain data: [{name, type, help, samples: [{name, labels, value}]}]."""
        return [{"name": m.name, "type": m.type, "help": m.documentation,
                 "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in m.samples]}
                for m in self.registry.collect()]


async def serve(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.1 server for GET /metrics on the event loop, so figures are read without threads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = request.split(b"\r\n", 1)[0].split()
            if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
                status, body, ctype = b"405 Method Not Allowed", b"use GET /metrics\n", b"text/plain"
            elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
                status, body, ctype = b"404 Not Found", b"metrics are at /metrics\n", b"text/plain"
            else:
                status, body, ctype = b"200 OK", metrics.text(), CONTENT_TYPE_LATEST.encode()
            head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
            writer.write(head + (body if parts[:1] != [b"HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics at http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])
    return server
