"""The ZeroMQ ROUTER front of hcached: decodes requests, runs each op as a task, always replies."""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from hcache import __version__
from hcache.daemon import fsck
from hcache.daemon.arena import pid_alive
from hcache.daemon.contexts import Context
from hcache.daemon.eviction import busy
from hcache.daemon.leases import Lease
from hcache.daemon.metrics import Metrics
from hcache.daemon.store import Store
from hcache.layout import wire
from hcache.layout.chunks import chunk_range, payload_runs
from hcache.layout.geometry import Geometry
from hcache.layout.paths import endpoint_for
from hcache.layout.wire import BAD_REQUEST, BUSY, CONFLICT, INTERNAL, RESTARTED, WireError, get, get_count

log = logging.getLogger("hcache.daemon.server")

Reply = tuple[dict[str, Any], list[Any]]
_HWM = 1024


class Server:
    """Serves the wire protocol on the ipc socket (and tcp when configured) for one Store."""

    def __init__(self, store: Store, socket_path: str, tcp: str) -> None:
        self.store = store
        self.metrics = Metrics(store)
        self.metrics_address = ""  # HOST:PORT once the metrics endpoint listens
        self.socket_path = socket_path
        self.tcp = tcp
        self.zctx = zmq.asyncio.Context()
        self.sock = self.zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, _HWM)
        self.sock.setsockopt(zmq.RCVHWM, _HWM)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self._tasks: set[asyncio.Task] = set()
        self._peer_pids: dict[bytes, int] = {}  # local clients say their pid in hello
        self._ops: dict[str, Callable[[bytes, dict, list], Awaitable[Reply]]] = {
            name: getattr(self, f"op_{name}") for name in wire.OPS}

    def bind(self) -> None:
        endpoint = endpoint_for(self.socket_path)
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            old = os.umask(0o117)  # the socket is created 0660: owner and group only
            try:
                self.sock.bind(endpoint)
            finally:
                os.umask(old)
        else:
            self.sock.bind(endpoint)
        if self.tcp:
            self.sock.bind(f"tcp://{self.tcp}")
        log.info("listening on %s%s", endpoint, f" and tcp://{self.tcp}" if self.tcp else "")

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            task = asyncio.get_running_loop().create_task(self._handle(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _peer_gone(self, peer: bytes) -> None:
        leases = self.store.leases.pop_owner(peer)
        if leases:
            log.info("client went away holding %d leases: released", len(leases))
            self.store.drop_leases(leases)

    async def _handle(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        envelope = [peer]
        body = frames[1:]
        if len(body) > 1 and len(body[0]) == 0:  # a REQ client's delimiter
            envelope.append(b"")
            body = body[1:]
        call_id = None
        try:
            if not body:
                raise WireError(BAD_REQUEST, "empty request: send a msgpack header frame")
            header = wire.decode(body[0].buffer)
            call_id = header.get("id")
            if header.get("v") != wire.PROTOCOL_VERSION:
                raise WireError(BAD_REQUEST, f"protocol version {header.get('v')!r} is not supported; this "
                                             f"daemon speaks {wire.PROTOCOL_VERSION}: upgrade the client")
            op = get(header, "op", str)
            handler = self._ops.get(op)
            if handler is None:
                raise WireError(BAD_REQUEST, f"unknown op {op!r}: use one of {sorted(wire.OPS)}")
            self._check_arena(header)
            reply, payload = await handler(peer, header, [f.buffer for f in body[1:]])
            reply["ok"] = True
        except WireError as e:
            reply, payload = {"ok": False, "error": e.code, "message": e.message}, []
        except Exception as e:
            log.exception("request failed")
            reply, payload = {"ok": False, "error": INTERNAL, "message": f"internal error: {e!r}"}, []
        reply["v"] = wire.PROTOCOL_VERSION
        reply["id"] = call_id if isinstance(call_id, int) else None
        try:
            await self.sock.send_multipart([*envelope, wire.encode(reply), *payload], copy=len(payload) == 0)
        except zmq.ZMQError as e:
            log.info("could not reply to a client (%s): it went away", e)
            self._peer_gone(peer)

    def _check_arena(self, h: dict) -> None:
        """A lease is only good in the arena it was asked for: a client still mapping an earlier daemon's would
        write where this daemon never reads and read what it never wrote."""
        arena = get(h, "arena", str, None)
        if arena is not None and arena != str(self.store.arena.path):
            raise WireError(RESTARTED, f"the client maps the arena of an earlier hcached ({arena}), this one's is "
                                       f"{self.store.arena.path}: hello again and map it (the client does so itself)")

    # -- ops --------------------------------------------------------------------------------------
    def _ctx(self, h: dict) -> Context:
        return self.store.get(get(h, "ns", str, "default"), get(h, "ctx", str))

    async def op_hello(self, peer: bytes, h: dict, frames: list) -> Reply:
        s = self.store
        pid = get(h, "pid", int, 0)
        if pid > 0:
            self._peer_pids[peer] = pid
        return {"version": wire.PROTOCOL_VERSION, "daemon": __version__, "pid": os.getpid(),
                "arena": str(s.arena.path), "arena_size": s.arena.size, "engine": s.engine.name}, []

    async def op_open(self, peer: bytes, h: dict, frames: list) -> Reply:
        try:
            geometry = Geometry.from_dict(get(h, "geometry", dict))
        except (ValueError, TypeError) as e:
            raise WireError(BAD_REQUEST, f"bad geometry: {e}") from None
        layers = h["layers"] if "layers" in h else {"hidden": list(range(geometry.num_layers))}
        ctx = await self.store.open(get(h, "ns", str, "default"), get(h, "ctx", str), get(h, "model", str),
                                    geometry, layers, get(h, "create", bool, True), get(h, "share", bool, True))
        return ctx.info(), []

    async def op_lookup(self, peer: bytes, h: dict, frames: list) -> Reply:
        """How many leading tokens of a request hcached holds for a model: {"n_tokens", "ctx": a context holding
        them, or None}."""
        n, ctx = self.store.lookup(get(h, "ns", str, "default"), get(h, "model", str), get(h, "tokens", bytes))
        return {"n_tokens": n, "ctx": ctx.ctx_id if ctx is not None else None}, []

    async def op_fork(self, peer: bytes, h: dict, frames: list) -> Reply:
        dst = await self.store.fork(self._ctx(h), get(h, "dst", str), get_count(h, "n"), get(h, "share", bool, True),
                                    get(h, "wait", bool, True))
        return dst.info(), []

    async def op_truncate(self, peer: bytes, h: dict, frames: list) -> Reply:
        ctx = self._ctx(h)
        await self.store.truncate(ctx, get_count(h, "n"))
        return ctx.info(), []

    async def op_append(self, peer: bytes, h: dict, frames: list) -> Reply:
        ctx = self._ctx(h)
        n = get_count(h, "n")
        at = get(h, "at", int, None)
        if at is not None and at != ctx.n_tokens:
            raise WireError(CONFLICT, f"context {ctx.ctx_id!r} holds {ctx.n_tokens} tokens, the append continues "
                                      f"from {at}: another client appended, or hcached restarted and lost tokens "
                                      f"that were not yet durable ({ctx.durable} are); stat the context and append "
                                      "from its length")
        inline = get(h, "inline", bool, False)
        if inline:
            sizes = [s.token_bytes * n for s in ctx.streams]
            if [len(f) for f in frames] != sizes:
                raise WireError(BAD_REQUEST, f"inline append of {n} tokens needs {len(sizes)} payload frames of "
                                             f"{sizes} bytes (one per stream), got {[len(f) for f in frames]}")
        elif frames:
            raise WireError(BAD_REQUEST, "payload frames are only accepted with inline=True")
        lease = await self.store.append_lease(peer, ctx, n)
        if not inline:
            return {"lease": lease.id, "start": lease.start, "end": lease.end,
                    "offsets": self.store.payload_offsets(lease)}, []
        self._scatter(lease, frames)
        ctx = self.store.commit(peer, lease.id)
        return {"n_tokens": ctx.n_tokens}, []

    def _scatter(self, lease: Lease, frames: list) -> None:
        view = self.store.arena.view
        per_stream, offsets = len(chunk_range(lease.start, lease.end)), self.store.payload_offsets(lease)
        for k, (stream, frame) in enumerate(zip(lease.ctx.streams, frames, strict=True)):
            mine = offsets[k * per_stream : (k + 1) * per_stream]
            for off, at, n in payload_runs(mine, lease.start, lease.end, stream.token_bytes):
                view[off : off + n] = frame[at : at + n]

    async def op_commit(self, peer: bytes, h: dict, frames: list) -> Reply:
        ctx = self.store.commit(peer, get(h, "lease", int))
        return {"n_tokens": ctx.n_tokens}, []

    async def op_abort(self, peer: bytes, h: dict, frames: list) -> Reply:
        self.store.abort(self.store.leases.take(get(h, "lease", int), peer, "append"))
        return {}, []

    async def op_flush(self, peer: bytes, h: dict, frames: list) -> Reply:
        contexts = [self._ctx(h)] if "ctx" in h else list(self.store.contexts.values())
        await self.store.flush(contexts)
        if get(h, "drop", bool, False):
            self.store.drop_from_arena(contexts)
        return {"durable": {f"{c.namespace}/{c.ctx_id}": c.durable for c in contexts}}, []

    async def op_read(self, peer: bytes, h: dict, frames: list) -> Reply:
        ctx = self._ctx(h)
        start, end = get_count(h, "start"), get_count(h, "end")
        lease = await self.store.read_lease(peer, ctx, get(h, "streams", list), start, end)
        if not get(h, "inline", bool, False):
            return {"lease": lease.id, "offsets": self.store.payload_offsets(lease)}, []
        try:
            return {}, self._gather(lease, len(h["streams"]))
        finally:
            self.store.release(peer, lease.id)

    def _gather(self, lease: Lease, n_streams: int) -> list[bytes]:
        view = self.store.arena.view
        per_stream, offsets = len(chunk_range(lease.start, lease.end)), self.store.payload_offsets(lease)
        out = []
        for k in range(n_streams):
            tb = lease.chunks[k * per_stream].token_bytes if per_stream else 0
            buf = bytearray((lease.end - lease.start) * tb)
            for off, at, n in payload_runs(offsets[k * per_stream : (k + 1) * per_stream], lease.start, lease.end, tb):
                buf[at : at + n] = view[off : off + n]
            out.append(buf)
        return out

    async def op_release(self, peer: bytes, h: dict, frames: list) -> Reply:
        self.store.release(peer, get(h, "lease", int))
        return {}, []

    async def op_stat(self, peer: bytes, h: dict, frames: list) -> Reply:
        ctx = self._ctx(h)
        return ({**ctx.info(), **self.store.placement(ctx)} if get(h, "detail", bool, False) else ctx.info()), []

    async def op_list(self, peer: bytes, h: dict, frames: list) -> Reply:
        ns = get(h, "ns", str, None)
        return {"contexts": [c.info() for c in self.store.contexts.values() if ns in (None, c.namespace)]}, []

    async def op_delete(self, peer: bytes, h: dict, frames: list) -> Reply:
        await self.store.delete(self._ctx(h))
        return {}, []

    async def op_status(self, peer: bytes, h: dict, frames: list) -> Reply:
        return {**self.store.status(), "pid": os.getpid(), "version": __version__,
                "socket": self.socket_path, "tcp": self.tcp, "metrics": self.metrics_address}, []

    async def op_pin(self, peer: bytes, h: dict, frames: list) -> Reply:
        ctx = self._ctx(h)
        await self.store.pin(ctx, get(h, "pinned", bool, True))
        return ctx.info(), []

    async def op_evict(self, peer: bytes, h: dict, frames: list) -> Reply:
        """Evict one context (never a pinned one), or LRU contexts until `until_free` bytes are free."""
        store = self.store
        if "ctx" in h:
            ctx = self._ctx(h)
            if ctx.pinned:
                raise WireError(BAD_REQUEST, f"context {ctx.ctx_id!r} is pinned: unpin it first, or remove it "
                                             "with rm")
            if busy(ctx):
                raise WireError(BUSY, f"context {ctx.ctx_id!r} is being saved or restored: retry when it is idle")
            freed = await store.evictor.evict(ctx, "manual")
            return {"freed": freed, "free": store.space.free(), "evicted": [[ctx.namespace, ctx.ctx_id]]}, []
        want = get_count(h, "until_free")
        before = dict(store.contexts)
        freed = await store.evictor.until_free(want, "manual")
        gone = [[c.namespace, c.ctx_id] for k, c in before.items() if k not in store.contexts]
        return {"freed": freed, "free": store.space.free(), "evicted": gone,
                "reached": store.space.free() >= want}, []

    async def op_fsck(self, peer: bytes, h: dict, frames: list) -> Reply:
        """Rebuild the index; or check one context's chunks; or the index's reference counts alone ("index":
        True); or both for everything."""
        if get(h, "rebuild", bool, False):
            return await fsck.rebuild(self.store), []
        if get(h, "index", bool, False):
            return await self.store.index.references(), []
        if "ctx" in h:
            return await fsck.verify(self.store, [self._ctx(h)]), []
        result = await fsck.verify(self.store, list(self.store.contexts.values()))
        return {**result, **await self.store.index.references()}, []

    async def op_stats(self, peer: bytes, h: dict, frames: list) -> Reply:
        return {"metrics": self.metrics.figures()}, []

    async def expire_leases(self) -> None:
        """Take back leases not committed or released in time, and at once those of clients that exited."""
        while True:
            await asyncio.sleep(min(1.0, self.store.leases.timeout / 4))
            for peer, pid in list(self._peer_pids.items()):
                if not pid_alive(pid):
                    del self._peer_pids[peer]
                    self._peer_gone(peer)
            gone = self.store.leases.pop_expired(time.monotonic())
            if gone:
                log.warning("%d leases expired unreleased: taken back", len(gone))
                self.store.drop_leases(gone)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self.sock.close(linger=0)
        self.zctx.term()

