"""Copies from the shared arena straight to a CUDA device: the arena page-locked, copies on a stream of their own."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("hcache.client")


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device for the whole process: device memory cached for one stream is reused only by
    that stream, so a stream per client would allocate afresh for every client's first restores."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class GpuCopier:
    """Page-locks (cudaHostRegister) one host mapping and DMAs pieces of it to GPU tensors on a copy stream."""

    def __init__(self, host: torch.Tensor, device: torch.device) -> None:
        self.host = host
        self.device = device
        self.stream = _copy_stream(device)
        with torch.cuda.device(device):
            err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
        self.registered = int(err) == 0
        if not self.registered:  # copies still work, but each one stages through a pageable bounce buffer
            log.warning("cudaHostRegister of the %d-byte arena failed (%s): restores to %s copy synchronously",
                        host.numel(), err, device)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A device tensor allocated on the copy stream, so its memory is never still in use by another stream."""
        with torch.cuda.stream(self.stream):
            return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, pieces: list[tuple[torch.Tensor, torch.Tensor]], after: torch.cuda.Event | None
             ) -> torch.cuda.Event:
        """Queue dst.copy_(src) for each (dst on the device, src a uint8 view of a host mapping) once `after` has
        happened; the returned event completes when all have landed. A strided src (chunks with their headers
        between them) crosses as one DMA of the bytes it spans, then is gathered on the device: one copy per
        chunk cost the restorer's thread more time than the copies took."""
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            for dst, src in pieces:
                if src.is_contiguous():
                    dst.copy_(src, non_blocking=True)
                    continue
                span = 1 + sum((size - 1) * stride for size, stride in zip(src.shape, src.stride(), strict=True))
                staged = torch.empty(span, dtype=torch.uint8, device=self.device)
                # The bytes src spans, of src's own mapping: a read leased before a restart of hcached copies
                # from the arena it was leased in.
                staged.copy_(src.as_strided((span,), (1,), src.storage_offset()), non_blocking=True)
                dst.copy_(staged.as_strided(src.shape, src.stride()))
            return self.stream.record_event()

    def close(self) -> None:
        self.stream.synchronize()
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self.registered = False
