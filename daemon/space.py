"""Disk space: each data dir's capacity and usage, whether a dir may grow, and freed slots made unreadable."""

import asyncio
import logging
import mmap
import os
from collections.abc import Awaitable, Callable

from hcache.daemon.config import Config
from hcache.daemon.io_engine import IoEngine, IoOp
from hcache.daemon.slabs import DataDir, SlotRef
from hcache.layout.chunks import HEADER_SIZE

log = logging.getLogger("hcache.daemon.space")


def fs_available(d: DataDir) -> int:
    st = os.statvfs(d.path)
    return st.f_bavail * st.f_frsize


async def _no_room(slot_size: int) -> bool:
    return False


class Space:
    """How many bytes hcached may keep on disk, how many it keeps, and giving slots back.

    Capacity bounds what slab files take (they are preallocated), so usage can never pass it. A data dir with no
    dir_capacity holds what it has plus what its file system has free; growth stops before the file system is full.
    """

    def __init__(self, cfg: Config, dirs: list[DataDir], engine: IoEngine) -> None:
        self.cfg = cfg
        self.dirs = dirs
        self.engine = engine
        self.make_room: Callable[[int], Awaitable[bool]] = _no_room  # set by the store: evict for a slot
        self._zeros = memoryview(mmap.mmap(-1, HEADER_SIZE))  # page aligned, as O_DIRECT wants
        self._tasks: set[asyncio.Task] = set()

    def dir_capacity(self, d: DataDir) -> int:
        limits = [d.allocated_bytes + fs_available(d), self.cfg.dir_capacity, self.cfg.capacity]
        return min(x for x in limits if x)

    def capacity(self) -> int:
        total = sum(self.dir_capacity(d) for d in self.dirs if d.healthy)
        return min(self.cfg.capacity, total) if self.cfg.capacity else total

    def used(self) -> int:
        return sum(d.used_bytes for d in self.dirs)

    def allocated(self) -> int:
        return sum(d.allocated_bytes for d in self.dirs)

    def free(self) -> int:
        return max(0, self.capacity() - self.used())

    def may_grow(self, d: DataDir, slot_size: int) -> bool:
        """Whether data dir d may add a slab file for this slot size within every limit."""
        growth = d.growth(slot_size)
        if self.cfg.dir_capacity and d.allocated_bytes + growth > self.cfg.dir_capacity:
            return False
        if self.cfg.capacity and self.allocated() + growth > self.cfg.capacity:
            return False
        return fs_available(d) >= growth

    async def release(self, slots: list[SlotRef]) -> None:
        """Zero each slot's header on disk, then make the slot free: a chunk whose context was deleted or
        evicted can never come back, not even from 'hcachectl fsck --rebuild'."""
        if not slots:
            return
        ops = [IoOp(self.dirs[s.dir].fd(s), self._zeros, self.dirs[s.dir].offset(s)) for s in slots]
        try:
            await self.engine.write(ops)
            await self.engine.fdatasync({op.fd for op in ops})
        except OSError as e:  # the slot is reused all the same; a later write there replaces the old header
            log.warning("could not erase the headers of %d freed chunks: %s", len(slots), e)
        for s in slots:
            self.dirs[s.dir].give_back(s)

    def discard(self, slots: list[SlotRef]) -> None:
        """release() in the background, for callers that must not wait."""
        task = asyncio.get_running_loop().create_task(self.release(slots))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks))
