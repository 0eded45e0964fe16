"""The daemon's operations on contexts: open, append (lease, commit), read (lease, release), flush, delete, and on
shared prefixes: lookup, fork, truncate."""

import logging
import time
from collections import OrderedDict

import msgpack

from hcache.daemon.arena import Arena
from hcache.daemon.cache import ChunkCache
from hcache.daemon.config import Config
from hcache.daemon.contexts import Chunk, Context, Usage, parse_layers
from hcache.daemon.eviction import Evictor
from hcache.daemon.flusher import Flusher
from hcache.daemon.index import ContextRow, Index
from hcache.daemon.io_engine import IoEngine
from hcache.daemon.leases import Lease, Leases
from hcache.daemon.metrics import restore_latency_histogram
from hcache.daemon.prefixes import TOKEN_ID_BYTES, Prefixes
from hcache.daemon.slabs import DataDir
from hcache.daemon.space import Space
from hcache.layout.chunks import CHUNK_TOKENS, HEADER_SIZE, chunk_range
from hcache.layout.geometry import Geometry, Rep
from hcache.layout.keys import context_key
from hcache.layout.units import format_size
from hcache.layout.wire import (
    BAD_REQUEST,
    BUSY,
    CONFLICT,
    IO_ERROR,
    MODEL_MISMATCH,
    OVER_CAPACITY,
    UNKNOWN_CONTEXT,
    WireError,
)

log = logging.getLogger("hcache.daemon.store")


