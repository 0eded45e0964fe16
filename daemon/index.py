"""The SQLite (WAL) index of contexts and chunks; every call runs on one dedicated thread, off the loop.

Chunks are owned by name and referenced by contexts (context_chunks, counted in refs), so contexts that share a
prefix reference the same chunks; a chunk's slot is freed when its last reference goes. A shared chunk's name
derives from its content key (ckey); a private one's from its context, position and write sequence. A context's
token chunks carry the content key of their row, so lookups work again after a restart.
"""

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hcache.daemon.slabs import SlotRef

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts(
  key BLOB PRIMARY KEY, namespace TEXT NOT NULL, ctx_id TEXT NOT NULL, model TEXT NOT NULL,
  meta BLOB NOT NULL, n_tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
  accessed REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunks(
  key BLOB PRIMARY KEY, dir INTEGER NOT NULL, slot_size INTEGER NOT NULL, file INTEGER NOT NULL,
  slot INTEGER NOT NULL, n_tokens INTEGER NOT NULL, crc INTEGER NOT NULL, seq INTEGER NOT NULL,
  refs INTEGER NOT NULL, ckey BLOB);
CREATE TABLE IF NOT EXISTS context_chunks(
  ctx BLOB NOT NULL, layer INTEGER NOT NULL, rep INTEGER NOT NULL, idx INTEGER NOT NULL,
  chunk BLOB NOT NULL, PRIMARY KEY(ctx, layer, rep, idx)) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class ContextRow:
    key: bytes
    namespace: str
    ctx_id: str
    model: str
    meta: bytes
    n_tokens: int
    created: float
    accessed: float
    pinned: bool


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """One durable chunk a context references, as the index knows it."""

    ctx: bytes
    layer: int
    rep: int
    idx: int
    slot: SlotRef
    n_tokens: int
    crc: int
    seq: int
    name: bytes
    ckey: bytes | None  # a shared chunk's content key; on a token chunk, its row's


@dataclass(frozen=True, slots=True)
class Written:
    """A chunk image just written and synced, and the (ctx, layer, rep, idx) places that reference it."""

    name: bytes
    slot: SlotRef
    n_tokens: int
    crc: int
    seq: int
    ckey: bytes | None
    places: list[tuple[bytes, int, int, int]]


def private_name(ctx: bytes, layer: int, rep: int, idx: int, seq: int) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=b"hcache-chunk")
    h.update(ctx)
    h.update(b"".join(v.to_bytes(8, "little") for v in (layer, rep, idx, seq)))
    return h.digest()


