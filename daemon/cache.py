"""Which chunks are resident in the arena: allocation with LRU eviction of clean chunks, backpressure, loads."""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from hcache.daemon.arena import Arena
from hcache.daemon.contexts import Chunk
from hcache.daemon.io_engine import IoEngine, IoOp
from hcache.daemon.slabs import DataDir
from hcache.layout.chunks import ChunkFormatError, verify_image
from hcache.layout.wire import BUSY, CORRUPT, IO_ERROR, OVER_CAPACITY, WireError

log = logging.getLogger("hcache.daemon.cache")


class ChunkCache:
    """Arena residency of chunk images. Dirty chunks cannot be dropped: saves wait for the flusher."""

    def __init__(self, arena: Arena, dirs: list[DataDir], engine: IoEngine, backpressure_s: float,
                 read_throttle: int = 0) -> None:
        self.arena = arena
        self.dirs = dirs
        self.engine = engine
        self.backpressure_s = backpressure_s
        self.lru: OrderedDict[Chunk, None] = OrderedDict()
        self.progress = asyncio.Condition()  # notified whenever chunks become clean or unpinned
        self.on_pressure: Callable[[], None] = lambda: None  # set by the store: flush all dirty chunks
        self.hits = 0
        self.misses = 0
        self.read_throttle = read_throttle
        self._reads_free_at = 0.0  # with a throttle: when the emulated disk is idle again

    def touch(self, chunk: Chunk) -> None:
        self.lru.move_to_end(chunk)

    async def notify(self) -> None:
        async with self.progress:
            self.progress.notify_all()

    def _evict_for(self, nbytes: int) -> int | None:
        """Arena space for nbytes, dropping clean chunks least recently used first; None when the rest is dirty or
        in use. Looks only as far into the LRU order as it must: a full arena evicts on every allocation."""
        while (off := self.arena.alloc(nbytes)) is None:
            victim = next((c for c in self.lru if c.evictable), None)
            if victim is None:
                return None
            self.drop(victim)
        return off

    async def alloc(self, nbytes: int) -> int:
        """Arena space for one image; evicts clean chunks, then waits (bounded) for dirty ones to flush."""
        if nbytes > self.arena.size:
            raise WireError(OVER_CAPACITY, f"a chunk of {nbytes} bytes cannot fit an arena of {self.arena.size}"
                                           " bytes: start hcached with a larger --dram")
        off = self._evict_for(nbytes)
        if off is not None:
            return off
        self.on_pressure()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.backpressure_s
        async with self.progress:
            while (off := self._evict_for(nbytes)) is None:
                left = deadline - loop.time()
                if left <= 0:
                    raise WireError(BUSY, "the arena stayed full of unflushed or leased data for "
                                          f"{self.backpressure_s:.0f}s: retry later, release leases, or raise --dram")
                try:
                    await asyncio.wait_for(self.progress.wait(), left)
                except TimeoutError:
                    pass
        return off

    def place(self, chunk: Chunk, off: int) -> None:
        chunk.arena_off = off
        self.lru[chunk] = None

    def drop(self, chunk: Chunk) -> None:
        """Give a chunk's arena space back (it stays on disk, if it was ever flushed)."""
        if chunk.arena_off is not None:
            self.arena.free(chunk.arena_off, chunk.image_size)
            chunk.arena_off = None
        self.lru.pop(chunk, None)

    async def make_resident(self, chunks: list[Chunk]) -> None:
        """Bring chunks into the arena and pin them: absent ones are read in one batch over all data dirs.

        On failure nothing stays pinned by this call and the error says which chunk was bad.
        """
        loop = asyncio.get_running_loop()
        mine: list[Chunk] = []
        others: list[asyncio.Future] = []
        for c in chunks:
            c.pins += 1
            if c.loading is not None:
                others.append(c.loading)
            elif c.arena_off is None:
                c.loading = loop.create_future()
                mine.append(c)
            else:
                self.hits += 1
                self.touch(c)
        try:
            if mine:
                await self._load(mine)
            for fut in others:
                await asyncio.shield(fut)
        except BaseException:
            for c in chunks:
                c.pins -= 1
            raise

    async def _load(self, chunks: list[Chunk]) -> None:
        ops: list[IoOp] = []
        op_dirs: list[DataDir] = []
        try:
            for c in chunks:
                self.place(c, await self.alloc(c.image_size))
                if c.disk is not None:
                    d = self.dirs[c.disk.dir]
                    view = self.arena.view[c.arena_off : c.arena_off + c.image_size]
                    ops.append(IoOp(d.fd(c.disk), view, d.offset(c.disk)))
                    op_dirs.append(d)
            self.misses += len(ops)
            started = asyncio.get_running_loop().time()
            try:
                await self.engine.read(ops)
            except OSError as e:
                for i, _ in getattr(e, "failures", []):
                    op_dirs[i].errors += 1
                raise WireError(IO_ERROR, f"reading chunks from disk failed: {e}") from None
            if self.read_throttle and ops:
                await self._throttle(sum(len(op.buf) for op in ops), started)
            # crc32c releases the GIL: checking off the loop keeps other requests moving meanwhile
            await asyncio.get_running_loop().run_in_executor(None, self._verify_all,
                                                             [c for c in chunks if c.disk is not None])
        except BaseException as e:
            for c in chunks:
                self.drop(c)
                fut, c.loading = c.loading, None
                if fut is not None and not fut.done():
                    fut.set_exception(e)
                    fut.exception()  # the waiters that care re-raise it; nobody else should warn
            raise
        for c in chunks:
            fut, c.loading = c.loading, None
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def _throttle(self, nbytes: int, started: float) -> None:
        """Hold a read back until a disk of read_throttle bytes/s, busy with earlier reads, would have done it:
        a cap on the rate (the real read's time counts towards it), not a delay added to it."""
        loop = asyncio.get_running_loop()
        self._reads_free_at = max(self._reads_free_at, started) + nbytes / self.read_throttle
        await asyncio.sleep(self._reads_free_at - loop.time())

    def _verify_all(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            self._verify(c)

    def _verify(self, c: Chunk) -> None:
        image = self.arena.view[c.arena_off : c.arena_off + c.image_size]
        try:
            header = verify_image(image, c.header_key, c.layer, c.idx, c.rep)
            if header.n_tokens < c.n_tokens:
                raise ChunkFormatError(f"chunk holds {header.n_tokens} tokens, the index expects {c.n_tokens}")
        except ChunkFormatError as e:
            self.dirs[c.disk.dir].errors += 1
            log.error("corrupt chunk: %s in %s: %s", c.label, self.dirs[c.disk.dir].path, e)
            raise WireError(CORRUPT, f"{c.label}: {e}; this chunk cannot be restored (delete the context, or run "
                                     "'hcachectl fsck')") from None

    def unpin(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            c.pins -= 1
            if c.dead and not c.pins and not c.flushing:
                self.drop(c)
