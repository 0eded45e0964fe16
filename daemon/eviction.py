"""Eviction of whole contexts: least recently accessed first, never a pinned or busy one; TTL and watermarks."""

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hcache.daemon.contexts import Context
from hcache.layout.units import format_size

if TYPE_CHECKING:
    from hcache.daemon.store import Store

log = logging.getLogger("hcache.daemon.eviction")

REASONS = ("capacity", "ttl", "manual")
_PERSIST_ACCESS_S = 10.0  # how often read accesses are written to the index (writes record them already)


def busy(ctx: Context) -> bool:
    """Being written, read or flushed: evicting it now would waste the work or fail a client."""
    return ctx.writer is not None or any(c.pins or c.flushing or c.loading or c.dirty
                                         for s in ctx.streams for c in s.chunks)


class Evictor:
    """Frees disk space by deleting contexts, and counts what it evicted and why."""

    def __init__(self, store: "Store") -> None:
        self.store = store
        self.counts = dict.fromkeys(REASONS, 0)
        self.bytes = dict.fromkeys(REASONS, 0)

    def candidates(self) -> Iterator[Context]:
        """Contexts that may be evicted now, least recently accessed first (the store keeps them in that order).
        Each is sought from the front again when the caller comes back for the next: while it awaited an eviction,
        requests may have touched, added or removed contexts (copying the order instead stalled requests for 45 ms
        twice a second with 100k contexts and a TTL). busy() walks every chunk of a context: each is checked only
        when reached, and the TTL pass stops at the first one in date."""
        given: set[bytes] = set()
        while True:
            found = next((c for c in self.store.contexts.values()
                          if c.key not in given and not c.pinned and not c.deleted and not busy(c)), None)
            if found is None:
                return
            given.add(found.key)
            yield found

    async def evict(self, ctx: Context, reason: str) -> int:
        """Delete one context; returns the disk bytes this freed."""
        space = self.store.space
        before = space.used()
        await self.store.delete(ctx)
        freed = before - space.used()
        self.counts[reason] += 1
        self.bytes[reason] += freed
        log.info("evicted context %s/%s (%s, %s, last access %.0fs ago)", ctx.namespace, ctx.ctx_id,
                 format_size(freed), reason, time.time() - ctx.accessed)
        return freed

    async def until_free(self, nbytes: int, reason: str) -> int:
        """Evict LRU contexts until at least nbytes are free (or nothing more may go); returns bytes freed."""
        freed = 0
        for ctx in self.candidates():
            if self.store.space.free() >= nbytes:
                break
            freed += await self.evict(ctx, reason)
        return freed

    async def make_room(self, slot_size: int) -> bool:
        """The flusher found no slot: evict the least recently used context; False when none may go.

        Slab files are never shrunk, so when no data dir has any of this slot size, freeing slots of other
        sizes cannot help: nothing is evicted for nothing."""
        if not any(d.healthy and d.holds(slot_size) for d in self.store.dirs):
            log.warning("no room for chunks of %d bytes: capacity is taken by slab files of other chunk sizes "
                        "(other models); raise capacity", slot_size)
            return False
        ctx = next(self.candidates(), None)
        if ctx is None:
            return False
        await self.evict(ctx, "capacity")
        return True

    async def expire(self, now: float) -> None:
        ttl = self.store.cfg.ttl
        if not ttl:
            return
        for ctx in self.candidates():
            if ctx.accessed > now - ttl:
                break
            await self.evict(ctx, "ttl")

    async def keep_under_watermark(self) -> None:
        """Above the high watermark, evict until usage is under the low one."""
        space, cfg = self.store.space, self.store.cfg
        capacity = space.capacity()
        if capacity and space.used() > cfg.high_watermark * capacity:
            target = capacity - int(cfg.low_watermark * capacity)
            await self.until_free(target, "capacity")
            if space.used() > cfg.high_watermark * capacity:
                log.warning("disk usage %s is above the high watermark of capacity %s and nothing more may be "
                            "evicted (pinned or busy): unpin contexts or raise capacity", format_size(space.used()),
                            format_size(capacity))

    async def persist_access(self) -> None:
        """Reads refresh a context's last access; write it to the index so LRU and TTL survive a restart."""
        touched, self.store.touched = self.store.touched, {}
        changed = {key: c.accessed for key, c in touched.items() if not c.deleted}
        if not changed:
            return
        try:
            await self.store.index.touch(changed)
        except BaseException:
            self.store.touched = {**touched, **self.store.touched}  # written at the next pass
            raise

    async def run(self, interval: float = 0.5) -> None:
        last_persist = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if self.store.maintenance:
                continue
            try:
                await self.expire(time.time())
                await self.keep_under_watermark()
                if time.monotonic() - last_persist >= _PERSIST_ACCESS_S:
                    last_persist = time.monotonic()
                    await self.persist_access()
            except Exception:
                log.exception("eviction pass failed; retrying in %.1fs", interval)
