"""Batched positional file IO behind one async interface, on io_uring or a thread pool."""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import cache
from typing import Protocol

log = logging.getLogger("hcache.daemon.io")

_PROBE_SIZE = 4096
_PROBE_TIMEOUT_S = 5.0
# Run by uring_binding_problem in a child process; a crash there should leave no core file behind.
_BINDING_CHECK = """
import resource
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
from liburing import Ring, io_uring_queue_exit, io_uring_queue_init
ring = Ring()
io_uring_queue_init(8, ring)
io_uring_queue_exit(ring)
"""


@dataclass(frozen=True, slots=True)
class IoOp:
    fd: int
    buf: memoryview  # byte slice of an mmap'd arena; address, length, offset 4096-aligned for O_DIRECT fds
    offset: int


class IoBatchError(OSError):
    """Some ops of a batch failed; `failures` lists (index into the batch, error) in index order."""

    def __init__(self, failures: list[tuple[int, OSError]], total: int) -> None:
        index, first = failures[0]
        super().__init__(
            first.errno, f"{len(failures)} of {total} IO ops failed; first: op {index}: {first.strerror}"
        )
        self.failures = failures


class IoEngine(Protocol):
    name: str  # "io_uring" or "threads"

    async def write(self, ops: Sequence[IoOp]) -> None:
        """Write all ops as one batch; wait for every op, then raise IoBatchError if any failed."""

    async def read(self, ops: Sequence[IoOp]) -> None:
        """Read all ops as one batch, like write(); a read that hits EOF early fails with EIO."""

    async def fdatasync(self, fds: Iterable[int]) -> None:
        """fdatasync all fds in parallel off the event loop thread; IoBatchError indexes into fds."""

    def close(self) -> None: ...


def short_transfer_error(write: bool) -> OSError:
    return OSError(errno.EIO, "short write" if write else "short read")


def raise_failures(results: Sequence[BaseException | None]) -> None:
    """Raise IoBatchError for the OSErrors among per-op results (from gather); re-raise anything else."""
    failures: list[tuple[int, OSError]] = []
    for index, result in enumerate(results):
        if isinstance(result, OSError):
            failures.append((index, result))
        elif isinstance(result, BaseException):
            raise result
    if failures:
        raise IoBatchError(failures, len(results))


async def fdatasync_all(loop: asyncio.AbstractEventLoop, pool: Executor, fds: Iterable[int]) -> None:
    futures = [loop.run_in_executor(pool, os.fdatasync, fd) for fd in fds]
    raise_failures(await asyncio.gather(*futures, return_exceptions=True))


async def open_engine(kind: str, loop: asyncio.AbstractEventLoop, probe_dir: str) -> IoEngine:
    """Open the IO engine `kind` ("auto", "io_uring" or "threads") bound to `loop`; await it on `loop`.

    io_uring is accepted only after the liburing binding ran in a child process (uring_binding_problem)
    and a 4 KiB write+read round trip went through the loop on a temp file in `probe_dir`; "auto" falls
    back to threads (logging why), a forced "io_uring" raises RuntimeError.
    """
    from .thread_engine import ThreadEngine  # here: the engine modules import this one

    if kind == "threads":
        return ThreadEngine(loop)
    if kind not in ("auto", "io_uring"):
        raise ValueError(f'unknown io_engine {kind!r}: expected "auto", "io_uring" or "threads"')
    reason = await loop.run_in_executor(None, uring_binding_problem)
    cause: Exception | None = None
    if reason is None:
        try:
            return await _open_uring(loop, probe_dir)
        except Exception as exc:
            reason, cause = f"{type(exc).__name__}: {exc}", exc
    if kind == "io_uring":
        raise RuntimeError(
            f'io_uring engine unavailable ({reason}); io_engine = "threads" is the alternative'
        ) from cause
    log.warning("io_uring unavailable, using the thread-pool IO engine: %s", reason)
    return ThreadEngine(loop)


@cache
def uring_binding_problem() -> str | None:
    """Why the liburing binding cannot run here (None if it can), found once per process in a child process."""
    # The binding's native code can die of a signal (SIGILL on CPUs lacking instructions its wheel was
    # built for), which would kill this process rather than raise, so it first runs where that is harmless.
    try:
        child = subprocess.run([sys.executable, "-c", _BINDING_CHECK], capture_output=True, text=True,
                               errors="replace", timeout=_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the liburing binding did not set up a ring within {_PROBE_TIMEOUT_S:g} s in a probe process"
    except OSError as exc:
        return f"could not start a probe process for the liburing binding: {exc}"
    if child.returncode == -signal.SIGILL:
        return ("the liburing binding crashed with SIGILL on this CPU "
                "(its binary uses instructions this processor lacks)")
    if child.returncode < 0:
        return f"the liburing binding crashed with {signal.Signals(-child.returncode).name} in a probe process"
    if child.returncode:
        last = child.stderr.strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
        return f"the liburing binding failed in a probe process: {last[0]}"
    return None


async def _open_uring(loop: asyncio.AbstractEventLoop, probe_dir: str) -> IoEngine:
    from .uring_engine import UringEngine  # importing liburing can itself fail on old systems

    engine = UringEngine(loop)
    try:
        await asyncio.wait_for(_round_trip(engine, probe_dir), _PROBE_TIMEOUT_S)
    except BaseException:
        engine.close()
        raise
    return engine


async def _round_trip(engine: IoEngine, probe_dir: str) -> None:
    fd, path = tempfile.mkstemp(prefix=".hcache-io-probe-", dir=probe_dir)
    os.close(fd)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError:  # e.g. tmpfs refuses O_DIRECT; buffered IO still proves the ring works
            fd = os.open(path, os.O_RDWR)
    finally:
        os.unlink(path)
    try:
        view = memoryview(mmap.mmap(-1, 2 * _PROBE_SIZE))
        sent, received = view[:_PROBE_SIZE], view[_PROBE_SIZE:]
        sent[:] = os.urandom(_PROBE_SIZE)
        await engine.write([IoOp(fd, sent, 0)])
        await engine.read([IoOp(fd, received, 0)])
        if sent != received:
            raise RuntimeError("probe read back different bytes than it wrote")
    finally:
        os.close(fd)