class Index:
    """Contexts and chunk locations, durable once a call returns (synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hcache-index")
        self._db: sqlite3.Connection = self._pool.submit(self._connect, path).result()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        if "ckey" not in {r[1] for r in db.execute("PRAGMA table_info(chunks)")}:  # an index from before sharing
            db.execute("ALTER TABLE chunks ADD COLUMN ckey BLOB")
        return db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._db)

    def load(self) -> tuple[list[ContextRow], list[ChunkRow]]:
        """Everything, for start-up (called before the loop serves)."""
        return self._pool.submit(self._load, self._db).result()

    @staticmethod
    def _load(db: sqlite3.Connection) -> tuple[list[ContextRow], list[ChunkRow]]:
        contexts = [ContextRow(*r[:8], bool(r[8])) for r in db.execute(
            "SELECT key, namespace, ctx_id, model, meta, n_tokens, created, accessed, pinned FROM contexts")]
        chunks = [
            ChunkRow(r[0], r[1], r[2], r[3], SlotRef(r[4], r[5], r[6], r[7]), r[8], r[9], r[10], r[11], r[12])
            for r in db.execute(
                "SELECT cc.ctx, cc.layer, cc.rep, cc.idx, c.dir, c.slot_size, c.file, c.slot, c.n_tokens,"
                " c.crc, c.seq, c.key, c.ckey FROM context_chunks cc JOIN chunks c ON c.key = cc.chunk")
        ]
        return contexts, chunks

    async def add_context(self, row: ContextRow) -> None:
        def add(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO contexts VALUES (?,?,?,?,?,?,?,?,?)",
                       (row.key, row.namespace, row.ctx_id, row.model, row.meta, row.n_tokens, row.created,
                        row.accessed, int(row.pinned)))

        await self._run(add)

    async def commit_chunks(self, written: list[Written], links: list[tuple[bytes, int, int, int, bytes]],
                            durable: dict[bytes, int]) -> list[SlotRef]:
        """In one transaction: freshly written chunks and the places that reference them, references of contexts to
        chunks already durable (ctx, layer, rep, idx, name), and contexts' durable lengths; returns the slots this
        frees (chunks whose last reference was replaced)."""

        def commit(db: sqlite3.Connection) -> list[SlotRef]:
            freed: list[SlotRef] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for w in written:
                    s = w.slot
                    db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,0,?)",
                               (w.name, s.dir, s.slot_size, s.file, s.slot, w.n_tokens, w.crc, w.seq, w.ckey))
                    for place in w.places:
                        freed += _point(db, place, w.name)
                for *place, name in links:
                    freed += _point(db, tuple(place), name)
                now = time.time()
                for ctx, n in durable.items():
                    db.execute("UPDATE contexts SET n_tokens=?, accessed=? WHERE key=?", (n, now, ctx))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return freed

        return await self._run(commit)

    async def truncate(self, ctx: bytes, first_idx: int, n_tokens: int) -> list[SlotRef]:
        """A context keeps its chunk rows before first_idx and is n_tokens long; returns the slots this frees."""

        def truncate(db: sqlite3.Connection) -> list[SlotRef]:
            db.execute("BEGIN IMMEDIATE")
            try:
                freed = _drop_from(db, ctx, first_idx)
                db.execute("UPDATE contexts SET n_tokens=? WHERE key=?", (n_tokens, ctx))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return freed

        return await self._run(truncate)

    async def delete_context(self, key: bytes) -> list[SlotRef]:
        """Forget a context; returns the slots of chunks no other context references."""

        def delete(db: sqlite3.Connection) -> list[SlotRef]:
            db.execute("BEGIN IMMEDIATE")
            try:
                freed: list[SlotRef] = []
                for (chunk,) in db.execute("SELECT chunk FROM context_chunks WHERE ctx=?", (key,)).fetchall():
                    freed += _unref(db, chunk)
                db.execute("DELETE FROM context_chunks WHERE ctx=?", (key,))
                db.execute("DELETE FROM contexts WHERE key=?", (key,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return freed

        return await self._run(delete)

    async def references(self) -> dict:
        """Reference counts against the references: chunks counted but referenced less ("leaked", a slot never
        freed) or referenced more than counted ("dangling", freed while a context still points at it)."""

        def count(db: sqlite3.Connection) -> dict:
            counted = dict(db.execute("SELECT key, refs FROM chunks").fetchall())
            held = dict(db.execute("SELECT chunk, COUNT(*) FROM context_chunks GROUP BY chunk").fetchall())
            return {"chunks_indexed": len(counted),
                    "leaked": sum(1 for k, refs in counted.items() if held.get(k, 0) < refs or k not in held),
                    "dangling": sum(1 for k, n in held.items() if n > counted.get(k, 0)),
                    "shared": sum(1 for n in held.values() if n > 1)}

        return await self._run(count)

    async def set_pinned(self, key: bytes, pinned: bool) -> None:
        await self._run(lambda db: db.execute("UPDATE contexts SET pinned=? WHERE key=?", (int(pinned), key)))

    async def touch(self, accessed: dict[bytes, float]) -> None:
        """Record when contexts were last accessed (reads included), for LRU and TTL after a restart."""
        await self._run(lambda db: db.executemany("UPDATE contexts SET accessed=? WHERE key=?",
                                                  [(t, k) for k, t in accessed.items()]))

    async def replace_all(self, contexts: list[ContextRow], chunks: list[ChunkRow]) -> None:
        """Replace everything the index holds in one transaction (fsck --rebuild)."""

        def replace(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for table in ("context_chunks", "chunks", "contexts"):
                    db.execute(f"DELETE FROM {table}")
                db.executemany("INSERT INTO contexts VALUES (?,?,?,?,?,?,?,?,?)",
                               [(r.key, r.namespace, r.ctx_id, r.model, r.meta, r.n_tokens, r.created, r.accessed,
                                 int(r.pinned)) for r in contexts])
                refs: dict[bytes, int] = {}
                for row in chunks:
                    if row.name not in refs:
                        s = row.slot
                        db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,0,?)",
                                   (row.name, s.dir, s.slot_size, s.file, s.slot, row.n_tokens, row.crc, row.seq,
                                    row.ckey))
                    refs[row.name] = refs.get(row.name, 0) + 1
                    db.execute("INSERT INTO context_chunks VALUES (?,?,?,?,?)",
                               (row.ctx, row.layer, row.rep, row.idx, row.name))
                db.executemany("UPDATE chunks SET refs=? WHERE key=?", [(n, k) for k, n in refs.items()])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(replace)

    def drop_chunks_from(self, ctx: bytes, first_idx: int) -> list[SlotRef]:
        """At start-up: chunks past a context's durable length are unreachable; drop them."""

        def drop(db: sqlite3.Connection) -> list[SlotRef]:
            db.execute("BEGIN IMMEDIATE")
            freed = _drop_from(db, ctx, first_idx)
            db.execute("COMMIT")
            return freed

        return self._pool.submit(drop, self._db).result()

    def close(self) -> None:
        self._pool.submit(self._db.close).result()
        self._pool.shutdown()


def _point(db: sqlite3.Connection, place: tuple[bytes, int, int, int], name: bytes) -> list[SlotRef]:
    """Make a context's (layer, rep, idx) reference chunk `name`; returns the slot of a chunk this frees."""
    old = db.execute("SELECT chunk FROM context_chunks WHERE ctx=? AND layer=? AND rep=? AND idx=?", place).fetchone()
    if old is not None and old[0] == name:
        return []
    db.execute("INSERT OR REPLACE INTO context_chunks VALUES (?,?,?,?,?)", (*place, name))
    db.execute("UPDATE chunks SET refs = refs + 1 WHERE key=?", (name,))
    return _unref(db, old[0]) if old is not None else []


def _drop_from(db: sqlite3.Connection, ctx: bytes, first_idx: int) -> list[SlotRef]:
    freed: list[SlotRef] = []
    for (chunk,) in db.execute("SELECT chunk FROM context_chunks WHERE ctx=? AND idx>=?", (ctx, first_idx)).fetchall():
        freed += _unref(db, chunk)
    db.execute("DELETE FROM context_chunks WHERE ctx=? AND idx>=?", (ctx, first_idx))
    return freed


def _unref(db: sqlite3.Connection, chunk: bytes) -> list[SlotRef]:
    db.execute("UPDATE chunks SET refs = refs - 1 WHERE key=?", (chunk,))
    row = db.execute("SELECT dir, slot_size, file, slot, refs FROM chunks WHERE key=?", (chunk,)).fetchone()
    if row is None or row[4] > 0:
        return []
    db.execute("DELETE FROM chunks WHERE key=?", (chunk,))
    return [SlotRef(*row[:4])]
