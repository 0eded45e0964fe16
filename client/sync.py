"""HCacheClient: the blocking client, running an AsyncHCacheClient on a private event-loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from hcache.client.aio import AsyncHCacheClient
from hcache.client.errors import HCacheError
from hcache.client.layout import ContextInfo, PrefixMatch
from hcache.layout.geometry import Geometry

T = TypeVar("T")


class HCacheClient:
    """Blocking client of hcached; with no arguments it connects to $HCACHE_SOCKET or the default socket."""

    def __init__(self, socket: str | None = None, *, namespace: str = "default", timeout: float = 120.0,
                 connect_timeout: float = 5.0) -> None:
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hcache-client", daemon=True)
        self._thread.start()
        try:
            self._aio: AsyncHCacheClient = self._run(AsyncHCacheClient.connect(
                socket, namespace=namespace, timeout=timeout, connect_timeout=connect_timeout))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._submit(coro).result()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if os.getpid() != self._pid:  # the loop's thread and ZeroMQ's stayed in the parent: a call would hang
            coro.close()
            raise HCacheError(f"this HCacheClient was made in process {self._pid}, before a fork: make one in each "
                              "process that uses hcached")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def namespace(self) -> str:
        return self._aio.namespace

    @property
    def daemon(self) -> dict:
        return self._aio.daemon

    @property
    def connected(self) -> bool:
        """Whether the client holds a connection to hcached now (a call without one waits connect_timeout)."""
        return self._aio.connected

    def close(self) -> None:
        if self._loop.is_closed() or os.getpid() != self._pid:  # after a fork, the parent's to close
            return
        self._run(self._aio.close())
        self._stop_loop()

    def __enter__(self) -> HCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, ctx: str, *, model: str, geometry: Geometry, layers: dict[str, Sequence[int]] | None = None,
             create: bool = True, share: bool = True) -> ContextInfo:
        return self._run(self._aio.open(ctx, model=model, geometry=geometry, layers=layers, create=create,
                                        share=share))

    def lookup(self, model: str, token_ids: Sequence[int] | torch.Tensor) -> int:
        """How many leading tokens of `token_ids` hcached holds for model fingerprint `model` (whole chunks)."""
        return self._run(self._aio.lookup(model, token_ids))

    def locate(self, model: str, token_ids: Sequence[int] | torch.Tensor) -> PrefixMatch:
        """lookup(), and a context that holds those tokens."""
        return self._run(self._aio.locate(model, token_ids))

    def fork(self, src: str, dst: str, n_tokens: int, *, share: bool = True, wait: bool = True) -> ContextInfo:
        return self._run(self._aio.fork(src, dst, n_tokens, share=share, wait=wait))

    def truncate(self, ctx: str, n_tokens: int) -> ContextInfo:
        return self._run(self._aio.truncate(ctx, n_tokens))

    def append(self, ctx: str, token_ids: Sequence[int] | torch.Tensor, data: dict[str, torch.Tensor],
               passes: Sequence[int] | None = None) -> int:
        return self._run(self._aio.append(ctx, token_ids, data, passes))

    def flush(self, ctx: str | None = None, *, drop: bool = False) -> None:
        self._run(self._aio.flush(ctx, drop=drop))

    def restore(self, ctx: str, rep: str, layers: Sequence[int] | None = None, start: int = 0,
                end: int | None = None, out: torch.Tensor | None = None, *,
                device: torch.device | str | None = None) -> torch.Tensor:
        return self.restore_future(ctx, rep, layers, start, end, out, device=device).result()

    def restore_future(self, ctx: str, rep: str, layers: Sequence[int] | None = None, start: int = 0,
                       end: int | None = None, out: torch.Tensor | None = None, *,
                       device: torch.device | str | None = None) -> concurrent.futures.Future:
        """Start a restore and return at once; the Future's result is the filled tensor. Lets a caller
        compute on earlier layers while later ones are still being read. A CUDA `out` is written once the
        work queued so far on this thread's current stream is done."""
        after = torch.cuda.current_stream(out.device).record_event() if out is not None and out.is_cuda else None
        return self._submit(self._aio.restore(ctx, rep, layers, start, end, out, device=device, after=after))

    def tokens(self, ctx: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self._run(self._aio.tokens(ctx, start, end))

    def tokens_and_passes(self, ctx: str, end: int | None = None) -> tuple[torch.Tensor, list[int]]:
        return self._run(self._aio.tokens_and_passes(ctx, end))

    def stat(self, ctx: str, detail: bool = False) -> ContextInfo:
        """What hcached holds of `ctx`; with `detail`, where its chunks are too (`raw["placement"]`)."""
        return self._run(self._aio.stat(ctx, detail))

    def list(self) -> list[ContextInfo]:
        return self._run(self._aio.list())

    def delete(self, ctx: str) -> None:
        self._run(self._aio.delete(ctx))

    def status(self) -> dict:
        return self._run(self._aio.status())
