"""Writes dirty chunks from the arena to slab slots: batched, one IO submission per batch, then
fdatasync, then the index commit, and only then are the chunks durable (copy-on-write for rewrites)."""

import asyncio
import errno
import logging
import time

from hcache.daemon.cache import ChunkCache
from hcache.daemon.contexts import Chunk, Context
from hcache.daemon.index import ChunkRow, Index
from hcache.daemon.io_engine import IoOp
from hcache.daemon.slabs import DataDir, SlotRef
from hcache.daemon.space import Space
from hcache.layout.chunks import HEADER_SIZE, ChunkHeader, data_dir_for, payload_crc
from hcache.layout.geometry import Rep

log = logging.getLogger("hcache.daemon.flusher")

_MAX_BATCHES_IN_FLIGHT = 2


def _crcs(payloads: list[memoryview]) -> list[int]:
    return [payload_crc(p) for p in payloads]


class NoSpace(Exception):
    """No data dir can take another chunk."""


class Flusher:
    """Background task turning queued dirty chunks into durable ones."""

    def __init__(self, cache: ChunkCache, dirs: list[DataDir], index: Index, batch_bytes: int, space: Space) -> None:
        self.cache = cache
        self.dirs = dirs
        self.index = index
        self.batch_bytes = batch_bytes
        self.space = space
        self.queue: dict[Chunk, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(_MAX_BATCHES_IN_FLIGHT)
        self._commit_lock = asyncio.Lock()  # durable lengths are computed and committed in order
        self._tasks: set[asyncio.Task] = set()
        self._seq = 0
        self.bytes_written = 0
        self._runner: asyncio.Task | None = None

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="hcache-flusher")

    @property
    def commit_lock(self) -> asyncio.Lock:
        return self._commit_lock

    def add(self, chunk: Chunk) -> None:
        if chunk.dirty and not chunk.stream.ctx.deleted:
            chunk.error = ""
            self.queue[chunk] = None
            self._wake.set()

    def add_all_dirty(self, contexts: list[Context]) -> None:
        for ctx in contexts:
            if not ctx.dirty:
                continue  # not walked chunk by chunk
            for s in ctx.streams:
                for c in s.chunks:
                    if c.dirty and c.arena_off is not None:
                        self.add(c)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (batch := self._take_batch()):
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(self._flush(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> list[Chunk]:
        batch: list[Chunk] = []
        size = 0
        for c in list(self.queue):
            if c.flushing:
                continue  # its next version goes in a later batch
            del self.queue[c]
            if not c.dirty or c.stream.ctx.deleted or c.arena_off is None:
                continue
            # Marked now, not when the batch's task starts: until then add_all_dirty (arena pressure) could
            # queue it again, a second batch would write it too, and the first to finish would let the arena
            # reuse its space while the second still writes from it.
            c.flushing = True
            batch.append(c)
            size += c.stream.image_size
            if size >= self.batch_bytes:
                break
        return batch

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    async def _slot_for(self, c: Chunk) -> SlotRef:
        """A slot on the chunk's own data dir, else on the next with room; at capacity, evict to make room."""
        while (ref := await self._free_slot(c)) is None:
            if not await self.space.make_room(c.stream.image_size):
                raise NoSpace("no data dir has room for another chunk (capacity reached and nothing may be "
                              "evicted, or every dir is full or failed)")
        return ref

    async def _free_slot(self, c: Chunk) -> SlotRef | None:
        size = c.stream.image_size
        n = len(self.dirs)
        first = data_dir_for(c.stream.layer, c.idx, n)
        for k in range(n):
            d = self.dirs[(first + k) % n]
            if not d.healthy:
                continue
            ref = d.take(size)
            if ref is None and self.space.may_grow(d, size):
                try:
                    await d.grow(size)
                except OSError as e:
                    self._fail_dir(d, e)
                    continue
                ref = d.take(size)
            if ref is not None:
                return ref
        return None

    def _fail_dir(self, d: DataDir, e: OSError) -> None:
        d.healthy = False
        d.errors += 1
        d.error = "full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
        log.error("data dir %s taken out of rotation: %s", d.path, d.error)

    async def _flush(self, batch: list[Chunk]) -> None:
        try:
            await self._flush_batch(batch)
        except Exception as e:  # a failed batch must not kill the flusher; its chunks stay dirty
            log.error("flush of %d chunks failed: %s", len(batch), e)
            for c in batch:
                c.error = str(e)
        finally:
            for c in batch:
                c.flushing = False
            self._slots.release()
            self._wake.set()
            await self.cache.notify()

    async def _flush_batch(self, batch: list[Chunk]) -> None:
        meta_by_ctx: dict[bytes, dict] = {}
        placed: list[tuple[Chunk, SlotRef, int]] = []  # n_tokens as of now: commits may go on meanwhile
        try:
            for c in batch:
                placed.append((c, await self._slot_for(c), c.n_tokens))
            views = [self.cache.arena.view[c.arena_off : c.arena_off + c.stream.image_size] for c, _, _ in placed]
            payloads = [v[HEADER_SIZE : HEADER_SIZE + n * c.stream.token_bytes]
                        for v, (c, _, n) in zip(views, placed, strict=True)]
            # crc32c releases the GIL: the loop serves requests while a batch is checksummed
            crcs = await asyncio.get_running_loop().run_in_executor(None, _crcs, payloads)
            written: list[tuple[Chunk, SlotRef, int, int, int]] = []  # chunk, slot, n_tokens, crc, seq
            ops: list[IoOp] = []
            for (c, slot, n), view, crc in zip(placed, views, crcs, strict=True):
                s = c.stream
                seq = self._next_seq()
                if s.ctx.key not in meta_by_ctx:  # the same for all of a context's chunks
                    meta_by_ctx[s.ctx.key] = s.ctx.meta()
                meta = meta_by_ctx[s.ctx.key]
                dtype = "int32" if s.rep is Rep.TOKENS else s.ctx.geometry.dtype
                ChunkHeader(s.ctx.key, s.layer, c.idx, s.rep, dtype, n, n * s.token_bytes, crc, seq,
                            meta).pack_into(view)
                d = self.dirs[slot.dir]
                ops.append(IoOp(d.fd(slot), view, d.offset(slot)))
                written.append((c, slot, n, crc, seq))
            await self._write(ops, written)
        except BaseException:
            for _, slot, _ in placed:
                self.dirs[slot.dir].give_back(slot)
            raise
        await self._commit(written)

    async def _write(self, ops: list[IoOp], written: list[tuple[Chunk, SlotRef, int, int, int]]) -> None:
        try:
            await self.cache.engine.write(ops)
        except OSError as e:
            failed = getattr(e, "failures", [])
            for i, err in failed:
                self._fail_dir(self.dirs[written[i][1].dir], err)
            raise
        fds = {op.fd for op in ops}
        await self.cache.engine.fdatasync(fds)
        self.bytes_written += sum(len(op.buf) for op in ops)

    async def _commit(self, written: list[tuple[Chunk, SlotRef, int, int, int]]) -> None:
        async with self._commit_lock:
            live = [w for w in written if not w[0].stream.ctx.deleted]
            for c, slot, *_ in written:
                if c.stream.ctx.deleted:
                    self.space.discard([slot])
            pending = {c: n for c, _, n, _, _ in live}
            contexts = {c.stream.ctx for c in pending}
            durable = {ctx.key: min(s.durable_prefix(pending) for s in ctx.streams) for ctx in contexts}
            rows = [ChunkRow(c.stream.ctx.key, c.stream.layer, int(c.stream.rep), c.idx, slot, n, crc, seq)
                    for c, slot, n, crc, seq in live]
            freed = await self.index.commit_chunks(rows, durable)
            for c, slot, n, _, _ in live:
                c.made_durable(slot, n)
            for ctx in contexts:
                ctx.durable = durable[ctx.key]
            for ref in freed:
                self.dirs[ref.dir].give_back(ref)

    async def drain(self) -> None:
        """Wait until the queue is empty and no batch is in flight."""
        while self.queue or self._tasks:
            self._wake.set()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            else:
                await asyncio.sleep(0.001)
            if all(c.error for c in self.queue):
                return

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
