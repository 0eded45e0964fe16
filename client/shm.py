"""The client's view of the daemon's shared-memory arena, as one uint8 tensor (zero copy)."""

import mmap
import os

import torch


class ArenaMap:
    """Maps the arena file the daemon named in its hello reply."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path  # names this daemon's arena in lease requests
        fd = os.open(path, os.O_RDWR)
        try:
            # Page tables are per process: without MAP_POPULATE every 4 KiB of the first save or
            # restore through a page would take a fault in this process (measured: warm restores at
            # a third of memcpy speed).
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.array = self.bytes.numpy()  # the same bytes, for copies from the client's own thread

    def close(self) -> None:
        del self.bytes, self.array
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a zero-copy view; the mapping goes when it does
