"""A small blocking control-plane client (no torch): status, list, flush and the like for hcachectl."""

import itertools
from typing import Any

import zmq

from hcache.client.errors import from_reply, no_daemon_at
from hcache.layout import wire
from hcache.layout.paths import client_endpoint, missing_ipc_socket


class ControlClient:
    """One request at a time over a DEALER socket; every call has a deadline."""

    def __init__(self, socket: str | None = None, timeout: float = 10.0) -> None:
        self.endpoint = client_endpoint(socket)
        if missing_ipc_socket(self.endpoint):
            raise no_daemon_at(self.endpoint, "has no socket")
        self.timeout = timeout
        self._zctx = zmq.Context()
        self._sock = self._zctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)

    def call(self, op: str, timeout: float | None = None, **args: Any) -> dict:
        call_id = next(self._ids)
        self._sock.send(wire.encode({"v": wire.PROTOCOL_VERSION, "op": op, "id": call_id, **args}))
        wait_ms = int((timeout or self.timeout) * 1000)
        while self._sock.poll(wait_ms):
            reply = wire.decode(self._sock.recv_multipart()[0])
            if reply.get("id") == call_id:
                if not reply.get("ok"):
                    raise from_reply(reply)
                return reply
        raise no_daemon_at(self.endpoint, f"did not answer {op!r} within {wait_ms / 1000:g}s")

    def close(self) -> None:
        self._sock.close()
        self._zctx.term()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
