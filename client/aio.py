"""AsyncHCacheClient: save and restore hidden states / K/V through hcached, zero copy over the shared arena."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from hcache.client.copies import as_array
from hcache.client.errors import BadRequest, ContextChanged, DaemonRestarted
from hcache.client.gpu import GpuCopier
from hcache.client.layout import TORCH_DTYPES, ContextInfo, PrefixMatch, rep_of, stream_bytes
from hcache.client.shm import ArenaMap
from hcache.client.transport import Transport
from hcache.layout.chunks import CHUNK_TOKENS, chunk_image_size, chunk_range, payload_runs
from hcache.layout.geometry import PASS_START, TOKEN_RECORD_BYTES, Geometry, Rep
from hcache.layout.paths import client_endpoint

T = TypeVar("T")
_LEASE_BYTES = 64 << 20
_READS_IN_FLIGHT = 3  # keeps the disks busy while earlier pieces are copied out
# Contexts whose description and length a client keeps, most recently used: a serving process meets millions over
# its life, and an append continues from the length its client last saw (an evicted one is asked for again).
_REMEMBERED = 1 << 16


class AsyncHCacheClient:
    """An asyncio client of hcached. Local (ipc) clients move data through the arena; tcp ones in frames."""

    def __init__(self, transport: Transport, hello: dict, namespace: str) -> None:
        self._t = transport
        self.namespace = namespace
        self.local = transport.endpoint.startswith("ipc://")
        self._remapping = asyncio.Lock()
        self._info: collections.OrderedDict[str, ContextInfo] = collections.OrderedDict()
        self._gpus: dict[torch.device, GpuCopier] = {}
        self._attach(hello)

    def _attach(self, hello: dict) -> None:
        """Take a daemon's hello: map its arena (a local client) and size leases to it."""
        for copier in self._gpus.values():
            copier.close()
        self._gpus.clear()
        self.daemon = hello
        # An arena mapped before is not closed: a read leased from its daemon may still copy from it; the mapping
        # goes with its last reference.
        self._arena = ArenaMap(hello["arena"], hello["arena_size"]) if self.local else None
        # Bytes one lease pins: small enough that the daemon writes (or reads) one piece while this
        # client copies the next, and leaves arena room for other clients.
        self._budget = min(hello["arena_size"] // (2 * _READS_IN_FLIGHT), _LEASE_BYTES)
        if self._arena is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            # A process on the GPU page-locks the arena now, not in its first restore's time to first token.
            self._copier(torch.device("cuda", torch.cuda.current_device()))

    def _copier(self, device: torch.device) -> GpuCopier:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._gpus:
            assert self._arena is not None
            self._gpus[device] = GpuCopier(self._arena.bytes, device)
        return self._gpus[device]

    @classmethod
    async def connect(cls, socket: str | None = None, *, namespace: str = "default",
                      timeout: float = 120.0, connect_timeout: float = 5.0) -> AsyncHCacheClient:
        """Connect to hcached at `socket` (a path or tcp:// URL), else $HCACHE_SOCKET, else the default."""
        transport = Transport(client_endpoint(socket), timeout, connect_timeout)
        try:
            hello, _ = await transport.call("hello", timeout=connect_timeout, pid=os.getpid())
            return cls(transport, hello, namespace)
        except BaseException:
            transport.close()
            raise

    async def close(self) -> None:
        for copier in self._gpus.values():
            copier.close()
        if self._arena is not None:
            self._arena.close()
        self._t.close()

    async def __aenter__(self) -> AsyncHCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether the client holds a connection to hcached now (a call without one waits connect_timeout)."""
        return self._t.connected

    async def _call(self, op: str, frames: list | None = None, **args: Any) -> tuple[dict, list]:
        return await self._t.call(op, frames, **args)

    async def _leased(self, arena: ArenaMap | None, op: str, **args: Any) -> tuple[dict, list]:
        """A call about arena space, naming the arena whose offsets its reply is applied to: a daemon started since
        refuses it (DaemonRestarted) rather than lease space in an arena this client does not map."""
        return await self._call(op, **({"arena": arena.path} if arena is not None else {}), **args)

    async def _in_arena(self, work: Callable[[ArenaMap | None], Awaitable[T]]) -> T:
        """work(the arena this client maps); if hcached restarted since, the daemon refused it before it took
        effect: hello again, map the new arena (once, however many calls found out) and do the work again."""
        arena = self._arena
        try:
            return await work(arena)
        except DaemonRestarted:
            async with self._remapping:
                if self._arena is arena:
                    self._attach((await self._call("hello", pid=os.getpid()))[0])
            return await work(self._arena)

    # -- contexts ---------------------------------------------------------------------------------
    async def open(self, ctx: str, *, model: str, geometry: Geometry,
                   layers: dict[str, Sequence[int]] | None = None, create: bool = True,
                   share: bool = True) -> ContextInfo:
        """Create (or open) a context saved by `model`; `layers` says which layers keep "hidden" and "kv"
        (default: hidden for every layer). Opening with a different model or geometry is refused. A new context
        with `share` (the default) shares its full chunks with every context of the model in this namespace whose
        tokens start the same way (the first writer's bits are kept), and is found by lookup(); share=False keeps
        its own bits, found by its id alone."""
        spec = {k: list(v) for k, v in (layers or {"hidden": range(geometry.num_layers)}).items()}
        reply, _ = await self._call("open", ns=self.namespace, ctx=ctx, model=model, geometry=geometry.to_dict(),
                                    layers=spec, create=create, share=share)
        return self._remember(reply)

    async def locate(self, model: str, token_ids: Sequence[int] | torch.Tensor) -> PrefixMatch:
        """The longest leading run of `token_ids` (whole 64-token chunks) that hcached holds for `model` in this
        namespace, over all contexts, and a context that holds it."""
        ids = torch.as_tensor(token_ids).reshape(-1)
        if ids.dtype.is_floating_point or (ids.numel() and (ids.min() < 0 or ids.max() >= 2**31)):
            raise BadRequest("token_ids must be non-negative integers below 2**31")
        tokens = ids.to(torch.int32).numpy().astype("<i4").tobytes()
        reply, _ = await self._call("lookup", ns=self.namespace, model=model, tokens=tokens)
        return PrefixMatch(reply["n_tokens"], reply["ctx"])

    async def lookup(self, model: str, token_ids: Sequence[int] | torch.Tensor) -> int:
        """How many leading tokens of `token_ids` hcached holds for `model` in this namespace (whole chunks)."""
        return (await self.locate(model, token_ids)).n_tokens

    async def fork(self, src: str, dst: str, n_tokens: int, *, share: bool = True, wait: bool = True
                   ) -> ContextInfo:
        """Make a new context `dst` of the first n_tokens of `src` without copying their chunks (a partial last
        chunk is copied once); share=False, or a `src` that does not share, makes it a copy with its own bits.
        Returns once `dst` is durable; wait=False returns at once (durable with the next flush of `dst`)."""
        reply, _ = await self._call("fork", ns=self.namespace, ctx=src, dst=dst, n=n_tokens, share=share, wait=wait)
        return self._remember(reply)

    async def truncate(self, ctx: str, n_tokens: int) -> ContextInfo:
        """Keep the first n_tokens of `ctx` and drop the rest; returns once it is durable."""
        reply, _ = await self._call("truncate", ns=self.namespace, ctx=ctx, n=n_tokens)
        return self._remember(reply)

    def _remember(self, reply: dict) -> ContextInfo:
        return self._note(ContextInfo.from_reply(reply))

    def _note(self, info: ContextInfo) -> ContextInfo:
        self._info[info.id] = info
        self._info.move_to_end(info.id)
        if len(self._info) > _REMEMBERED:
            self._info.popitem(last=False)
        return info

    async def stat(self, ctx: str, detail: bool = False) -> ContextInfo:
        """What hcached holds of `ctx`; with `detail`, where its chunks are too (`raw["placement"]`)."""
        reply, _ = await self._call("stat", ns=self.namespace, ctx=ctx, **({"detail": True} if detail else {}))
        return self._remember(reply)

    async def _known(self, ctx: str) -> ContextInfo:
        if ctx in self._info:
            return self._note(self._info[ctx])
        return await self.stat(ctx)

    async def list(self) -> list[ContextInfo]:
        reply, _ = await self._call("list", ns=self.namespace)
        return [ContextInfo.from_reply(r) for r in reply["contexts"]]

    async def delete(self, ctx: str) -> None:
        await self._call("delete", ns=self.namespace, ctx=ctx)
        self._info.pop(ctx, None)

    async def status(self) -> dict:
        reply, _ = await self._call("status")
        return reply

    async def flush(self, ctx: str | None = None, *, drop: bool = False) -> None:
        """Return once everything appended (to `ctx`, or to every context) is durable on disk; `drop` also frees
        the daemon's memory of it (chunks not leased), so that the next restores read the disk. ContextChanged if
        `ctx` ends short of where this client saw it end: hcached restarted and lost what was not yet durable."""
        args = {"ns": self.namespace, "ctx": ctx} if ctx is not None else {}
        reply, _ = await self._call("flush", drop=drop, **args)
        seen = self._info[ctx].n_tokens if ctx in self._info else 0
        durable = reply["durable"].get(f"{self.namespace}/{ctx}", seen)
        if durable < seen:
            raise ContextChanged(f"context {ctx!r} holds {durable} durable tokens, this client saw it hold "
                                 f"{seen}: hcached restarted and lost the rest, which was not yet durable; "
                                 "restore what it holds and append from its length")

    # -- saving -----------------------------------------------------------------------------------
    async def append(self, ctx: str, token_ids: Sequence[int] | torch.Tensor,
                     data: dict[str, torch.Tensor], passes: Sequence[int] | None = None) -> int:
        """Append tokens to a context with each stored layer's data for them: data["hidden"] is
        [hidden layers, T, hidden_size], data["kv"] is [kv layers, T, 2, n_kv_heads, head_dim], in the
        context's dtype and layer order. `passes`: the token counts of the model's forward passes that
        produced them (default: one pass), so restores can redo the arithmetic in the same pieces.
        Continues from where this client last saw the context end (open, stat or its own appends): ContextChanged
        if it ends elsewhere now. Returns the context's length. Not durable until flush()."""
        info = await self._known(ctx)
        ids = torch.as_tensor(token_ids).reshape(-1)
        n = ids.numel()
        if n == 0:
            raise BadRequest("append needs at least one token")
        if ids.dtype.is_floating_point or ids.min() < 0 or ids.max() >= 2**31:
            raise BadRequest("token_ids must be non-negative integers below 2**31")
        expected = {name for name, layers in info.layers.items() if layers}
        if set(data) != expected:
            raise BadRequest(f"context {ctx!r} stores {sorted(expected)}; append got {sorted(data)}")
        # Each stream's bytes as numpy [n, token bytes]: an append's Python work is per stream (a 7B model's 32
        # layers each), and a numpy view or slice costs a tenth of a torch one.
        per_stream: list[np.ndarray] = []
        for name in ("hidden", "kv"):
            if name in data:
                rep = rep_of(name)
                per_stream += list(as_array(stream_bytes(data[name], len(info.layers[name]), n,
                                                         info.token_bytes(rep), name)))
        per_stream.append(_encode_token_records(ids, passes).view(np.uint8))
        step = self._tokens_per_lease(info)
        for start in range(0, n, step):
            await self._append_piece(ctx, [s[start : start + step] for s in per_stream])
        return (await self._known(ctx)).n_tokens

    def _tokens_per_lease(self, info: ContextInfo) -> int:
        per_chunk = sum(chunk_image_size(info.token_bytes(rep)) for _, rep in info.streams)
        chunks = max(1, self._budget // per_chunk - 1)  # a piece may straddle one chunk boundary more
        return chunks * CHUNK_TOKENS

    async def _append_piece(self, ctx: str, pieces: list[np.ndarray]) -> None:
        """Append one piece where this client last saw the context end: after a restart of hcached, again in its
        new arena, unless the context no longer ends there (ContextChanged)."""
        n = pieces[0].shape[0]
        info = await self._known(ctx)
        at = info.n_tokens
        if not self.local:
            frames = [memoryview(np.ascontiguousarray(p)).cast("B") for p in pieces]
            reply, _ = await self._call("append", frames, ns=self.namespace, ctx=ctx, n=n, at=at, inline=True)
        else:
            reply = await self._in_arena(lambda arena: self._append_leased(arena, ctx, n, at, pieces))
        self._note(dataclasses.replace(info, n_tokens=reply["n_tokens"]))

    async def _append_leased(self, arena: ArenaMap, ctx: str, n: int, at: int, pieces: list[np.ndarray]) -> dict:
        lease, _ = await self._leased(arena, "append", ns=self.namespace, ctx=ctx, n=n, at=at)
        try:
            self._scatter(arena, lease, pieces)
        except BaseException:
            await self._leased(arena, "abort", lease=lease["lease"])
            raise
        reply, _ = await self._leased(arena, "commit", lease=lease["lease"])
        return reply

    @staticmethod
    def _scatter(arena_map: ArenaMap, lease: dict, pieces: list[np.ndarray]) -> None:
        """Copy each stream's tokens into its leased chunks: a memcpy per chunk, on this thread alone."""
        arena, start, end = arena_map.array, lease["start"], lease["end"]
        per_stream = len(chunk_range(start, end))
        for k, src in enumerate(pieces):
            flat = src.reshape(-1)  # a stream's tokens are contiguous
            for off, at, n in payload_runs(lease["offsets"][k * per_stream : (k + 1) * per_stream], start, end,
                                           src.shape[1]):
                arena[off : off + n] = flat[at : at + n]

    # -- restoring --------------------------------------------------------------------------------
    async def restore(self, ctx: str, rep: str, layers: Sequence[int] | None = None, start: int = 0,
                      end: int | None = None, out: torch.Tensor | None = None, *,
                      device: torch.device | str | None = None, after: torch.cuda.Event | None = None
                      ) -> torch.Tensor:
        """Read layers × tokens [start, end) of one representation into `out` (allocated on `device`, default the
        CPU, when None): [layers, T, hidden_size] for "hidden", [layers, T, 2, n_kv_heads, head_dim] for "kv".
        To a CUDA device, local clients DMA from the arena (page-locked) on a copy stream of their own, after
        `after` (default: an event recorded now on `out`'s current stream); it has landed when this returns."""
        info = await self._known(ctx)
        r = rep_of(rep)
        layers = list(info.layers.get(rep, [])) if layers is None else list(layers)
        missing = [layer for layer in layers if layer not in info.layers.get(rep, [])]
        if missing:
            raise BadRequest(f"context {ctx!r} does not store {rep} for layers {missing}; it stores {info.layers}")
        info = await self.stat(ctx) if end is None or end > info.n_tokens else info
        end = info.n_tokens if end is None else end
        shape = (len(layers), end - start, *info.item_shape(r))
        dtype = TORCH_DTYPES[info.geometry.dtype]
        target = torch.device(device) if device is not None else torch.device("cpu")
        if out is None and target.type == "cuda" and self.local:
            out = self._copier(target).empty(shape, dtype)
        elif out is None:
            out = torch.empty(shape, dtype=dtype, device=target)
        elif (tuple(out.shape) != shape or not out.is_contiguous() or out.device.type not in ("cpu", "cuda")
              or (device is not None and out.device.type != target.type)):
            raise BadRequest(f"out must be a contiguous CPU or CUDA tensor of shape {list(shape)}, got "
                             f"{list(out.shape)} on {out.device}")
        elif out.is_cuda and after is None:
            after = torch.cuda.current_stream(out.device).record_event()
        dst = out.view(torch.uint8).view(len(layers), end - start, info.token_bytes(r))
        await self._read_into(ctx, [(layer, r) for layer in layers], start, end, dst, after)
        return out

    async def tokens(self, ctx: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The context's token ids [start, end) as a LongTensor."""
        return (await self._token_records(ctx, start, end))[:, 0].to(torch.int64)

    async def tokens_and_passes(self, ctx: str, end: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Token ids [0, end) as a LongTensor, and the token counts of the forward passes that produced them."""
        records = await self._token_records(ctx, 0, end)
        flags = records[:, 1]
        starts = (flags & PASS_START).nonzero().reshape(-1).tolist()
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        passes = [b - a for a, b in zip(starts, [*starts[1:], flags.numel()], strict=True) if b > a]
        return records[:, 0].to(torch.int64), passes

    async def _token_records(self, ctx: str, start: int, end: int | None) -> torch.Tensor:
        info = await self.stat(ctx) if end is None else await self._known(ctx)
        end = info.n_tokens if end is None else end
        dst = torch.empty((1, end - start, TOKEN_RECORD_BYTES), dtype=torch.uint8)
        await self._read_into(ctx, [(info.geometry.num_layers, Rep.TOKENS)], start, end, dst)
        return dst.view(torch.int32).reshape(end - start, 2)

    async def _read_into(self, ctx: str, streams: list[tuple[int, Rep]], start: int, end: int,
                         dst: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """Read in groups of layers that fit the lease budget; the next group's read is in flight while
        this one is copied out (to a CUDA `dst`: once `after` has happened). After a restart of hcached, all
        of it again from its new arena."""
        if end <= start or not streams:
            return
        await self._in_arena(lambda arena: self._read_leased(arena, ctx, streams, start, end, dst, after))

    async def _read_leased(self, arena: ArenaMap | None, ctx: str, streams: list[tuple[int, Rep]], start: int,
                           end: int, dst: torch.Tensor, after: torch.cuda.Event | None) -> None:
        image = chunk_image_size(dst.shape[2])
        chunks_per_stream = max(1, self._budget // image)  # a window one stream's lease can hold
        window = max(CHUNK_TOKENS, (chunks_per_stream - 1) * CHUNK_TOKENS)
        items = []  # (first stream, last stream + 1, token start, token end): one read lease each
        for t0 in range(start, end, window):
            t1 = min(end, (t0 // CHUNK_TOKENS) * CHUNK_TOKENS + window)
            per_group = max(1, self._budget // (image * len(chunk_range(t0, t1))))
            items += [(g, min(g + per_group, len(streams)), t0, t1) for g in range(0, len(streams), per_group)]
        releases: list[asyncio.Task] = []

        def request(item: tuple[int, int, int, int]) -> asyncio.Future:
            g0, g1, t0, t1 = item
            return asyncio.ensure_future(self._leased(
                arena, "read", ns=self.namespace, ctx=ctx, streams=[[layer, int(rep)] for layer, rep in streams[g0:g1]],
                start=t0, end=t1, inline=not self.local))

        inflight = collections.deque(request(item) for item in items[:_READS_IN_FLIGHT])
        try:
            for i, (g0, g1, t0, t1) in enumerate(items):
                reply, frames = await inflight.popleft()
                if i + _READS_IN_FLIGHT < len(items):
                    inflight.append(request(items[i + _READS_IN_FLIGHT]))
                part = dst[g0:g1, t0 - start : t1 - start]
                if arena is not None and part.is_cuda:
                    landed = self._copier(part.device).copy(self._pieces(arena, reply["offsets"], t0, t1, part),
                                                            after)
                    after = None  # later copies queue behind this one on the same stream
                    releases.append(asyncio.ensure_future(self._release(arena, reply["lease"], landed)))
                elif arena is not None:
                    for dst_part, arena_part in self._pieces(arena, reply["offsets"], t0, t1, part):
                        dst_part.copy_(arena_part)
                    releases.append(asyncio.ensure_future(self._release(arena, reply["lease"])))
                else:
                    for k, frame in enumerate(frames):
                        part[k].copy_(torch.frombuffer(frame.buffer, dtype=torch.uint8).view(t1 - t0, -1))
        finally:
            for fut in inflight:
                fut.cancel()
            await asyncio.gather(*releases)

    @staticmethod
    def _pieces(arena: ArenaMap, offsets: list[int], start: int, end: int, dst: torch.Tensor
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(part of dst, arena view of the same shape) pairs for tokens [start, end) of dst's streams."""
        per_stream = len(chunk_range(start, end))
        out = []
        for k in range(dst.shape[0]):
            chunk_offsets = offsets[k * per_stream : (k + 1) * per_stream]
            for arena_part, t, n in _runs(arena.bytes, chunk_offsets, start, end, dst.shape[2]):
                out.append((dst[k, t : t + n].view(arena_part.shape), arena_part))
        return out

    async def _release(self, arena: ArenaMap, lease: int, landed: torch.cuda.Event | None = None) -> None:
        """Give a read lease back (once its copy to a GPU has landed); one of a daemon since restarted went with
        it."""
        if landed is not None:
            await asyncio.get_running_loop().run_in_executor(None, landed.synchronize)
        try:
            await self._leased(arena, "release", lease=lease)
        except DaemonRestarted:
            pass


def _runs(arena: torch.Tensor, chunk_offsets: list[int], start: int, end: int,
          tb: int) -> list[tuple[torch.Tensor, int, int]]:
    """Views of the arena's bytes for tokens [start, end) of one stream, as (view, first token, count): consecutive
    full chunks that lie one image apart merge into one strided view, so one copy moves many chunks (a copy per
    64-token chunk spent most of its time starting and stopping OpenMP threads)."""
    image, full = chunk_image_size(tb), CHUNK_TOKENS * tb
    runs: list[list[int]] = []  # [arena offset, first byte, bytes, chunks merged (0: a partial chunk)]
    for off, at, n in payload_runs(chunk_offsets, start, end, tb):
        prev = runs[-1] if runs else None
        if n == full and prev is not None and prev[3] and prev[0] + prev[3] * image == off:
            prev[2] += n
            prev[3] += 1
        else:
            runs.append([off, at, n, 1 if n == full else 0])
    views = []
    for off, at, n, merged in runs:
        if merged > 1:
            view = arena.as_strided((merged, CHUNK_TOKENS, tb), (image, tb, 1), off)
        else:
            view = arena[off : off + n].view(n // tb, tb)
        views.append((view, at // tb, n // tb))
    return views


def _encode_token_records(ids: torch.Tensor, passes: Sequence[int] | None) -> np.ndarray:
    """[n, 2] int32: each token's id and flags (PASS_START where a forward pass began)."""
    n = ids.numel()
    passes = [n] if passes is None else list(passes)
    if sum(passes) != n or any(p <= 0 for p in passes):
        raise BadRequest(f"passes {passes} must be positive token counts adding up to the {n} tokens appended")
    records = np.zeros((n, 2), dtype=np.int32)
    records[:, 0] = ids.cpu().numpy()
    records[np.cumsum([0, *passes[:-1]]), 1] = PASS_START
    return records
