"""Preallocated slab files per data dir, one slot size per file, with a free-slot map that reuses freed space."""

import asyncio
import errno
import heapq
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("hcache.daemon.slabs")


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where one chunk image lives on disk."""

    dir: int
    slot_size: int
    file: int
    slot: int


@dataclass(slots=True)
class _SlabClass:
    slot_size: int
    slots_per_file: int
    fds: list[int] = field(default_factory=list)
    free: set[tuple[int, int]] = field(default_factory=set)
    order: list[tuple[int, int]] = field(default_factory=list)  # heap over free; may hold stale entries
    growing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def add_file(self, n: int) -> None:
        new = [(n, s) for s in range(self.slots_per_file)]
        self.free.update(new)
        self.order.extend(new)  # slots of a new file sort after every existing one: still a heap


def probe_direct(path: Path) -> bool:
    """Whether this directory's file system takes O_DIRECT (tmpfs does not)."""
    probe = path / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        buf = mmap.mmap(-1, 4096)
        try:
            os.pwritev(fd, [buf], 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        finally:
            buf.close()
        return True
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class DataDir:
    """One data dir (one SSD): slab files under slabs/<slot size>/<n>.slab."""

    def __init__(self, number: int, path: Path, slab_size: int) -> None:
        self.number = number
        self.path = path
        self.slab_size = slab_size
        path.mkdir(parents=True, exist_ok=True)
        self.direct = probe_direct(path)
        self.healthy = True
        self.error = ""
        self.errors = 0  # IO errors and corrupt chunks seen here since start
        self._classes: dict[int, _SlabClass] = {}
        self._open_existing()

    @property
    def allocated_bytes(self) -> int:
        return sum(len(c.fds) * c.slots_per_file * c.slot_size for c in self._classes.values())

    @property
    def used_bytes(self) -> int:
        return sum((len(c.fds) * c.slots_per_file - len(c.free)) * c.slot_size for c in self._classes.values())

    def _class(self, slot_size: int) -> _SlabClass:
        cls = self._classes.get(slot_size)
        if cls is None:
            cls = self._classes[slot_size] = _SlabClass(slot_size, max(1, self.slab_size // slot_size))
            (self.path / "slabs" / str(slot_size)).mkdir(parents=True, exist_ok=True)
        return cls

    def _open_flags(self) -> int:
        return os.O_RDWR | (os.O_DIRECT if self.direct else 0)

    def _open_existing(self) -> None:
        root = self.path / "slabs"
        if not root.is_dir():
            return
        for class_dir in sorted(root.iterdir(), key=lambda p: p.name):
            if not class_dir.name.isdigit():
                continue
            cls = self._class(int(class_dir.name))
            n = 0
            while (class_dir / f"{n}.slab").exists():
                cls.fds.append(os.open(class_dir / f"{n}.slab", self._open_flags()))
                cls.add_file(n)
                n += 1

    def growth(self, slot_size: int) -> int:
        """Bytes one more slab file of this slot size takes."""
        return max(1, self.slab_size // slot_size) * slot_size

    def free_all(self) -> None:
        """Every slot of every slab file free again (before the index is rebuilt and marks what is used)."""
        for cls in self._classes.values():
            cls.free.clear()
            cls.order.clear()
            for n in range(len(cls.fds)):
                cls.add_file(n)

    def slabs(self) -> list[tuple[int, int, Path]]:
        """(slot size, file number, path) of every slab file."""
        return [(size, n, self.path / "slabs" / str(size) / f"{n}.slab")
                for size, cls in sorted(self._classes.items()) for n in range(len(cls.fds))]

    def holds(self, slot_size: int) -> bool:
        """Whether slab files of this slot size exist here (so freeing slots can make room for one)."""
        cls = self._classes.get(slot_size)
        return cls is not None and bool(cls.fds)

    def slots_per_file(self, slot_size: int) -> int:
        return self._classes[slot_size].slots_per_file

    def mark_used(self, ref: SlotRef) -> None:
        """At start-up: a slot the index says is taken."""
        self._class(ref.slot_size).free.discard((ref.file, ref.slot))

    def fd(self, ref: SlotRef) -> int:
        return self._classes[ref.slot_size].fds[ref.file]

    def take(self, slot_size: int) -> SlotRef | None:
        """A free slot of this size, or None when the existing slab files are full."""
        cls = self._class(slot_size)
        if not cls.free:
            return None
        while True:  # lowest free slot first keeps writes near each other
            file, slot = heapq.heappop(cls.order)
            if (file, slot) in cls.free:
                cls.free.remove((file, slot))
                return SlotRef(self.number, slot_size, file, slot)

    async def grow(self, slot_size: int) -> None:
        """Add one preallocated slab file for this slot size (fallocate runs off the loop)."""
        cls = self._class(slot_size)
        async with cls.growing:
            if not cls.free:
                await self._grow(cls)

    async def _grow(self, cls: _SlabClass) -> None:
        slot_size = cls.slot_size
        n = len(cls.fds)
        path = self.path / "slabs" / str(slot_size) / f"{n}.slab"
        size = cls.slots_per_file * slot_size

        def create() -> int:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new file's directory entry must survive a crash too
            finally:
                os.close(dfd)
            return os.open(path, self._open_flags())

        fd = await asyncio.get_running_loop().run_in_executor(None, create)
        cls.fds.append(fd)
        cls.add_file(n)
        log.info("data dir %s: new slab %s (%d slots of %d bytes)", self.path, path.name, cls.slots_per_file,
                 slot_size)

    def give_back(self, ref: SlotRef) -> None:
        cls = self._classes[ref.slot_size]
        cls.free.add((ref.file, ref.slot))
        heapq.heappush(cls.order, (ref.file, ref.slot))

    def offset(self, ref: SlotRef) -> int:
        return ref.slot * ref.slot_size

    def close(self) -> None:
        for cls in self._classes.values():
            for fd in cls.fds:
                os.close(fd)
            cls.fds.clear()
