"""Tests for the io_uring and thread-pool IO engines (O_DIRECT round trips, batching, errors)."""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import random
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import uvloop

from hcache.daemon import io_engine
from hcache.daemon.io_engine import IoBatchError, IoEngine, IoOp, open_engine, uring_binding_problem
from hcache.daemon.thread_engine import ThreadEngine
from hcache.daemon.uring_engine import UringEngine  # importing is safe; building a Ring is what can crash

KIB = 1024
URING_PROBLEM = uring_binding_problem()
needs_uring = pytest.mark.skipif(URING_PROBLEM is not None, reason=f"io_uring cannot run here: {URING_PROBLEM}")
ENGINES = [pytest.param("io_uring", marks=needs_uring), "threads"]
T = TypeVar("T")


def _supports_o_direct(directory: Path) -> bool:
    try:
        fd = os.open(directory / ".o_direct_check", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / ".o_direct_check")
    return True


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that accepts O_DIRECT: tmp_path unless that is on tmpfs, else one under /var/tmp."""
    if _supports_o_direct(tmp_path):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="hcache-io-test-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def run_with(kind: str, data_dir: Path, body: Callable[[IoEngine], Awaitable[T]]) -> T:
    """Run body(engine) on a fresh uvloop with the `kind` engine, closing both afterwards."""

    async def main() -> T:
        engine = await open_engine(kind, asyncio.get_running_loop(), str(data_dir))
        try:
            return await body(engine)
        finally:
            engine.close()

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def arena(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))


def open_direct(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)


@pytest.mark.parametrize("kind", ENGINES)
def test_o_direct_batch_round_trip(kind: str, data_dir: Path) -> None:
    count, size = 64, 64 * KIB
    src, dst = arena(count * size), arena(count * size)
    src[:] = random.randbytes(count * size)
    fd = open_direct(data_dir / "data")
    written, read = random.sample(range(count), count), random.sample(range(count), count)

    def ops(buf: memoryview, slots: list[int]) -> list[IoOp]:
        return [IoOp(fd, buf[i * size : (i + 1) * size], slot * size) for i, slot in enumerate(slots)]

    async def body(engine: IoEngine) -> None:
        await engine.write(ops(src, written))
        await engine.read(ops(dst, read))

    try:
        run_with(kind, data_dir, body)
        for i, slot in enumerate(read):
            j = written.index(slot)
            assert dst[i * size : (i + 1) * size] == src[j * size : (j + 1) * size]
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ENGINES)
def test_one_batch_across_two_files(kind: str, data_dir: Path) -> None:
    size = 4 * KIB
    src = arena(8 * size)
    src[:] = random.randbytes(8 * size)
    fds = [open_direct(data_dir / "a"), open_direct(data_dir / "b")]
    offsets = [0, 3, 1, 7]  # in units of `size`, out of order and sparse

    async def body(engine: IoEngine) -> None:
        await engine.write(
            [IoOp(fds[i % 2], src[i * size : (i + 1) * size], offsets[i // 2] * size) for i in range(8)]
        )

    try:
        run_with(kind, data_dir, body)
        contents = [(data_dir / name).read_bytes() for name in ("a", "b")]
        for i in range(8):
            at = offsets[i // 2] * size
            assert contents[i % 2][at : at + size] == src[i * size : (i + 1) * size]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("kind", ENGINES)
def test_batch_larger_than_the_ring(kind: str, data_dir: Path) -> None:
    count, size = 600, 4 * KIB
    src, dst = arena(count * size), arena(count * size)
    src[:] = random.randbytes(count * size)
    fd = open_direct(data_dir / "data")

    async def body(engine: IoEngine) -> None:
        await engine.write([IoOp(fd, src[i * size : (i + 1) * size], i * size) for i in range(count)])
        await engine.read([IoOp(fd, dst[i * size : (i + 1) * size], i * size) for i in range(count)])

    try:
        run_with(kind, data_dir, body)
        assert dst == src
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ENGINES)
def test_failures_are_indexed_and_the_engine_stays_usable(kind: str, data_dir: Path) -> None:
    size = 4 * KIB
    buf = arena(4 * size)
    buf[:] = random.randbytes(4 * size)
    fd = open_direct(data_dir / "data")
    read_only = os.open(data_dir / "data", os.O_RDONLY)

    async def body(engine: IoEngine) -> None:
        ops = [IoOp(fd, buf[i * size : (i + 1) * size], i * size) for i in range(4)]
        ops[2] = IoOp(read_only, ops[2].buf, ops[2].offset)
        with pytest.raises(IoBatchError) as write_error:
            await engine.write(ops)
        assert [(i, e.errno) for i, e in write_error.value.failures] == [(2, errno.EBADF)]
        assert "1 of 4" in str(write_error.value)

        # The file holds blocks 0, 1 and 3 of `size` bytes: block 2 is a hole, block 5 is past EOF.
        with pytest.raises(IoBatchError) as read_error:
            await engine.read([IoOp(fd, buf[:size], 0), IoOp(fd, buf[size : 2 * size], 5 * size)])
        failures = [(i, e.errno, e.strerror) for i, e in read_error.value.failures]
        assert failures == [(1, errno.EIO, "short read")]

        await engine.write([IoOp(fd, buf[:size], 4 * size)])

    try:
        run_with(kind, data_dir, body)
        assert os.fstat(fd).st_size == 5 * size
    finally:
        os.close(read_only)
        os.close(fd)


@pytest.mark.parametrize("kind", ENGINES)
def test_read_that_hits_eof_midway_fails(kind: str, data_dir: Path) -> None:
    path = data_dir / "short"
    path.write_bytes(b"x" * 10_000)
    fd = os.open(path, os.O_RDONLY)
    buf = arena(16 * KIB)

    async def body(engine: IoEngine) -> None:
        with pytest.raises(IoBatchError) as error:
            await engine.read([IoOp(fd, buf, 0)])
        assert error.value.errno == errno.EIO

    try:
        run_with(kind, data_dir, body)
        assert buf[:10_000] == b"x" * 10_000
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ENGINES)
def test_event_loop_runs_during_io(kind: str, data_dir: Path) -> None:
    count, size = 128, 1024 * KIB
    src = arena(count * size)
    fd = open_direct(data_dir / "data")

    async def body(engine: IoEngine) -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        ticks = 0
        await engine.write([IoOp(fd, src[i * size : (i + 1) * size], i * size) for i in range(count)])
        ticker.cancel()
        return ticks

    try:
        assert run_with(kind, data_dir, body) >= 1
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ENGINES)
def test_fdatasync(kind: str, data_dir: Path) -> None:
    fds = [os.open(data_dir / name, os.O_RDWR | os.O_CREAT, 0o644) for name in ("a", "b")]
    for fd in fds:
        os.write(fd, b"payload")
    pipe = os.pipe()

    async def body(engine: IoEngine) -> None:
        await engine.fdatasync(fds)
        with pytest.raises(IoBatchError) as error:
            await engine.fdatasync([fds[0], pipe[0]])  # pipes cannot be synced
        assert [(i, e.errno) for i, e in error.value.failures] == [(1, errno.EINVAL)]

    try:
        run_with(kind, data_dir, body)
    finally:
        for fd in (*fds, *pipe):
            os.close(fd)


def test_auto_picks_io_uring_where_its_binding_runs(data_dir: Path, auto_engine: str) -> None:
    async def body(engine: IoEngine) -> IoEngine:
        return engine

    engine = run_with("auto", data_dir, body)
    assert isinstance(engine, UringEngine if URING_PROBLEM is None else ThreadEngine)
    assert engine.name == auto_engine
    assert list(data_dir.iterdir()) == []  # the probe file is gone


def test_threads_forced(data_dir: Path) -> None:
    async def body(engine: IoEngine) -> IoEngine:
        return engine

    engine = run_with("threads", data_dir, body)
    assert isinstance(engine, ThreadEngine) and engine.name == "threads"


def test_failed_probe_falls_back_or_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "missing"

    async def body(engine: IoEngine) -> IoEngine:
        return engine

    with caplog.at_level(logging.WARNING, logger="hcache.daemon.io"):
        assert isinstance(run_with("auto", missing, body), ThreadEngine)
    assert "io_uring unavailable" in caplog.text
    with pytest.raises(RuntimeError, match='io_engine = "threads"'):
        run_with("io_uring", missing, body)
    with pytest.raises(ValueError):
        run_with("spdk", missing, body)


_DIES_OF_SIGILL = """
import os, resource, signal
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.kill(os.getpid(), signal.SIGILL)
"""


@pytest.fixture
def crashing_binding(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The binding probe's verdict where liburing dies of SIGILL: this machine's, else from a child made to die so."""
    if URING_PROBLEM is not None:
        if "SIGILL" not in URING_PROBLEM:
            pytest.skip(f"the liburing binding fails here, but not with SIGILL: {URING_PROBLEM}")
        yield URING_PROBLEM
        return
    monkeypatch.setattr(io_engine, "_BINDING_CHECK", _DIES_OF_SIGILL)
    uring_binding_problem.cache_clear()
    yield uring_binding_problem()
    uring_binding_problem.cache_clear()  # the next caller probes the real binding again


def test_a_binding_that_crashes_means_threads_or_an_error(
    data_dir: Path, crashing_binding: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(engine: IoEngine) -> IoEngine:
        return engine

    assert "crashed with SIGILL on this CPU" in crashing_binding
    with caplog.at_level(logging.WARNING, logger="hcache.daemon.io"):
        assert isinstance(run_with("auto", data_dir, body), ThreadEngine)
    assert f"io_uring unavailable, using the thread-pool IO engine: {crashing_binding}" in caplog.text
    with pytest.raises(RuntimeError, match="crashed with SIGILL") as error:
        run_with("io_uring", data_dir, body)
    assert crashing_binding in str(error.value) and 'io_engine = "threads"' in str(error.value)
