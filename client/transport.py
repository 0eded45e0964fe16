"""One DEALER connection to hcached: calls matched to replies by call id, one reader task, typed errors."""

import asyncio
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from hcache.client.errors import DaemonUnreachable, HCacheError, from_reply, no_daemon_at
from hcache.layout import wire
from hcache.layout.paths import missing_ipc_socket

_HWM = 1024


@dataclass
class _Resources:
    """Sockets and tasks, released by weakref.finalize even if the client is never closed."""

    zctx: zmq.asyncio.Context
    sock: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    reader: asyncio.Task | None = None
    watcher: asyncio.Task | None = None
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        for task in (self.reader, self.watcher):
            if task is not None:
                task.cancel()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(HCacheError("the client was closed while this call was waiting"))
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.zctx.term()


class Transport:
    """Sends requests and awaits their replies; several calls may be in flight at once."""

    def __init__(self, endpoint: str, timeout: float, connect_timeout: float) -> None:
        if missing_ipc_socket(endpoint):
            raise no_daemon_at(endpoint, "has no socket")
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        zctx = zmq.asyncio.Context()
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        self._res = _Resources(zctx, sock, sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED))
        self._finalizer = weakref.finalize(self, self._res.close)
        self._ids = itertools.count(1)
        sock.connect(endpoint)
        loop = asyncio.get_running_loop()
        self._res.reader = loop.create_task(_read_replies(self._res))
        self._res.watcher = loop.create_task(_watch_connection(self._res, endpoint))

    @property
    def connected(self) -> bool:
        """Whether ZeroMQ holds a connection to hcached now."""
        return self._res.connected.is_set()

    def unreachable(self, what: str, timeout: float) -> DaemonUnreachable:
        return no_daemon_at(self.endpoint, f"did not answer {what} within {timeout:g}s")

    async def call(self, op: str, frames: list[Any] | None = None, timeout: float | None = None,
                   **args: Any) -> tuple[dict, list[zmq.Frame]]:
        """Send one request; returns the reply header and its payload frames, or raises its error. With no
        connection to hcached (it is down), waits connect_timeout for one, not the call's whole timeout."""
        if not self._res.connected.is_set():
            try:
                await asyncio.wait_for(self._res.connected.wait(), self.connect_timeout)
            except TimeoutError:
                raise no_daemon_at(self.endpoint, f"is not reachable (no connection within "
                                                  f"{self.connect_timeout:g}s)") from None
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._res.pending[call_id] = fut
        try:
            header = wire.encode({"v": wire.PROTOCOL_VERSION, "op": op, "id": call_id, **args})
            await self._res.sock.send_multipart([header, *(frames or [])], copy=not frames)
            try:
                reply, payload = await asyncio.wait_for(fut, timeout or self.timeout)
            except TimeoutError:
                raise self.unreachable(f"{op!r}", timeout or self.timeout) from None
        finally:
            self._res.pending.pop(call_id, None)
        if not reply.get("ok"):
            raise from_reply(reply)
        return reply, payload

    def close(self) -> None:
        self._finalizer()


async def _read_replies(res: _Resources) -> None:
    while True:
        frames = await res.sock.recv_multipart(copy=False)
        try:
            reply = wire.decode(frames[0].buffer)
        except wire.WireError:
            continue  # not ours to answer; a daemon never sends this
        fut = res.pending.get(reply.get("id"))
        if fut is not None and not fut.done():
            fut.set_result((reply, frames[1:]))


async def _watch_connection(res: _Resources, endpoint: str) -> None:
    """Track whether ZeroMQ holds a connection to hcached (it reconnects by itself). When it drops (hcached exited,
    or the network did), the calls waiting for a reply get none: fail them now rather than at their timeout."""
    while True:
        event = parse_monitor_message(await res.monitor.recv_multipart())["event"]
        if event == zmq.EVENT_CONNECTED:
            res.connected.set()
            continue
        res.connected.clear()
        for fut in list(res.pending.values()):
            if not fut.done():
                fut.set_exception(DaemonUnreachable(
                    f"hcached at {endpoint} went away while this call waited for its reply: whether it took effect "
                    "is unknown (stat the context); calls after it reach hcached again once it is back"))
