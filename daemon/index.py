"""The SQLite (WAL) index of contexts and chunks; every call runs on one dedicated thread, off the loop.

Chunks are owned by key and referenced by contexts (context_chunks), so contexts that share a prefix
can later reference the same chunks; a chunk's slot is freed when its last reference goes.
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
  refs INTEGER NOT NULL);
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
    """One durable chunk of a context's stream, as the index knows it."""

    ctx: bytes
    layer: int
    rep: int
    idx: int
    slot: SlotRef
    n_tokens: int
    crc: int
    seq: int


def chunk_key(row: ChunkRow) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=b"hcache-chunk")
    h.update(row.ctx)
    h.update(b"".join(v.to_bytes(8, "little") for v in (row.layer, row.rep, row.idx, row.seq)))
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
            ChunkRow(r[0], r[1], r[2], r[3], SlotRef(r[4], r[5], r[6], r[7]), r[8], r[9], r[10])
            for r in db.execute(
                "SELECT cc.ctx, cc.layer, cc.rep, cc.idx, c.dir, c.slot_size, c.file, c.slot, c.n_tokens,"
                " c.crc, c.seq FROM context_chunks cc JOIN chunks c ON c.key = cc.chunk")
        ]
        return contexts, chunks

    async def add_context(self, row: ContextRow) -> None:
        def add(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO contexts VALUES (?,?,?,?,?,?,?,?,?)",
                       (row.key, row.namespace, row.ctx_id, row.model, row.meta, row.n_tokens, row.created,
                        row.accessed, int(row.pinned)))

        await self._run(add)

    async def commit_chunks(self, rows: list[ChunkRow], durable: dict[bytes, int]) -> list[SlotRef]:
        """Point contexts at freshly written chunks in one transaction; returns the slots this frees."""

        def commit(db: sqlite3.Connection) -> list[SlotRef]:
            freed: list[SlotRef] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    key = chunk_key(row)
                    s = row.slot
                    db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,1)",
                               (key, s.dir, s.slot_size, s.file, s.slot, row.n_tokens, row.crc, row.seq))
                    old = db.execute("SELECT chunk FROM context_chunks WHERE ctx=? AND layer=? AND rep=? AND idx=?",
                                     (row.ctx, row.layer, row.rep, row.idx)).fetchone()
                    db.execute("INSERT OR REPLACE INTO context_chunks VALUES (?,?,?,?,?)",
                               (row.ctx, row.layer, row.rep, row.idx, key))
                    if old is not None:
                        freed += _unref(db, old[0])
                now = time.time()
                for ctx, n in durable.items():
                    db.execute("UPDATE contexts SET n_tokens=?, accessed=? WHERE key=?", (n, now, ctx))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return freed

        return await self._run(commit)

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
                for row in chunks:
                    key = chunk_key(row)
                    s = row.slot
                    db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,1)",
                               (key, s.dir, s.slot_size, s.file, s.slot, row.n_tokens, row.crc, row.seq))
                    db.execute("INSERT INTO context_chunks VALUES (?,?,?,?,?)",
                               (row.ctx, row.layer, row.rep, row.idx, key))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(replace)

    def drop_chunks_from(self, ctx: bytes, first_idx: int) -> list[SlotRef]:
        """At start-up: chunks past a context's durable length are unreachable; drop them."""

        def drop(db: sqlite3.Connection) -> list[SlotRef]:
            db.execute("BEGIN IMMEDIATE")
            freed: list[SlotRef] = []
            for (chunk,) in db.execute("SELECT chunk FROM context_chunks WHERE ctx=? AND idx>=?",
                                       (ctx, first_idx)).fetchall():
                freed += _unref(db, chunk)
            db.execute("DELETE FROM context_chunks WHERE ctx=? AND idx>=?", (ctx, first_idx))
            db.execute("COMMIT")
            return freed

        return self._pool.submit(drop, self._db).result()

    def close(self) -> None:
        self._pool.submit(self._db.close).result()
        self._pool.shutdown()


def _unref(db: sqlite3.Connection, chunk: bytes) -> list[SlotRef]:
    db.execute("UPDATE chunks SET refs = refs - 1 WHERE key=?", (chunk,))
    row = db.execute("SELECT dir, slot_size, file, slot, refs FROM chunks WHERE key=?", (chunk,)).fetchone()
    if row is None or row[4] > 0:
        return []
    db.execute("DELETE FROM chunks WHERE key=?", (chunk,))
    return [SlotRef(*row[:4])]
