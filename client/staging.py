"""Host buffers capture reuses from one decode step and append to the next: fresh memory costs a page fault per
4 KiB, more than the copy into it (on this VM the faults took three times the CPU of the copies)."""

from __future__ import annotations

import math
import threading

import torch

_SMALLEST = 1 << 16


class StagingPool:
    """Free host buffers in power-of-two sizes, shared by the capture blocks of a process, bounded in total size."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._kept = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, taken: list[torch.Tensor]) -> torch.Tensor:
        """A tensor of this shape and dtype over a pooled buffer, which joins `taken` until given back (a small one
        is not pooled)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < _SMALLEST:  # malloc serves these from heap memory freed before: no faults to save
            return _fresh(shape, dtype)
        size = 1 << (nbytes - 1).bit_length()
        if size > self.keep_bytes:  # never kept: no rounding up
            size = nbytes
        with self._lock:
            bucket = self._free.get(size)
            buf = bucket.pop() if bucket else None
            if buf is not None:
                self._kept -= size
        if buf is None:
            buf = _fresh((size,), torch.uint8)
        taken.append(buf)
        return buf[:nbytes].view(dtype).view(shape)

    def give(self, taken: list[torch.Tensor]) -> None:
        """Return buffers once nothing reads the tensors over them; those beyond keep_bytes are freed."""
        with self._lock:
            for buf in taken:
                if self._kept + buf.numel() <= self.keep_bytes:
                    self._free.setdefault(buf.numel(), []).append(buf)
                    self._kept += buf.numel()
        taken.clear()


def _fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new host tensor, writable in and out of inference mode."""
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype)
