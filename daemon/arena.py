"""The DRAM snapshot buffer: a pre-faulted shared-memory file that clients map, with a 4 KiB-page allocator."""

import bisect
import mmap
import os
import secrets
from pathlib import Path

PAGE = 4096
_PREFIX = "hcache-arena-"


def arena_owner(name: str) -> int | None:
    """The pid of the daemon that made an arena file of this name, or None if it is not one."""
    if not name.startswith(_PREFIX):
        return None
    pid = name[len(_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def _mode() -> int:
    """0600, or 0660 when the umask lets the group read and write (the unit's UMask=0007): clients of
    another user in hcached's group can then map the arena, as they can reach the 0660 socket."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o600 if umask & 0o060 else 0o660


class Arena:
    """A shm-backed mmap carved into page-aligned extents (first fit, coalescing free list)."""

    def __init__(self, size: int, directory: Path) -> None:
        self.size = size // PAGE * PAGE
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, _mode())
        try:
            os.ftruncate(fd, self.size)
            # MAP_POPULATE pre-faults every page now: first touch is slow and must not hit a save.
            self.map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        self.view = memoryview(self.map)
        self._starts: list[int] = [0]  # free extents, sorted by start, never adjacent
        self._lens: list[int] = [self.size]
        self.used = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free extent of nbytes (rounded up to pages), or None when none is large enough."""
        n = (nbytes + PAGE - 1) // PAGE * PAGE
        for i, length in enumerate(self._lens):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], self._lens[i]
                else:
                    self._starts[i] += n
                    self._lens[i] -= n
                self.used += n
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        n = (nbytes + PAGE - 1) // PAGE * PAGE
        i = bisect.bisect_left(self._starts, offset)
        merge_prev = i > 0 and self._starts[i - 1] + self._lens[i - 1] == offset
        merge_next = i < len(self._starts) and offset + n == self._starts[i]
        if merge_prev and merge_next:
            self._lens[i - 1] += n + self._lens[i]
            del self._starts[i], self._lens[i]
        elif merge_prev:
            self._lens[i - 1] += n
        elif merge_next:
            self._starts[i] = offset
            self._lens[i] += n
        else:
            self._starts.insert(i, offset)
            self._lens.insert(i, n)
        self.used -= n

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # an IO buffer still refers to it; the mapping goes with the process
