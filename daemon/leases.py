"""Leases on arena chunks: who may write or read them, until when; a generation counter names each."""

import secrets
import time
from dataclasses import dataclass

from hcache.daemon.contexts import Chunk, Context
from hcache.layout.wire import BAD_LEASE, WireError


@dataclass(eq=False, slots=True)
class Lease:
    id: int
    kind: str  # "append" or "read"
    owner: bytes
    ctx: Context
    chunks: list[Chunk]
    start: int
    end: int
    deadline: float


class Leases:
    """Open leases by id; ids start at a random generation so stale ids never match after a restart."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._next = secrets.randbits(40) << 16
        self._open: dict[int, Lease] = {}

    def add(self, kind: str, owner: bytes, ctx: Context, chunks: list[Chunk], start: int, end: int) -> Lease:
        self._next += 1
        lease = Lease(self._next, kind, owner, ctx, chunks, start, end, time.monotonic() + self.timeout)
        self._open[lease.id] = lease
        return lease

    def take(self, lease_id: int, owner: bytes, kind: str) -> Lease:
        """Remove and return the caller's lease; a lease of someone else's is refused and left alone."""
        lease = self._open.get(lease_id)
        if lease is None or lease.owner != owner or lease.kind != kind:
            raise WireError(BAD_LEASE, f"lease {lease_id} is not an open {kind} lease of this client "
                                       "(expired, released, or another client's): request a new one")
        del self._open[lease_id]
        return lease

    def pop_expired(self, now: float) -> list[Lease]:
        gone = [lease for lease in self._open.values() if lease.deadline <= now]
        for lease in gone:
            del self._open[lease.id]
        return gone

    def pop_owner(self, owner: bytes) -> list[Lease]:
        gone = [lease for lease in self._open.values() if lease.owner == owner]
        for lease in gone:
            del self._open[lease.id]
        return gone

    def __len__(self) -> int:
        return len(self._open)
