"""Writes dirty chunks from the arena to slab slots: batched, one IO submission per batch, then
fdatasync, then the index commit, and only then are the chunks durable (copy-on-write for rewrites).
References of contexts to chunks that are durable already (a shared prefix) go to the index the same way."""

import asyncio
import errno
import logging
import time

from hcache.daemon.cache import ChunkCache
from hcache.daemon.contexts import Chunk, Context
from hcache.daemon.index import Index, Written, private_name
from hcache.daemon.io_engine import IoOp
from hcache.daemon.slabs import DataDir, SlotRef
from hcache.daemon.space import Space
from hcache.layout.chunks import CHUNK_TOKENS, HEADER_SIZE, ChunkHeader, data_dir_for, payload_crc
from hcache.layout.geometry import Rep
from hcache.layout.keys import shared_chunk_name

log = logging.getLogger("hcache.daemon.flusher")

_MAX_BATCHES_IN_FLIGHT = 2


def _crcs(payloads: list[memoryview]) -> list[int]:
    return [payload_crc(p) for p in payloads]


def _shared_meta(c: Chunk) -> dict:
    """What a shared chunk's header says: whose domain it is in, never which context wrote it (a context deleted
    while others still share its chunks must not come back from fsck --rebuild)."""
    ctx = c.owner
    return {"shared": True, "ns": ctx.namespace, "model": ctx.model, "geometry": ctx.geometry.to_dict()}


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
        self.links: dict[Context, None] = {}  # contexts referencing durable chunks not yet in the index
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
        if chunk.dirty and not chunk.dead:
            chunk.error = ""
            self.queue[chunk] = None
            self._wake.set()

    def link(self, ctx: Context) -> None:
        """Put the context's new references to durable chunks in the index."""
        self.links[ctx] = None
        self._wake.set()

    def add_all_dirty(self, contexts: list[Context]) -> None:
        for ctx in contexts:
            if ctx.unlinked:
                self.link(ctx)
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
            while (batch := self._take_batch()) or self.links:
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(self._flush(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if not batch:
                    break  # links alone: the task commits them all

    def _take_batch(self) -> list[Chunk]:
        batch: list[Chunk] = []
        size = 0
        for c in list(self.queue):
            if c.flushing:
                continue  # its next version goes in a later batch
            del self.queue[c]
            if not c.dirty or c.dead or c.arena_off is None:
                continue
            # Marked now, not when the batch's task starts: until then add_all_dirty (arena pressure) could
            # queue it again, a second batch would write it too, and the first to finish would let the arena
            # reuse its space while the second still writes from it.
            c.flushing = True
            batch.append(c)
            size += c.image_size
            if size >= self.batch_bytes:
                break
        return batch

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    async def _slot_for(self, c: Chunk) -> SlotRef:
        """A slot on the chunk's own data dir, else on the next with room; at capacity, evict to make room."""
        while (ref := await self._free_slot(c)) is None:
            if not await self.space.make_room(c.image_size):
                raise NoSpace("no data dir has room for another chunk (capacity reached and nothing may be "
                              "evicted, or every dir is full or failed)")
        return ref

    async def _free_slot(self, c: Chunk) -> SlotRef | None:
        size = c.image_size
        n = len(self.dirs)
        first = data_dir_for(c.layer, c.idx, n)
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
        if not batch:
            await self._commit([])
            return
        meta_by_key: dict[bytes, dict] = {}
        placed: list[tuple[Chunk, SlotRef, int]] = []  # n_tokens as of now: commits may go on meanwhile
        try:
            for c in batch:
                placed.append((c, await self._slot_for(c), c.n_tokens))
            views = [self.cache.arena.view[c.arena_off : c.arena_off + c.image_size] for c, _, _ in placed]
            payloads = [v[HEADER_SIZE : HEADER_SIZE + n * c.token_bytes]
                        for v, (c, _, n) in zip(views, placed, strict=True)]
            # crc32c releases the GIL: the loop serves requests while a batch is checksummed
            crcs = await asyncio.get_running_loop().run_in_executor(None, _crcs, payloads)
            written: list[tuple[Chunk, Written]] = []
            ops: list[IoOp] = []
            for (c, slot, n), view, crc in zip(placed, views, crcs, strict=True):
                seq = self._next_seq()
                shared = c.ckey is not None and n == CHUNK_TOKENS
                key = c.ckey if shared else c.owner.key
                if key not in meta_by_key:  # the same for all of a context's chunks, or of a key's
                    meta_by_key[key] = _shared_meta(c) if shared else c.owner.meta()
                dtype = "int32" if c.rep is Rep.TOKENS else c.owner.geometry.dtype
                ChunkHeader(key, c.layer, c.idx, c.rep, dtype, n, n * c.token_bytes, crc, seq,
                            meta_by_key[key]).pack_into(view)
                d = self.dirs[slot.dir]
                ops.append(IoOp(d.fd(slot), view, d.offset(slot)))
                name = (shared_chunk_name(c.ckey, c.layer, int(c.rep)) if shared
                        else private_name(c.owner.key, c.layer, int(c.rep), c.idx, seq))
                row_key = c.owner.keys[c.idx] if c.rep is Rep.TOKENS and c.idx < len(c.owner.keys) else None
                written.append((c, Written(name, slot, n, crc, seq, c.ckey if shared else row_key, [])))
            await self._write(ops, [w.slot for _, w in written])
        except BaseException:
            for _, slot, _ in placed:
                self.dirs[slot.dir].give_back(slot)
            raise
        await self._commit(written)

    async def _write(self, ops: list[IoOp], slots: list[SlotRef]) -> None:
        try:
            await self.cache.engine.write(ops)
        except OSError as e:
            failed = getattr(e, "failures", [])
            for i, err in failed:
                self._fail_dir(self.dirs[slots[i].dir], err)
            raise
        fds = {op.fd for op in ops}
        await self.cache.engine.fdatasync(fds)
        self.bytes_written += sum(len(op.buf) for op in ops)

    async def _commit(self, written: list[tuple[Chunk, Written]]) -> None:
        """Index what was written, and pending references to durable chunks; then they are durable."""
        async with self._commit_lock:
            live: list[tuple[Chunk, Written]] = []
            for c, w in written:
                if c.dead:
                    self.space.discard([w.slot])
                else:
                    w.places.extend((ctx.key, c.layer, int(c.rep), c.idx) for ctx in c.refs)
                    live.append((c, w))
            linking = {ctx: [c for c in ctx.unlinked if c.name is not None] for ctx in self.links if not ctx.deleted}
            self.links.clear()
            links = [(ctx.key, c.layer, int(c.rep), c.idx, c.name) for ctx, cs in linking.items() for c in cs]
            if not live and not links:
                return
            pending = {c: w.n_tokens for c, w in live}
            for cs in linking.values():
                pending.update((c, c.durable_tokens) for c in cs)
            contexts = {ctx for c, _ in live for ctx in c.refs} | set(linking)
            durable = {ctx.key: min(s.durable_prefix(pending) for s in ctx.streams) for ctx in contexts}
            freed = await self.index.commit_chunks([w for _, w in live], links, durable)
            for c, w in live:
                c.made_durable(w.slot, w.n_tokens, w.name)
            for ctx in contexts:
                for c in linking.get(ctx, ()):
                    ctx.unlinked.pop(c, None)
                for c, _ in live:
                    ctx.unlinked.pop(c, None)
                ctx.durable = durable[ctx.key]
            for ref in freed:
                self.dirs[ref.dir].give_back(ref)

    async def drain(self) -> None:
        """Wait until the queue is empty and no batch is in flight."""
        while self.queue or self._tasks or self.links:
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
