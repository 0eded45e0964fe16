"""fsck: verify every indexed chunk against its header and crc, and rebuild the index from chunk headers alone."""

import logging
import mmap
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack

from hcache.daemon.contexts import Chunk, Context, parse_layers
from hcache.daemon.index import ChunkRow, ContextRow, private_name
from hcache.daemon.io_engine import IoEngine, IoOp
from hcache.daemon.slabs import DataDir, SlotRef
from hcache.layout.chunks import CHUNK_TOKENS, HEADER_SIZE, ChunkFormatError, ChunkHeader, verify_image
from hcache.layout.geometry import Geometry, Rep
from hcache.layout.keys import context_key, prefix_domain, prefix_keys, shared_chunk_name
from hcache.layout.wire import BUSY, WireError

if TYPE_CHECKING:
    from hcache.daemon.store import Store

log = logging.getLogger("hcache.daemon.fsck")

_BUFFER = 16 << 20  # bytes read per IO batch


class _Buffer:
    """A page-aligned private buffer (not the arena: fsck must not evict what clients use)."""

    def __init__(self, size: int) -> None:
        self.size = max(_BUFFER, size)
        self.view = memoryview(mmap.mmap(-1, self.size))


def _batches(items: list, size_of, limit: int) -> Iterator[list]:
    batch, used = [], 0
    for item in items:
        if batch and used + size_of(item) > limit:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += size_of(item)
    if batch:
        yield batch


async def _read(engine: IoEngine, dirs: list[DataDir], buf: _Buffer, slots: list[tuple[SlotRef, int]]
                ) -> tuple[list[memoryview | None], list[str]]:
    """Read (slot, nbytes) pieces into buf; per piece its bytes, or None and what went wrong."""
    ops, off = [], 0
    for ref, n in slots:
        d = dirs[ref.dir]
        ops.append(IoOp(d.fd(ref), buf.view[off : off + n], d.offset(ref)))
        off += n
    errors = [""] * len(ops)
    try:
        await engine.read(ops)
    except OSError as e:
        for i, err in getattr(e, "failures", [(i, e) for i in range(len(ops))]):
            errors[i] = f"read failed: {err.strerror or err}"
            dirs[slots[i][0].dir].errors += 1
    return [None if errors[i] else op.buf for i, op in enumerate(ops)], errors


@dataclass
class Problem:
    namespace: str
    ctx: str
    layer: int
    rep: int
    chunk: int
    dir: str
    problem: str

    def to_dict(self) -> dict:
        return {"namespace": self.namespace, "ctx": self.ctx, "layer": self.layer, "rep": self.rep,
                "chunk": self.chunk, "dir": self.dir, "problem": self.problem}


async def verify(store: "Store", contexts: list[Context]) -> dict:
    """Read every durable chunk of these contexts from disk (a shared one once) and check header, placement, length
    and crc."""
    seen: dict[Chunk, None] = {}
    for ctx in contexts:
        if not ctx.deleted:
            seen.update((c, None) for s in ctx.streams for c in s.chunks if c.disk is not None)
    todo = [(c, c.disk, c.durable_tokens) for c in seen]
    buf = _Buffer(max((c.image_size for c, _, _ in todo), default=0))
    problems: list[Problem] = []
    checked = nbytes = 0
    for batch in _batches(todo, lambda t: t[0].image_size, buf.size):
        images, errors = await _read(store.engine, store.dirs, buf, [(ref, c.image_size) for c, ref, _ in batch])
        for (c, ref, expect), image, error in zip(batch, images, errors, strict=True):
            if c.disk != ref or c.dead:
                continue  # rewritten or deleted while we read: its new copy was written after this fsck began
            checked += 1
            nbytes += ref.slot_size
            if image is not None:
                error = _check(c, image, expect)
                store.dirs[ref.dir].errors += bool(error)
            if error:
                problems.append(Problem(c.owner.namespace, c.owner.ctx_id, c.layer, int(c.rep), c.idx,
                                        str(store.dirs[ref.dir].path), error))
                log.error("fsck: %s in %s: %s", c.label, store.dirs[ref.dir].path, error)
    return {"checked": checked, "bytes": nbytes, "problems": [p.to_dict() for p in problems]}


