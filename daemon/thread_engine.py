"""Thread-pool IO engine: os.pwritev/os.preadv on worker threads, which release the GIL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .io_engine import IoOp, fdatasync_all, raise_failures, short_transfer_error


def _transfer(op: IoOp, write: bool) -> None:
    view, offset = op.buf, op.offset
    while view.nbytes:
        done = os.pwritev(op.fd, [view], offset) if write else os.preadv(op.fd, [view], offset)
        if not done:  # EOF on read; no progress on write
            raise short_transfer_error(write)
        view, offset = view[done:], offset + done


class ThreadEngine:
    """IoEngine on a thread pool, for kernels or sandboxes without a usable io_uring."""

    name = "threads"

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int = 8) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hcache-io")

    async def write(self, ops: Sequence[IoOp]) -> None:
        await self._run(ops, write=True)

    async def read(self, ops: Sequence[IoOp]) -> None:
        await self._run(ops, write=False)

    async def fdatasync(self, fds: Iterable[int]) -> None:
        await fdatasync_all(self._loop, self._pool, fds)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, ops: Sequence[IoOp], write: bool) -> None:
        futures = [self._loop.run_in_executor(self._pool, _transfer, op, write) for op in ops]
        raise_failures(await asyncio.gather(*futures, return_exceptions=True))
