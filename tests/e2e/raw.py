"""A raw DEALER connection to hcached kept open: one client identity, so leases taken through it are its own."""

import itertools

import zmq

from hcache.daemon.process import DaemonProcess
from hcache.layout import wire


class Raw:
    """Hand-made requests, for tests that need what the client library would never send."""

    def __init__(self, d: DaemonProcess) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{d.socket}")
        self._ids = itertools.count(1)

    def exchange(self, op: str, frames: list | None = None, **fields: object) -> tuple[dict, list[bytes]]:
        """One request with optional payload frames; the reply header and its payload frames."""
        call_id = next(self._ids)
        header = wire.encode({"v": wire.PROTOCOL_VERSION, "op": op, "id": call_id, **fields})
        self.sock.send_multipart([header, *(frames or [])])
        assert self.sock.poll(10_000), f"no reply to {op!r} within 10 s"
        reply, *payload = self.sock.recv_multipart()
        decoded = wire.decode(reply)
        assert decoded["id"] == call_id
        return decoded, payload

    def call(self, op: str, **fields: object) -> dict:
        return self.exchange(op, **fields)[0]

    def close(self) -> None:
        self.sock.close()