def _check(c: Chunk, image: memoryview, expect_tokens: int) -> str:
    try:
        header = verify_image(image, c.header_key, c.layer, c.idx, c.rep)
    except ChunkFormatError as e:
        return str(e)
    if header.n_tokens < expect_tokens:
        return f"chunk holds {header.n_tokens} tokens, the index says {expect_tokens} are durable"
    return ""


# -- rebuild -------------------------------------------------------------------------------------------
@dataclass
class _Found:
    header: ChunkHeader
    slot: SlotRef


async def _scan_headers(store: "Store") -> list[_Found]:
    """Every slot of every slab file whose first 4 KiB parse as a chunk header."""
    found: list[_Found] = []
    slots = [SlotRef(d.number, size, n, i) for d in store.dirs for size, n, _ in d.slabs()
             for i in range(d.slots_per_file(size))]
    buf = _Buffer(0)
    for batch in _batches(slots, lambda _: HEADER_SIZE, buf.size):
        images, _ = await _read(store.engine, store.dirs, buf, [(ref, HEADER_SIZE) for ref in batch])
        for ref, image in zip(batch, images, strict=True):
            if image is None:
                continue
            try:
                found.append(_Found(ChunkHeader.unpack(image), ref))
            except ChunkFormatError:
                continue  # a free, erased or torn slot
    return found


def _context_of(header: ChunkHeader) -> Context | None:
    """The context a chunk header describes, or None when its metadata does not hold together."""
    m = header.meta
    try:
        geometry = Geometry.from_dict(m["geometry"])
        ctx = Context(header.ctx_key, m["ns"], m["id"], m["model"], geometry, parse_layers(m["layers"], geometry),
                      float(m.get("created", 0.0)), 0.0, share=bool(m.get("share", True)))
    except (KeyError, TypeError, ValueError, WireError):
        return None
    return ctx if context_key(ctx.namespace, ctx.ctx_id) == header.ctx_key else None


async def _newest_valid(store: "Store", candidates: dict[tuple, list[_Found]]) -> dict[tuple, tuple[_Found, bytes]]:
    """Per (header key, layer, rep, chunk): the newest copy whose payload crc holds, with its token ids (int32
    little-endian) where it holds token records."""
    chosen: dict[tuple, tuple[_Found, bytes]] = {}
    pending = {pos: sorted(cs, key=lambda f: f.header.seq, reverse=True) for pos, cs in candidates.items()}
    largest = max((f.slot.slot_size for cs in pending.values() for f in cs), default=0)
    buf = _Buffer(largest)
    while pending:
        tops = [(pos, cs[0]) for pos, cs in pending.items()]
        for batch in _batches(tops, lambda t: t[1].slot.slot_size, buf.size):
            images, _ = await _read(store.engine, store.dirs, buf, [(f.slot, f.slot.slot_size) for _, f in batch])
            for (pos, f), image in zip(batch, images, strict=True):
                h = f.header
                try:
                    if image is None:
                        raise ChunkFormatError("unreadable")
                    verify_image(image, h.ctx_key, h.layer, h.chunk, h.rep)
                    records = image[HEADER_SIZE : HEADER_SIZE + h.payload_len] if h.rep is Rep.TOKENS else b""
                    chosen[pos] = (f, memoryview(records).cast("i")[::2].tobytes() if records else b"")
                    del pending[pos]
                except ChunkFormatError:
                    pending[pos].pop(0)  # torn or corrupt: an older copy may still be whole
                    if not pending[pos]:
                        del pending[pos]
    return chosen


