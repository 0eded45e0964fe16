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

from hcache.daemon import logs, metrics
from hcache.daemon.arena import Arena, arena_owner, pid_alive
from hcache.daemon.config import reload_into
from hcache.daemon.config_sources import ConfigError, ConfigSources, Resolved
from hcache.daemon.index import Index
from hcache.daemon.io_engine import open_engine
from hcache.daemon.notify import notify
from hcache.daemon.server import Server
from hcache.daemon.slabs import DataDir
from hcache.daemon.store import Store
from hcache.layout.units import format_size

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


def _reload(sources: ConfigSources, store: Store) -> None:
    """SIGHUP: read the config file again and apply what can change while running."""
    try:
        new = sources.resolve().config
    except ConfigError as e:
        log.error("SIGHUP: configuration not reloaded, the running one stays: %s", e)
        return
    changed, restart = reload_into(store.cfg, new)
    logs.set_level(store.cfg.log_level)
    for key, (old, value) in changed.items():
        shown = (format_size(old), format_size(value)) if key in ("capacity", "dir_capacity") else (old, value)
        log.info("SIGHUP: %s %s -> %s", key, *shown)
    if restart:
        log.warning("SIGHUP: %s changed but take effect only after a restart of hcached", ", ".join(restart))
    if not changed and not restart:
        log.info("SIGHUP: configuration unchanged")


async def serve(sources: ConfigSources, resolved: Resolved) -> None:
    """Run until SIGTERM or SIGINT, then flush everything committed and stop cleanly."""
    cfg = resolved.config
    lock = _lock_state_dir(cfg.state_dir)
    loop = asyncio.get_running_loop()
    index_path = cfg.state_dir / "index.sqlite"
    fresh_index = not index_path.exists()
    index = Index(index_path)
    dirs = [DataDir(i, p, cfg.slab_size) for i, p in enumerate(cfg.data_dirs)]
    for d in dirs:
        if not d.direct:
            log.warning("data dir %s refuses O_DIRECT (tmpfs?): using buffered IO + fdatasync there", d.path)
    if fresh_index and any(d.slabs() for d in dirs):
        log.warning("the index %s is new but the data dirs hold chunks: run 'hcachectl fsck --rebuild' before "
                    "saving anything to bring their contexts back", index_path)
    engine = await open_engine(cfg.io_engine, loop, str(cfg.data_dirs[0]))
    await _remove_stale_arenas(_arena_dir(cfg.state_dir))
    arena = Arena(cfg.dram, _arena_dir(cfg.state_dir))
    store = Store(cfg, arena, dirs, index, engine)
    server = Server(store, cfg.socket, cfg.tcp)
    metrics_server: asyncio.Server | None = None
    try:
        store.load()
        store.flusher.start()
        server.bind()
        if cfg.metrics:
            host, port = cfg.metrics.rsplit(":", 1)
            metrics_server = await metrics.serve(server.metrics, host, int(port))
            server.metrics_address = f"{host}:{metrics_server.sockets[0].getsockname()[1]}"
        stop = asyncio.Event()

        def on_stop() -> None:
            notify("STOPPING=1")
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_stop)
        loop.add_signal_handler(signal.SIGINT, on_stop)
        loop.add_signal_handler(signal.SIGHUP, _reload, sources, store)
        tasks = [loop.create_task(server.serve()), loop.create_task(server.expire_leases()),
                 loop.create_task(store.evictor.run())]
        log.info("hcached ready: engine=%s arena=%s (%d bytes) data dirs=%s capacity=%s", engine.name, arena.path,
                 arena.size, ", ".join(str(d.path) for d in dirs), format_size(store.space.capacity()))
        notify(f"READY=1\nSTATUS=serving {len(store.contexts)} contexts on {cfg.socket}")
        await stop.wait()
        log.info("stopping: flushing what was committed")
        for t in tasks:
            t.cancel()
        await store.close()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        await server.close()
        engine.close()
        for d in dirs:
            d.close()
        index.close()
        arena.close()
        os.close(lock)
    log.info("stopped")


def run(sources: ConfigSources, resolved: Resolved) -> None:
    logs.setup(resolved.config.log_level)
    if resolved.path is not None:
        log.info("configuration from %s", resolved.path)
    uvloop.run(serve(sources, resolved))