class Store:
    """All contexts, their chunks in the arena and on disk, and the leases clients hold on them."""

    def __init__(self, cfg: Config, arena: Arena, dirs: list[DataDir], index: Index, engine: IoEngine) -> None:
        self.cfg = cfg
        self.arena = arena
        self.dirs = dirs
        self.index = index
        self.engine = engine
        # Least recently accessed first, so that eviction and the TTL never sort them (a host holds 100k and more).
        self.contexts: OrderedDict[bytes, Context] = OrderedDict()
        self.pinned: dict[bytes, Context] = {}
        self.touched: dict[bytes, Context] = {}  # accessed since the evictor last wrote access times to the index
        self.leases = Leases(cfg.lease_timeout)
        self.prefixes = Prefixes()
        self.usage = Usage()
        self.cache = ChunkCache(arena, dirs, engine, backpressure_s=cfg.lease_timeout, read_throttle=cfg.read_throttle)
        self.space = Space(cfg, dirs, engine)
        self.flusher = Flusher(self.cache, dirs, index, cfg.flush_batch, self.space)
        self.cache.on_pressure = lambda: self.flusher.add_all_dirty(list(self.contexts.values()))
        self.evictor = Evictor(self)
        self.space.make_room = self.evictor.make_room
        self.maintenance = ""  # while set (what is going on), requests that touch contexts get BUSY
        self.bytes_saved = 0
        self.bytes_restored = 0
        self.restore_latency = restore_latency_histogram()

    def _check_serving(self) -> None:
        if self.maintenance:
            raise WireError(BUSY, f"hcached is {self.maintenance}: retry in a moment")

    # -- start-up ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Rebuild the in-memory state from the index; chunks past a context's durable length are dropped."""
        rows, chunk_rows = self.index.load()
        for row in sorted(rows, key=lambda r: r.accessed):
            meta = msgpack.unpackb(row.meta, raw=False)
            ctx = Context(row.key, row.namespace, row.ctx_id, row.model, Geometry.from_dict(meta["geometry"]),
                          meta["layers"], row.created, row.accessed, row.pinned, row.n_tokens,
                          share=meta.get("share", True), usage=self.usage)
            ctx.durable = row.n_tokens
            self.contexts[row.key] = ctx
            if ctx.pinned:
                self.pinned[ctx.key] = ctx
        stale: set[bytes] = set()
        chunks: dict[bytes, Chunk] = {}  # by name: a shared one is referenced by every context holding it
        row_keys: list[tuple[Context, int, bytes]] = []
        for ch in sorted(chunk_rows, key=lambda r: r.idx):
            ctx = self.contexts.get(ch.ctx)
            start = ch.idx * CHUNK_TOKENS
            if ctx is None or start >= ctx.n_tokens:
                stale.add(ch.ctx)
                continue
            stream = ctx.stream(ch.layer, ch.rep)
            c = chunks.get(ch.name)
            if c is None:
                c = chunks[ch.name] = Chunk(ctx, ch.layer, stream.rep, ch.idx, stream.token_bytes, stream.image_size)
                c.n_tokens = min(ch.n_tokens, ctx.n_tokens - start)
                c.made_durable(ch.slot, c.n_tokens, ch.name)
                self.dirs[ch.slot.dir].mark_used(ch.slot)
                if stream.rep is not Rep.TOKENS:  # a token chunk's is its row's key, the chunk its context's own
                    c.ckey = ch.ckey
            if ch.idx > len(stream.chunks):
                stream.chunk(ch.idx - 1)  # a hole the index should not have: empty chunks, found by fsck
            stream.put(ch.idx, c)
            if stream.rep is Rep.TOKENS and ch.ckey is not None and ctx.share:
                row_keys.append((ctx, ch.idx, ch.ckey))
        for ctx, idx, key in row_keys:
            if (idx + 1) * CHUNK_TOKENS <= ctx.n_tokens and idx == len(ctx.keys):
                self.prefixes.register(ctx, idx, key)
        for key in stale:
            ctx = self.contexts.get(key)
            first = (ctx.n_tokens + CHUNK_TOKENS - 1) // CHUNK_TOKENS if ctx else 0
            for ref in self.index.drop_chunks_from(key, first):
                self.dirs[ref.dir].give_back(ref)
        log.info("index loaded: %d contexts, %d chunks (%d references)", len(self.contexts), len(chunks),
                 len(chunk_rows))

    def reset(self) -> None:
        """Forget every context and free every slot, before load() reads a rebuilt index (nothing in use)."""
        for ctx in self.contexts.values():
            ctx.deleted = True
            for s in ctx.streams:
                for c in s.chunks:
                    self.cache.drop(c)
        self.contexts.clear()
        self.pinned.clear()
        self.touched.clear()
        self.prefixes = Prefixes()
        self.usage.logical = 0
        self.flusher.queue.clear()
        self.flusher.links.clear()
        for d in self.dirs:
            d.free_all()

    # -- contexts ---------------------------------------------------------------------------------
    def get(self, namespace: str, ctx_id: str) -> Context:
        ctx = self.contexts.get(context_key(namespace, ctx_id))
        if ctx is None:
            raise WireError(UNKNOWN_CONTEXT, f"no context {ctx_id!r} in namespace {namespace!r}: "
                                             "open it with create=True first, or check 'hcachectl ls'")
        return ctx

    async def open(self, namespace: str, ctx_id: str, model: str, geometry: Geometry, layers: object,
                   create: bool, share: bool = True) -> Context:
        key = context_key(namespace, ctx_id)
        ctx = self.contexts.get(key)
        if ctx is not None:
            if ctx.model != model or ctx.geometry != geometry:
                raise WireError(MODEL_MISMATCH, f"context {ctx_id!r} was saved by model {ctx.model!r} "
                                                f"({ctx.geometry}); this is {model!r} ({geometry}): restore it "
                                                "with the same model, or delete it")
            return ctx
        if not create:
            return self.get(namespace, ctx_id)
        self._check_serving()
        parsed = parse_layers(layers, geometry)
        now = time.time()
        ctx = Context(key, namespace, ctx_id, model, geometry, parsed, now, now, share=share, usage=self.usage)
        await self.index.add_context(ContextRow(key, namespace, ctx_id, model, ctx.packed_meta(), 0, now, now,
                                                False))
        self.contexts.setdefault(key, ctx)
        return self.contexts[key]

    async def delete(self, ctx: Context) -> None:
        async with self.flusher.commit_lock:
            if ctx.deleted:
                return
            ctx.deleted = True
            self.contexts.pop(ctx.key, None)
            self.pinned.pop(ctx.key, None)
            self.touched.pop(ctx.key, None)
            self.prefixes.release(ctx, 0)
            ctx.durable = 0
            for s in ctx.streams:
                self._let_go(ctx, s.chunks)
            freed = await self.index.delete_context(ctx.key)
        await self.space.release(freed)

    def _let_go(self, ctx: Context, chunks: list[Chunk]) -> None:
        """The context no longer references these chunks: those no other context does are forgotten."""
        for c in chunks:
            c.refs.pop(ctx, None)
            ctx.unlinked.pop(c, None)
            if c.dead:
                self.prefixes.forget(c)
                if not c.pins and not c.flushing:
                    self.cache.drop(c)

    async def pin(self, ctx: Context, pinned: bool) -> None:
        """A pinned context is never evicted (capacity, TTL or 'hcachectl evict'); rm still removes it."""
        await self.index.set_pinned(ctx.key, pinned)
        ctx.pinned = pinned
        if pinned and not ctx.deleted:
            self.pinned[ctx.key] = ctx
        else:
            self.pinned.pop(ctx.key, None)

    def touch(self, ctx: Context) -> None:
        """Record an access (a save or a read): the context goes last in eviction order."""
        ctx.accessed = time.time()
        if not ctx.deleted:
            self.contexts.move_to_end(ctx.key)
            self.touched[ctx.key] = ctx

    def _check_fits(self, ctx: Context, n_tokens: int) -> None:
        """Refuse at once a save that could never be stored, even with everything unpinned evicted."""
        need = sum(s.image_size * len(chunk_range(0, n_tokens)) for s in ctx.streams)
        pinned = sum(other.disk_bytes for other in self.pinned.values() if other is not ctx)
        room = self.space.capacity() - pinned
        if need > room:
            raise WireError(OVER_CAPACITY, f"context {ctx.ctx_id!r} would need {format_size(need)} on disk with "
                                           f"{n_tokens} tokens; capacity less pinned contexts is {format_size(room)}: "
                                           "raise capacity, unpin contexts, or save fewer tokens")

    # -- append -------------------------------------------------------------------------------------
    async def append_lease(self, owner: bytes, ctx: Context, n: int) -> Lease:
        if n <= 0:
            raise WireError(BAD_REQUEST, f"append of {n} tokens: append at least one token")
        if ctx.writer is not None:
            raise WireError(BUSY, f"context {ctx.ctx_id!r} has an append in progress: commit or abort it first")
        self._check_serving()
        start, end = ctx.n_tokens, ctx.n_tokens + n
        need = len(chunk_range(start, end)) * sum(s.image_size for s in ctx.streams)  # at most; before any state
        if need > self.arena.size // 2:
            raise WireError(OVER_CAPACITY, f"appending {n} tokens needs {need} bytes of arena, more than half of "
                                           f"its {self.arena.size}: append fewer tokens per call or raise --dram")
        self._check_fits(ctx, end)
        chunks = [s.chunk(i) for s in ctx.streams for i in chunk_range(start, end)]
        ctx.writer = True  # reserved while chunks come in
        try:
            await self.cache.make_resident(chunks)
        except BaseException:
            ctx.writer = None
            raise
        lease = self.leases.add("append", owner, ctx, chunks, start, end)
        ctx.writer = lease
        return lease

    def commit(self, owner: bytes, lease_id: int) -> Context:
        lease = self.leases.take(lease_id, owner, "append")
        ctx = lease.ctx
        for c in lease.chunks:
            c.n_tokens = max(c.n_tokens, min(CHUNK_TOKENS, lease.end - c.idx * CHUNK_TOKENS))
        ctx.n_tokens = lease.end
        if ctx.share:
            self._hold_full_rows(ctx)
        for c in lease.chunks:
            if c.n_tokens == CHUNK_TOKENS and ctx in c.refs:
                self.flusher.add(c)
        self.touch(ctx)
        ctx.writer = None
        self.bytes_saved += ctx.token_bytes * (lease.end - lease.start)
        self.cache.unpin(lease.chunks)
        return ctx

    def _hold_full_rows(self, ctx: Context) -> None:
        """Key the context's chunk rows that are full now, from the token ids in its token chunks; rows whose key
        is held already reference the shared chunks instead of their own copies."""
        while (len(ctx.keys) + 1) * CHUNK_TOKENS <= ctx.n_tokens:
            t = ctx.tokens.chunks[len(ctx.keys)]
            if t.arena_off is None:
                return  # saved before hcached shared prefixes: its rows stay unkeyed, its chunks its own
            records = self.arena.view[t.arena_off + HEADER_SIZE : t.arena_off + HEADER_SIZE + CHUNK_TOKENS * 8]
            ids = records.cast("i")[::2].tobytes()  # a token record is (id, flags), int32 each
            replaced = self.prefixes.hold(ctx, self.prefixes.next_key(ctx, ids))
            self._let_go(ctx, replaced)
            if ctx.unlinked:
                self.flusher.link(ctx)

    def abort(self, lease: Lease) -> None:
        lease.ctx.writer = None
        self.cache.unpin(lease.chunks)
        for c in lease.chunks:
            if c.n_tokens == 0 and c.evictable:
                self.cache.drop(c)

    # -- shared prefixes ----------------------------------------------------------------------------
    def lookup(self, namespace: str, model: str, token_ids: bytes) -> tuple[int, Context | None]:
        """Leading tokens of `token_ids` held for this model in this namespace (whole chunks), and a context
        holding them."""
        if len(token_ids) % TOKEN_ID_BYTES:
            raise WireError(BAD_REQUEST, f"tokens must be int32 ids, {TOKEN_ID_BYTES} bytes each; got "
                                         f"{len(token_ids)} bytes")
        return self.prefixes.lookup(model, namespace, token_ids)

    async def fork(self, src: Context, dst_id: str, n: int, share: bool = True, wait: bool = True) -> Context:
        """A new context `dst_id` holding the first n tokens of `src`: shared chunks are referenced; a partial last
        chunk, the token ids (each context's own: they name it on disk) and, where either context does not share,
        every chunk are copied. Returns once it is durable (with `wait`; else at once, durable with its next flush)."""
        if not 0 < n <= src.n_tokens:
            raise WireError(BAD_REQUEST, f"fork of {n} tokens: context {src.ctx_id!r} holds {src.n_tokens}; fork "
                                         f"1 to {src.n_tokens} tokens")
        key = context_key(src.namespace, dst_id)
        if key in self.contexts:
            raise WireError(CONFLICT, f"context {dst_id!r} exists already: delete it first, or fork into a new id")
        self._check_serving()
        now = time.time()
        dst = Context(key, src.namespace, dst_id, src.model, src.geometry, src.layers, now, now,
                      share=src.share and share, usage=self.usage)
        rows = len(chunk_range(0, n))
        shared = [(s, idx, c) for s in src.streams for idx, c in enumerate(s.chunks[:rows])
                  if dst.share and c.ckey is not None and (idx + 1) * CHUNK_TOKENS <= n]
        referenced = {(s.layer, s.rep, idx): c for s, idx, c in shared}
        copies = [(c, min(CHUNK_TOKENS, n - idx * CHUNK_TOKENS)) for s in src.streams
                  for idx, c in enumerate(s.chunks[:rows]) if (s.layer, s.rep, idx) not in referenced]
        made = await self._copies(dst, copies)
        await self.index.add_context(ContextRow(key, dst.namespace, dst_id, dst.model, dst.packed_meta(), 0, now, now,
                                                False))
        if key in self.contexts or src.deleted:  # created, or the source deleted, while this awaited
            await self.index.delete_context(key)
            self._let_go(dst, made)
            raise WireError(CONFLICT, f"context {dst_id!r} was created, or {src.ctx_id!r} deleted, during the fork: "
                                      "retry")
        referenced.update(((c.layer, c.rep, c.idx), c) for c in made)
        for s_dst in dst.streams:
            for idx in range(rows):
                c = referenced[(s_dst.layer, s_dst.rep, idx)]
                s_dst.put(idx, c)
                if c.name is not None:
                    dst.unlinked[c] = None
        dst.n_tokens = n
        if dst.share:
            for idx, k in enumerate(src.keys[: n // CHUNK_TOKENS]):
                self.prefixes.register(dst, idx, k)
        self.contexts[key] = dst
        self.touch(dst)
        if wait:
            await self.flush([dst])
        else:
            self.flusher.add_all_dirty([dst])
        return dst

    async def _copies(self, ctx: Context, sources: list[tuple[Chunk, int]]) -> list[Chunk]:
        """Private copies for `ctx` of the first n tokens of each source chunk, made in the arena (dirty, to be
        flushed); referenced by nothing yet."""
        made: list[Chunk] = []
        await self.cache.make_resident([c for c, _ in sources])
        try:
            for c, n in sources:
                copy = Chunk(ctx, c.layer, c.rep, c.idx, c.token_bytes, c.image_size)
                self.cache.place(copy, await self.cache.alloc(c.image_size))
                at, to = c.arena_off + HEADER_SIZE, copy.arena_off + HEADER_SIZE
                self.arena.view[to : to + n * c.token_bytes] = self.arena.view[at : at + n * c.token_bytes]
                copy.n_tokens = n  # dirty from here on: never evicted unflushed
                made.append(copy)
        except BaseException:
            for copy in made:
                self.cache.drop(copy)
            raise
        finally:
            self.cache.unpin([c for c, _ in sources])
        return made

    async def truncate(self, ctx: Context, n: int) -> None:
        """The context keeps its first n tokens; a shared chunk cut in two is copied once. Returns once durable."""
        if not 0 <= n <= ctx.n_tokens:
            raise WireError(BAD_REQUEST, f"truncate to {n} tokens: context {ctx.ctx_id!r} holds {ctx.n_tokens}; "
                                         f"keep 0 to {ctx.n_tokens}")
        if ctx.writer is not None:
            raise WireError(BUSY, f"context {ctx.ctx_id!r} has an append in progress: commit or abort it first")
        if n == ctx.n_tokens:
            return
        self._check_serving()
        ctx.writer = True  # no append meanwhile
        try:
            keep, cut = n // CHUNK_TOKENS, len(chunk_range(0, n))
            made = await self._copies(ctx, [(s.chunks[keep], n - keep * CHUNK_TOKENS) for s in ctx.streams]
                                      if cut > keep else [])
            async with self.flusher.commit_lock:
                for s in ctx.streams:
                    gone = s.chunks[keep:]
                    del s.chunks[keep:]
                    self._let_go(ctx, gone)
                for s, copy in zip(ctx.streams, made, strict=False):
                    s.put(keep, copy)
                self.prefixes.release(ctx, keep)
                ctx.n_tokens = n
                ctx.durable = min(ctx.durable, keep * CHUNK_TOKENS)
                freed = await self.index.truncate(ctx.key, keep, ctx.durable)
        finally:
            ctx.writer = None
        await self.space.release(freed)
        self.touch(ctx)
        await self.flush([ctx])

    # -- read -------------------------------------------------------------------------------------
    async def read_lease(self, owner: bytes, ctx: Context, streams: list, start: int, end: int) -> Lease:
        if not 0 <= start <= end <= ctx.n_tokens:
            raise WireError(BAD_REQUEST, f"token range [{start}, {end}) is outside context {ctx.ctx_id!r}, which "
                                         f"holds {ctx.n_tokens} tokens")
        if not isinstance(streams, list) or not streams:
            raise WireError(BAD_REQUEST, "streams must be a non-empty list of [layer, rep] pairs")
        chunks: list[Chunk] = []
        picked = []
        for item in streams:
            if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
                raise WireError(BAD_REQUEST, "streams must be a list of [layer, rep] pairs")
            s = ctx.stream(*item)
            picked.append(s)
            chunks += [s.chunk(i) for i in chunk_range(start, end)]
        need = sum(c.image_size for c in chunks if c.arena_off is None)
        if need > self.arena.size // 2:
            raise WireError(OVER_CAPACITY, f"reading this range needs {need} bytes of arena, more than half of "
                                           f"its {self.arena.size}: read fewer layers or tokens per call")
        self._check_serving()
        started = time.perf_counter()
        await self.cache.make_resident(chunks)
        self.restore_latency.observe(time.perf_counter() - started)
        self.touch(ctx)
        self.bytes_restored += sum(s.token_bytes for s in picked) * (end - start)
        return self.leases.add("read", owner, ctx, chunks, start, end)

    def release(self, owner: bytes, lease_id: int) -> None:
        self.cache.unpin(self.leases.take(lease_id, owner, "read").chunks)

    def drop_leases(self, leases: list[Lease]) -> None:
        for lease in leases:
            if lease.kind == "append":
                self.abort(lease)
            else:
                self.cache.unpin(lease.chunks)

    @staticmethod
    def payload_offsets(lease: Lease) -> list[int]:
        return [c.arena_off + HEADER_SIZE for c in lease.chunks]

    # -- durability -------------------------------------------------------------------------------
    def drop_from_arena(self, contexts: list[Context]) -> None:
        """Free the arena space of these contexts' clean, unleased chunks: their next reads come from disk."""
        for ctx in contexts:
            for s in ctx.streams:
                for c in s.chunks:
                    if c.evictable:
                        self.cache.drop(c)

    async def flush(self, contexts: list[Context]) -> None:
        """Return once every committed token of these contexts is durable (tails written padded)."""
        targets = {ctx: ctx.n_tokens for ctx in contexts}
        self.flusher.add_all_dirty(contexts)
        async with self.cache.progress:
            while True:
                pending = [ctx for ctx, n in targets.items() if not ctx.deleted and ctx.durable < n]
                if not pending:
                    return
                failed = [c.error for ctx in pending for s in ctx.streams for c in s.chunks
                          if c.error and c.dirty and not c.flushing]
                if failed:
                    code = OVER_CAPACITY if "no data dir has room" in failed[0] else IO_ERROR
                    raise WireError(code, f"flush failed: {failed[0]}")
                await self.cache.progress.wait()

    async def close(self) -> None:
        """Clean stop: everything committed becomes durable, and when contexts were last read is recorded."""
        await self.flush(list(self.contexts.values()))
        await self.flusher.stop()
        await self.space.drain()
        await self.evictor.persist_access()

    def placement(self, ctx: Context) -> dict:
        """Where a context's chunks are: per stream on disk and in the arena; per data dir the bytes it takes."""
        per_dir = dict.fromkeys((str(d.path) for d in self.dirs), 0)
        streams = []
        for s in ctx.streams:
            for c in s.chunks:
                if c.disk is not None:
                    per_dir[str(self.dirs[c.disk.dir].path)] += c.disk.slot_size
            streams.append({"layer": s.layer, "rep": s.rep.name.lower(), "chunks": len(s.chunks),
                            "on_disk": sum(1 for c in s.chunks if c.disk is not None),
                            "in_arena": sum(1 for c in s.chunks if c.arena_off is not None),
                            "dirty": sum(1 for c in s.chunks if c.dirty),
                            "shared": sum(1 for c in s.chunks if len(c.refs) > 1)})
        expires = ctx.accessed + self.cfg.ttl if self.cfg.ttl and not ctx.pinned else None
        return {"placement": streams, "disk_bytes": per_dir, "expires": expires}

    def dirty_bytes(self) -> int:
        """Arena bytes of chunks waiting to be flushed: a dirty chunk is always resident."""
        return sum(c.image_size for c in self.cache.lru if c.dirty and not c.dead)

    def status(self) -> dict:
        cfg = self.cfg
        return {
            "engine": self.engine.name,
            "arena": {"path": str(self.arena.path), "size": self.arena.size, "used": self.arena.used,
                      "dirty": self.dirty_bytes()},
            "data_dirs": [
                {"path": str(d.path), "direct_io": d.direct, "healthy": d.healthy, "error": d.error,
                 "errors": d.errors, "capacity": self.space.dir_capacity(d), "allocated": d.allocated_bytes,
                 "used": d.used_bytes} for d in self.dirs],
            "capacity": self.space.capacity(),
            "capacity_limit": cfg.capacity,
            "dir_capacity_limit": cfg.dir_capacity,
            "used": self.space.used(),
            "logical": self.usage.logical,  # what the durable contexts would take with nothing shared
            "free": self.space.free(),
            "high_watermark": cfg.high_watermark,
            "low_watermark": cfg.low_watermark,
            "ttl": cfg.ttl,
            "log_level": cfg.log_level,
            "maintenance": self.maintenance,
            "contexts": len(self.contexts),
            "pinned": len(self.pinned),
            "leases": len(self.leases),
            "evictions": dict(self.evictor.counts),
            "bytes_saved": self.bytes_saved,
            "bytes_restored": self.bytes_restored,
            "bytes_written": self.flusher.bytes_written,
            "arena_hits": self.cache.hits,
            "disk_reads": self.cache.misses,
        }