async def _plan(store: "Store") -> tuple[list[ContextRow], list[ChunkRow]]:
    found = await _scan_headers(store)
    contexts: dict[bytes, Context] = {}
    for f in found:  # the newest incarnation of each key (a context deleted and created again)
        ctx = _context_of(f.header)
        if ctx is not None and (f.header.ctx_key not in contexts or ctx.created > contexts[ctx.key].created):
            contexts[ctx.key] = ctx
    candidates: dict[tuple, list[_Found]] = defaultdict(list)
    for f in found:
        h = f.header
        ctx = contexts.get(h.ctx_key)
        if not h.meta.get("shared") and (ctx is None or float(h.meta.get("created", 0.0)) != ctx.created):
            continue
        candidates[(h.ctx_key, h.layer, int(h.rep), h.chunk)].append(f)  # a shared one's key is its content key
    chosen = await _newest_valid(store, candidates)
    ctx_rows, chunk_rows = [], []
    for key, ctx in contexts.items():
        keys = _content_keys(ctx, chosen)
        picks = [_stream_chunks(key, s.layer, int(s.rep), keys, chosen) for s in ctx.streams]
        n_tokens = min(sum(f.header.n_tokens for f in fs) for fs in picks)
        if n_tokens == 0:
            continue
        rows = (n_tokens + CHUNK_TOKENS - 1) // CHUNK_TOKENS
        seqs = [f.header.seq for fs in picks for f in fs[:rows]]
        created = ctx.created or min(seqs) / 1e9
        ctx_rows.append(ContextRow(key, ctx.namespace, ctx.ctx_id, ctx.model,
                                   msgpack.packb(ctx.meta(), use_bin_type=True), n_tokens, created,
                                   max(seqs) / 1e9, False))
        for fs in picks:
            for f in fs[:rows]:
                h = f.header
                if h.ctx_key == key:
                    name = private_name(key, h.layer, int(h.rep), h.chunk, h.seq)
                    ckey = keys[h.chunk] if h.rep is Rep.TOKENS and h.chunk < len(keys) else None
                else:
                    name, ckey = shared_chunk_name(h.ctx_key, h.layer, int(h.rep)), h.ctx_key
                chunk_rows.append(ChunkRow(key, h.layer, int(h.rep), h.chunk, f.slot, h.n_tokens, h.payload_crc,
                                           h.seq, name, ckey))
    return ctx_rows, chunk_rows


def _content_keys(ctx: Context, chosen: dict[tuple, tuple[_Found, bytes]]) -> list[bytes]:
    """The content keys of a sharing context's full chunk rows, from the token ids in its own token chunks."""
    if not ctx.share:
        return []
    ids = b""
    t = ctx.tokens
    while (hit := chosen.get((ctx.key, t.layer, int(t.rep), len(ids) // (4 * CHUNK_TOKENS)))) is not None:
        if hit[0].header.n_tokens < CHUNK_TOKENS:
            break
        ids += hit[1]
    return prefix_keys(prefix_domain(ctx.model, ctx.namespace), ids, 4 * CHUNK_TOKENS)


def _stream_chunks(key: bytes, layer: int, rep: int, keys: list[bytes], chosen: dict[tuple, tuple[_Found, bytes]]
                   ) -> list[_Found]:
    """One stream's chunks from position 0 on, as far as they run on: a full row's shared chunk where there is
    one, else the context's own copy (a tail, or a context that does not share)."""
    out: list[_Found] = []
    while True:
        idx = len(out)
        hit = chosen.get((keys[idx], layer, rep, idx)) if idx < len(keys) else None
        hit = hit or chosen.get((key, layer, rep, idx))
        if hit is None:
            return out
        out.append(hit[0])
        if hit[0].header.n_tokens < CHUNK_TOKENS:
            return out


async def rebuild(store: "Store") -> dict:
    """Replace the index with what the chunk headers on disk say, then reload the daemon's state from it.

    Contexts come back with their durable length (per stream the contiguous prefix of chunks, the newest whole
    copy of each; the shortest stream decides). Pins are not in chunk headers: pin contexts again afterwards.
    """
    if store.maintenance:
        raise WireError(BUSY, f"hcached is {store.maintenance}: wait for it to finish")
    store.maintenance = "rebuilding its index"
    started = time.monotonic()
    try:
        await store.flush(list(store.contexts.values()))
        await store.space.drain()
        in_use = len(store.leases) or any(c.pins or c.loading for ctx in store.contexts.values()
                                          for s in ctx.streams for c in s.chunks)
        if in_use:
            raise WireError(BUSY, "clients hold leases on contexts: rebuild the index when they are done, or "
                                  "stop them")
        async with store.flusher.commit_lock:
            ctx_rows, chunk_rows = await _plan(store)
            await store.index.replace_all(ctx_rows, chunk_rows)
            store.reset()
            store.load()
    finally:
        store.maintenance = ""
    log.info("index rebuilt from chunk headers in %.1fs: %d contexts, %d chunks", time.monotonic() - started,
             len(ctx_rows), len(chunk_rows))
    return {"contexts": len(ctx_rows), "chunks": len(chunk_rows),
            "tokens": sum(r.n_tokens for r in ctx_rows)}
