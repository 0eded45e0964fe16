"""Starts and stops hcached: state dir lock, index, data dirs, IO engine, arena, server, signals."""

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path

import aiofiles.os
import uvloop

from hcache.daemon.arena import Arena, arena_owner, pid_alive
from hcache.daemon.config import Config
from hcache.daemon.index import Index
from hcache.daemon.io_engine import open_engine
from hcache.daemon.server import Server
from hcache.daemon.slabs import DataDir
from hcache.daemon.store import Store

log = logging.getLogger("hcache.daemon")


def _lock_state_dir(state_dir: Path) -> int:
    """One daemon per state dir: a second one would corrupt the index and slabs."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "hcached.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"hcached: another hcached is running on state dir {state_dir}: stop it, or start this "
                         "one with another --state-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _arena_dir(state_dir: Path) -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else state_dir


async def _remove_stale_arenas(directory: Path) -> None:
    """Arena files of daemons that were killed (-9) would pin their size in tmpfs forever: remove them."""
    if not await aiofiles.os.path.isdir(directory):
        return
    for name in await aiofiles.os.listdir(directory):
        pid = arena_owner(name)
        if pid is not None and not pid_alive(pid):
            log.info("removing the arena of dead hcached pid %d: %s", pid, name)
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(directory / name)


async def serve(cfg: Config) -> None:
    """Run until SIGTERM or SIGINT, then flush everything committed and stop cleanly."""
    lock = _lock_state_dir(cfg.state_dir)
    loop = asyncio.get_running_loop()
    index = Index(cfg.state_dir / "index.sqlite")
    dirs = [DataDir(i, p, cfg.slab_size) for i, p in enumerate(cfg.data_dirs)]
    for d in dirs:
        if not d.direct:
            log.warning("data dir %s refuses O_DIRECT (tmpfs?): using buffered IO + fdatasync there", d.path)
    engine = await open_engine(cfg.io_engine, loop, str(cfg.data_dirs[0]))
    await _remove_stale_arenas(_arena_dir(cfg.state_dir))
    arena = Arena(cfg.dram, _arena_dir(cfg.state_dir))
    store = Store(cfg, arena, dirs, index, engine)
    server = Server(store, cfg.socket, cfg.tcp)
    try:
        store.load()
        store.flusher.start()
        server.bind()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: nothing to reload yet"))
        tasks = [loop.create_task(server.serve()), loop.create_task(server.expire_leases())]
        log.info("hcached ready: engine=%s arena=%s (%d bytes) data dirs=%s", engine.name, arena.path, arena.size,
                 ", ".join(str(d.path) for d in dirs))
        await stop.wait()
        log.info("stopping: flushing what was committed")
        for t in tasks:
            t.cancel()
        await store.close()
    finally:
        await server.close()
        engine.close()
        for d in dirs:
            d.close()
        index.close()
        arena.close()
        os.close(lock)
    log.info("stopped")


def run(cfg: Config) -> None:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(cfg))
