"""io_uring IO engine: one ring per event loop, completions drained through a registered eventfd."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from liburing import (
    CQE,
    Cqe,
    CqeIter,
    Iovec,
    Ring,
    io_uring_cq_advance,
    io_uring_cqe_get_data64,
    io_uring_get_sqe,
    io_uring_prep_readv,
    io_uring_prep_writev,
    io_uring_queue_exit,
    io_uring_queue_init,
    io_uring_register_eventfd,
    io_uring_sq_ready,
    io_uring_sqe_set_data64,
    io_uring_submit,
)

from .io_engine import IoBatchError, IoOp, fdatasync_all, short_transfer_error


class _Batch:
    __slots__ = ("future", "pending", "failures")

    def __init__(self, future: asyncio.Future[None], pending: int) -> None:
        self.future = future
        self.pending = pending
        self.failures: list[tuple[int, OSError]] = []

    def finish(self, index: int, error: OSError | None = None) -> None:
        if error is not None:
            self.failures.append((index, error))
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(None)


class _Op:
    """One transfer; keeps its buffer and Iovec alive until the kernel has completed it."""

    __slots__ = ("batch", "index", "fd", "view", "offset", "write", "iov")

    def __init__(self, batch: _Batch, index: int, op: IoOp, write: bool) -> None:
        self.batch = batch
        self.index = index
        self.fd = op.fd
        self.view = op.buf  # what is left to transfer, at self.offset
        self.offset = op.offset
        self.write = write
        self.iov: Iovec | None = None


class UringEngine:
    """IoEngine on io_uring; never waits in the kernel, so the loop (and the GIL) stay free."""

    name = "io_uring"

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = 256) -> None:
        self._loop = loop
        self._ring = Ring()
        self._cqe = Cqe()
        # The CQ holds 2 * depth entries; keeping no more ops than that in flight means it never
        # overflows (overflowed CQEs would only show up after another io_uring_enter).
        self._max_in_flight = 2 * depth
        self._in_flight: dict[int, _Op] = {}
        self._backlog: deque[_Op] = deque()
        self._next_tag = 0
        self._closed = False
        with ExitStack() as undo:
            io_uring_queue_init(depth, self._ring)
            undo.callback(io_uring_queue_exit, self._ring)
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            undo.callback(os.close, self._efd)
            io_uring_register_eventfd(self._ring, self._efd)
            loop.add_reader(self._efd, self._on_completions)
            undo.pop_all()
        self._sync_pool = ThreadPoolExecutor(8, thread_name_prefix="hcache-fdatasync")

    async def write(self, ops: Sequence[IoOp]) -> None:
        await self._run(ops, write=True)

    async def read(self, ops: Sequence[IoOp]) -> None:
        if any(op.buf.readonly for op in ops):  # the kernel would write into it regardless
            raise ValueError("read into a read-only buffer")
        await self._run(ops, write=False)

    async def fdatasync(self, fds: Iterable[int]) -> None:
        await fdatasync_all(self._loop, self._sync_pool, fds)

    def close(self) -> None:
        """Release the ring; call it with no IO in flight (batches still pending then fail)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._efd)
        io_uring_queue_exit(self._ring)
        os.close(self._efd)
        self._sync_pool.shutdown(wait=False)
        if not self._loop.is_closed():
            for op in (*self._in_flight.values(), *self._backlog):
                if not op.batch.future.done():
                    op.batch.future.set_exception(RuntimeError("IO engine closed with the batch in flight"))

    async def _run(self, ops: Sequence[IoOp], write: bool) -> None:
        if self._closed:
            raise RuntimeError("IO engine is closed")
        if not ops:
            return
        batch = _Batch(self._loop.create_future(), len(ops))
        self._backlog.extend(_Op(batch, index, op, write) for index, op in enumerate(ops))
        self._submit_backlog()
        await batch.future
        if batch.failures:
            raise IoBatchError(sorted(batch.failures, key=lambda failure: failure[0]), len(ops))

    def _submit_backlog(self) -> None:
        while self._backlog and len(self._in_flight) < self._max_in_flight:
            op = self._backlog.popleft()
            if op.batch.future.cancelled():
                continue
            sqe = io_uring_get_sqe(self._ring)
            if sqe is None:  # SQ full: hand it to the kernel and carry on
                io_uring_submit(self._ring)
                sqe = io_uring_get_sqe(self._ring)
            op.iov = Iovec([op.view])
            if op.write:
                io_uring_prep_writev(sqe, op.fd, op.iov, op.offset)
            else:
                io_uring_prep_readv(sqe, op.fd, op.iov, op.offset)
            io_uring_sqe_set_data64(sqe, self._next_tag)
            self._in_flight[self._next_tag] = op
            self._next_tag += 1
        if io_uring_sq_ready(self._ring):
            io_uring_submit(self._ring)

    def _on_completions(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        # Count what CqeIter yields rather than trusting io_uring_cq_ready() taken beforehand:
        # CQEs posted in between would be consumed here but not advanced past.
        seen = 0
        try:
            for _ in CqeIter(self._ring, self._cqe):
                seen += 1
                self._complete(self._cqe[0])
        finally:
            io_uring_cq_advance(self._ring, seen)
        self._submit_backlog()

    def _complete(self, cqe: CQE) -> None:
        op = self._in_flight.pop(io_uring_cqe_get_data64(cqe))
        op.iov = None
        try:
            done = cqe.res
        except OSError as exc:
            op.batch.finish(op.index, exc)
            return
        if done == len(op.view):
            op.batch.finish(op.index)
        elif done == 0:  # EOF on read; no progress on write
            op.batch.finish(op.index, short_transfer_error(op.write))
        else:
            op.view = op.view[done:]
            op.offset += done
            self._backlog.appendleft(op)
