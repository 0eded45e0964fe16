"""capture(): stream the input hidden states (and K/V) of every token a model processes into a context."""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, StaticLayer

from hcache.client.copies import cat_into
from hcache.client.errors import BadRequest, ContextChanged, DaemonUnreachable, HCacheError, UnknownContext
from hcache.client.layout import ContextInfo, Origin
from hcache.client.staging import StagingPool
from hcache.client.sync import HCacheClient
from hcache.layout.geometry import Rep

STORE_CHOICES = ("plan", "hidden", "kv", "both")
log = logging.getLogger("hcache.client")


# Held-back passes are bounded in host memory and in age; leaving the block sends the rest. An append costs the
# client and the daemon about a millisecond of CPU each besides its bytes, once per context: at batch 8 and 5 s
# that was a third of capture's CPU per decode step on the VM's 2 cores.
_BATCH_BYTES = 32 << 20
_MAX_DELAY_S = 15.0
# Host memory for a held-back batch's passes on a CPU and for the passes joined, each twice while the model goes on.
_STAGING = StagingPool(keep_bytes=4 * _BATCH_BYTES)
Key = str | tuple  # of a pass's tensors: "ids", "mask", ("hidden", layers), ("kv", layers), ("kv", layers, row)


def _rows_major(key: Key, t: torch.Tensor) -> torch.Tensor:
    """A view of a pass's tensor in the order a context stores it: [layers, B, t, ...] for the layer data of all rows
    (keys and values are captured as [2 * layers, B, n_kv, t, head_dim], each layer's keys then its values, and seen
    as [layers, B, t, 2, n_kv, head_dim]), [layers, t, ...] for one row's, [B, t] for ids and mask."""
    if isinstance(key, tuple) and key[0] == "kv" and len(key) == 2:
        layers2, b, n_kv, n, hd = t.shape
        return t.view(layers2 // 2, 2, b, n_kv, n, hd).permute(0, 2, 4, 1, 3, 5)
    return t


def _token_dim(key: Key) -> int:
    """The axis of _rows_major's view that holds the tokens."""
    return 2 if isinstance(key, tuple) and len(key) == 2 else 1


def _row_data(host: dict[Key, torch.Tensor], key: Key, row: int) -> torch.Tensor:
    """One row's [layers, t, ...] out of the rows-major tensors of its passes: a view."""
    return host[key] if len(key) == 3 else host[key][:, row]  # a row's own K/V, or its row of the stack


@dataclass
class _Row:
    """One batch row of a forward pass: its context, and the key of each stored layer's data ("hidden", "kv") among
    the pass's tensors."""

    ctx: str
    row: int
    select: dict[str, Key]


class _Pass:
    """The tensors one forward pass captured for all batch rows, left on the model's device until the sender copies
    them to the host: a decode step never waits for a copy, nor allocates page-locked memory."""

    def __init__(self, tensors: dict[Key, torch.Tensor], rows: list[_Row], nbytes: int,
                 staged: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.staged = staged  # pooled buffers under the tensors, on a CPU
        self.rows = rows
        self.nbytes = nbytes  # at most; padding is dropped only on the host
        first = next(iter(tensors.values()))
        self.ready = torch.cuda.current_stream(first.device).record_event() if first.is_cuda else None
        self.tokens = first.shape[1]  # ids come first

    def keep_first(self, kept: int) -> torch.Tensor | int:
        """Leave the pass's tokens from `kept` on out, as padding is (the sender keeps what the mask marks); how
        many of them each row had kept."""
        ids, mask = self.tensors["ids"], self.tensors.get("mask")
        keep = torch.arange(self.tokens, device=ids.device) < kept
        self.tensors["mask"] = keep.expand(ids.shape) if mask is None else mask & keep
        if self.ready is not None:  # the mask above comes after the event the sender waits for
            self.ready = torch.cuda.current_stream(ids.device).record_event()
        return self.tokens - kept if mask is None else mask[:, kept:].sum(1)

    def joins(self, other: _Pass) -> bool:
        """Whether `other` holds the same tensors but for its tokens, so the two can be picked from as one: the
        batch, its contexts and what they store are the block's, so the same keys mean the same shapes."""
        return self.tensors.keys() == other.tensors.keys()


@dataclass(frozen=True)
class _Stored:
    """What one context keeps, worked out once when the block first sees it."""

    info: ContextInfo  # as opened: n_tokens is the context's length before the block
    hidden: tuple[int, ...]  # layers, also the key part of their stack
    kv: tuple[int, ...]
    token_bytes: int  # per token, over both

    @classmethod
    def of(cls, info: ContextInfo) -> _Stored:
        hidden, kv = (tuple(info.layers.get(name, ())) for name in ("hidden", "kv"))
        return cls(info, hidden, kv, len(hidden) * info.token_bytes(Rep.HIDDEN) + len(kv) * info.token_bytes(Rep.KV))


@dataclass
class _Piece:
    """One row's kept tokens over a run of passes, their data, and how many tokens each pass kept."""

    ids: torch.Tensor
    data: dict[str, torch.Tensor]
    passes: list[int]


@dataclass
class _Overlap:
    """Tokens [start, end) a context already holds that the model processes again in the block (a conversation
    prefilled anew rather than restored): checked against the stored ones, and not saved twice; where they differ,
    the context is cut back to what they have in common."""

    start: int
    end: int
    stored: torch.Tensor | None = None  # those not met yet, once read

    def take(self, client: HCacheClient, ctx: str, ids: torch.Tensor) -> int:
        """How many of `ids`, the next tokens of the context's row, are the context's own. At the first that differs
        (an edited or regenerated turn) the context is truncated there: it keeps the common prefix, and the rest of
        `ids` is appended after it."""
        if self.stored is None:
            self.stored = client.tokens(ctx, self.start, self.end)
        n = min(len(ids), len(self.stored))
        differs = (ids[:n] != self.stored[:n]).nonzero()
        if len(differs):
            n = int(differs[0])
            at = self.end - len(self.stored) + n
            log.info("context %s differs from the conversation at token %d of %d: truncated there", ctx, at,
                     self.end)
            client.truncate(ctx, at)
            self.stored = self.stored[:0]
            return n
        self.stored = self.stored[n:]
        return n

    @property
    def done(self) -> bool:
        return self.stored is not None and len(self.stored) == 0


def _without_first(ids: torch.Tensor, data: dict[str, torch.Tensor], passes: list[int], n: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    """A row's tokens, their data and passes, less the first n tokens: a pass cut in two keeps its rest."""
    rest = []
    for tokens in passes:
        if n < tokens:
            rest.append(tokens - n)
        n = max(n - tokens, 0)
    return ids[len(ids) - sum(rest):], {k: v[:, v.shape[1] - sum(rest):] for k, v in data.items()}, rest


@dataclass
class _Held:
    """The latest pass, kept from the sender until the model's cache shows how many of its tokens it keeps:
    assisted and prompt-lookup decoding verify candidate tokens in one pass, then crop the cache to those
    accepted."""

    pass_: _Pass
    cache: Cache  # the model's cache after the pass
    past: int  # its length before the pass


@dataclass
class CaptureStats:
    """What a capture block has cost so far: the forward passes it captured, the seconds its hooks took inside them
    (on the decode's path), and the CPU seconds its sender thread used off that path (joining passes, picking rows,
    appending; counted once a batch of passes is sent)."""

    passes: int = 0
    hook_s: float = 0.0
    send_cpu_s: float = 0.0


@dataclass
class _Sender:
    """Appends captured passes from a thread of its own, so a decode step never waits on the daemon. Passes are
    held back until they are worth an append or have waited long enough: one append per decode step kept the
    daemon and this thread busy on the cores the model decodes on. The hook only queues a pass; it wakes this
    thread once enough bytes are held back, so a decode step does not hand the interpreter to it every time."""

    client: HCacheClient
    device: torch.device
    stats: CaptureStats
    passes: collections.deque = field(default_factory=collections.deque)
    overlaps: dict[str, _Overlap] = field(default_factory=dict)  # by context, until the model is past them
    wake: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    error: BaseException | None = None
    thread: threading.Thread | None = None
    stream: torch.cuda.Stream | None = None
    _unwoken: int = 0  # bytes queued since the last wake-up

    def start(self) -> None:
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        self.thread = threading.Thread(target=self._run, name="hcache-capture", daemon=True)
        self.thread.start()

    def put(self, pass_: _Pass) -> None:
        """From the model's thread: queue a pass."""
        self.passes.append(pass_)
        self._unwoken += pass_.nbytes
        if self._unwoken >= _BATCH_BYTES:
            self._unwoken = 0
            self.wake.put(True)

    def drain(self) -> None:
        """From the model's thread: wait until every pass queued is appended (or the sender has failed)."""
        done = threading.Event()
        self.wake.put(done)
        done.wait()

    def _run(self) -> None:
        # Waking at least every _MAX_DELAY_S bounds how long a queued pass waits. Woken with True (bytes are
        # waiting), an Event (set once what is queued is appended) or False (the block ends).
        woken: bool | threading.Event = True
        while woken is not False:
            try:
                woken = self.wake.get(timeout=_MAX_DELAY_S)
            except queue.Empty:
                woken = True
            taken = [self.passes.popleft() for _ in range(len(self.passes))]
            if taken and self.error is None:
                try:
                    self._append(taken)
                except BaseException as e:  # raised to the caller when the capture block ends
                    self.error = e
                self.stats.send_cpu_s = time.thread_time()
            if isinstance(woken, threading.Event):
                woken.set()

    def _append(self, passes: list[_Pass]) -> None:
        runs = [[passes[0]]]
        for p in passes[1:]:
            if runs[-1][0].joins(p):
                runs[-1].append(p)
            else:
                runs.append([p])
        by_ctx: dict[str, list[_Piece]] = {}
        staged = [buf for p in passes for buf in p.staged]  # given back once the appends have copied them
        try:
            for run in runs:
                for ctx, piece in self._pieces(run, staged):
                    by_ctx.setdefault(ctx, []).append(piece)
            for ctx, pieces in by_ctx.items():
                if len(pieces) == 1:
                    ids, data = pieces[0].ids, pieces[0].data
                else:
                    ids = torch.cat([p.ids for p in pieces])
                    data = {k: torch.cat([p.data[k] for p in pieces], dim=1) for k in pieces[0].data}
                passes = [n for p in pieces for n in p.passes]
                if overlap := self.overlaps.get(ctx):
                    ids, data, passes = _without_first(ids, data, passes, overlap.take(self.client, ctx, ids))
                    if overlap.done:
                        del self.overlaps[ctx]
                if passes:
                    self.client.append(ctx, ids, data, passes=passes)
        finally:
            _STAGING.give(staged)

    def _pieces(self, run: list[_Pass], staged: list[torch.Tensor]) -> Iterator[tuple[str, _Piece]]:
        """Each row's kept tokens and data over a run of passes alike, picked from their tensors joined once on the
        host, with each row's tokens together."""
        host = _joined(run, self.stream, staged)
        for p in run:
            p.tensors = {}  # device memory goes back once the pass is on the host
        lengths = [p.tokens for p in run]
        mask = host.get("mask")
        if mask is None:
            kept_per_pass = [lengths] * len(run[0].rows)
        else:  # tokens each pass kept per row: differences of the mask's running count at the passes' ends
            ends = torch.tensor(lengths).cumsum(0) - 1
            counts = mask.cumsum(1, dtype=torch.long)[:, ends]
            kept_per_pass = torch.diff(counts, dim=1, prepend=torch.zeros_like(counts[:, :1])).tolist()
        for row, kept in zip(run[0].rows, kept_per_pass, strict=True):
            if not any(kept):  # rows of padding only add nothing
                continue
            keep = mask[row.row] if mask is not None and kept != lengths else slice(None)
            data = {name: _row_data(host, key, row.row)[:, keep] for name, key in row.select.items()}
            yield row.ctx, _Piece(host["ids"][row.row, keep], data, [k for k in kept if k])

    def close(self) -> None:
        self.wake.put(False)
        if self.thread is not None:
            self.thread.join()


def _joined(run: list[_Pass], stream: torch.cuda.Stream | None, staged: list[torch.Tensor]) -> dict[Key, torch.Tensor]:
    """Each of a run's tensors, the passes joined along their tokens in rows-major order, on the host. On a CPU into
    pooled buffers (joining `staged`); from a GPU joined there on `stream` (the sender's) after the passes' kernels,
    then one DMA each into page-locked memory: no host copy nor page fault of the sender's own."""
    keys = run[0].tensors.keys()
    if run[0].ready is None:
        host = {}
        for k in keys:
            parts, dim = [_rows_major(k, p.tensors[k]) for p in run], _token_dim(k)
            if len(parts) == 1:
                host[k] = parts[0]
            elif isinstance(k, str):  # ids, mask: a few bytes a token
                host[k] = torch.cat(parts, dim)
            else:
                shape = parts[0].shape[:dim] + (sum(p.shape[dim] for p in parts),) + parts[0].shape[dim + 1 :]
                host[k] = cat_into(parts, dim, _STAGING.take(shape, parts[0].dtype, staged))
        return host
    with torch.cuda.stream(stream):
        for p in run:
            stream.wait_event(p.ready)
        host = {}
        for k in keys:
            joined = torch.cat([_rows_major(k, p.tensors[k]) for p in run], _token_dim(k))
            host[k] = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True).copy_(joined, non_blocking=True)
    stream.synchronize()
    return host


def _generating_rows() -> torch.Tensor | None:
    """The rows generate() is still generating, [B] of 0/1, when the current forward pass runs in its decoding loop.
    A row that has finished (its end-of-sequence token, a stop string) is fed its last token and then padding, under
    an attention mask of ones, until every row has: none of it is the row's conversation. generate() keeps which rows
    finished only in a local of that loop."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_sample" and frame.f_globals.get("__name__") == "transformers.generation.utils":
            rows = frame.f_locals.get("unfinished_sequences")
            return rows if isinstance(rows, torch.Tensor) else None
        frame = frame.f_back
    return None


def _stack(parts: list[torch.Tensor], staged: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, on a CPU into a pooled buffer (joining `staged`)."""
    if parts[0].is_cuda:
        return torch.stack(parts)
    return torch.stack(parts, out=_STAGING.take((len(parts), *parts[0].shape), parts[0].dtype, staged))


class _Capture:
    """Hooks on a model's decoder layers collecting each forward's layer inputs."""

    def __init__(self, model: torch.nn.Module, client: HCacheClient, ctxs: list[str], store: str,
                 model_id: str | None, share: bool) -> None:
        from hcache.client.projection import Projector, fingerprint, geometry_of

        self.model = model
        self.client = client
        self.ctxs = ctxs
        self.store = store
        self.share = share
        self.project = Projector(model)  # for K/V a sliding-window cache no longer holds
        self.layers = self.project.layers
        devices = sorted({str(d) for d in self.project.devices})
        if len(devices) > 1:  # a pass's layer inputs are stacked on one device, and its copy waits on one stream
            raise BadRequest(f"capture needs the model's decoder layers on one device; they are on {devices}: load "
                             "the model on one device (no device_map split)")
        device = self.project.devices[0]
        self.geometry = geometry_of(model)
        self.fingerprint = fingerprint(model, model_id)
        self.stored: dict[str, _Stored] = {}
        self._kept = torch.zeros(len(ctxs), dtype=torch.long, device=device)  # per row, in the segment
        self.stats = CaptureStats()
        self.sender = _Sender(client, device, self.stats)
        self._hidden: list[torch.Tensor | None] = [None] * len(self.layers)
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        self._layer_hooks: dict[int, object] = {}  # per layer whose input the block takes: its hook's handle
        self._failed: HCacheError | None = None  # talking to hcached in a forward pass: raised at the block's end
        self._past = 0  # the length of the model's cache before the current pass
        # A segment: passes on one cache, each continuing the last. A pass on another cache (the block's first, or a
        # generate() that prefills the conversation anew) starts one.
        self._cache: weakref.ref | None = None  # the cache the last pass left
        self._segment = False  # whether the current pass starts one
        self._start: list[int] = []  # per row, the tokens the model's cache held when the segment began
        self._generating: torch.Tensor | None = None  # generate()'s rows not finished at the current pass
        self._held: _Held | None = None
        self._origin: Origin | None = None  # where the segment's cache was restored from, if it was
        self._elsewhere = False  # the model ran in another thread during the block

    def __enter__(self) -> _Capture:
        self.sender.start()
        own = self._own
        self._handles.append(self.model.register_forward_pre_hook(own(self._on_model_input), with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._layer_hooks[i] = layer.register_forward_pre_hook(own(self._layer_hook(i)), with_kwargs=True)
        self._handles.append(self.model.register_forward_hook(own(self._on_model_output), with_kwargs=True))
        return self

    def _own(self, hook: Callable) -> Callable:
        """`hook` as this block's: run only for the thread that opened the block (a server's other threads may run
        the same model at the same time, for other conversations, in blocks of their own or none), and timed."""
        owner = threading.get_ident()

        def own(*args: object) -> None:
            if threading.get_ident() != owner:
                self._elsewhere = True
                return
            start = time.perf_counter()
            try:
                hook(*args)
            finally:
                self.stats.hook_s += time.perf_counter() - start

        return own

    def __exit__(self, *exc: object) -> None:
        for h in [*self._handles, *self._layer_hooks.values()]:
            h.remove()
        if self._elsewhere and not self.stats.passes:
            log.warning("capture of %s saved nothing: the model ran only in other threads during the block, and a "
                        "block captures the forward passes of the thread that opened it; open it in the thread that "
                        "calls generate() (with a streamer, in the generation thread's target)", self.ctxs)
        self._settle()
        self.sender.close()
        if self.sender.error is not None or self._failed is not None:
            raise self.sender.error or self._failed
        if exc[0] is None:
            for ctx in self.stored:
                self.client.flush(ctx)

    def _on_model_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise BadRequest("capture needs input_ids: call the model (or generate) with token ids, not embeddings")
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise BadRequest(f"capture needs the attention mask as [batch, tokens] of 0 and 1, got {shape}: a static "
                             "cache (cache_implementation='static') passes a prepared mask; generate with the default "
                             "dynamic cache, or pass the 2D mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not isinstance(cache, Cache):
            raise BadRequest(f"capture follows the model's transformers Cache, the model got a "
                             f"{type(cache).__name__}: generate with the default DynamicCache")
        layers = getattr(cache, "layers", None)
        if layers and isinstance(layers[0], StaticLayer):  # a cache's layers are all static or none: one look a pass
            raise BadRequest(f"capture reads each step's K/V from a dynamic cache, the model got static cache layers "
                             f"({type(layers[0]).__name__}): generate without cache_implementation='static', or pass a "
                             "DynamicCache")
        self._settle()
        self._past = cache.get_seq_length() if cache is not None else 0
        self._segment = cache is None or self._cache is None or self._cache() is not cache
        if self._segment:
            self._start = self._cached_tokens(ids, mask)
            self._origin = getattr(cache, "hcache_origin", None)
            self._kept = torch.zeros_like(self._kept)
        self._ids = ids
        self._mask = mask
        self._generating = _generating_rows()

    def _cached_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
        """Per row, the tokens the model's cache holds before this pass, its padding left out."""
        if mask is None or self._past == 0 or mask.shape[1] != self._past + ids.shape[1]:
            return [self._past] * ids.shape[0]
        # A read of the mask waits for the device: once a segment, before its first pass.
        return mask[:, : self._past].sum(1).tolist()

    def _settle(self) -> None:
        """Hand the held pass to the sender, without the tokens the model's cache has dropped since (a cache's
        length reads no device memory)."""
        held, self._held = self._held, None
        if held is None:
            return
        p = held.pass_
        kept = held.cache.get_seq_length() - held.past
        if kept < p.tokens:
            self._kept -= p.keep_first(max(kept, 0))
        self.sender.put(p)

    def _layer_hook(self, i: int):  # noqa: ANN202 - a forward pre-hook
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            # The layer input is never modified in place by the layer: keep a reference, copy later (without
            # autograd: see _on_model_output).
            self._hidden[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _on_model_output(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        # Copies of a forward with autograd on stay out of its graph (and out= refuses inputs that require grad):
        # one no_grad here rather than a detach per layer input and K/V slice.
        with torch.no_grad():
            self._pass(output)

    def _pass(self, output: object) -> None:
        """Queue this forward's pass: its ids, mask, and the stacks of what its rows' contexts store. After a
        failure to open a context, nothing more: the block ends with its error, not the model's forward."""
        ids, hidden = self._ids, self._hidden
        self._hidden = [None] * len(self.layers)
        if ids is None or any(hidden[i] is None for i in self._layer_hooks) or self._failed is not None:
            return
        b, t = ids.shape
        if b != len(self.ctxs):
            raise BadRequest(f"capture got {len(self.ctxs)} context ids for a batch of {b} rows: give one id per row "
                             "(beam search, which runs and reorders several rows per sequence, cannot be captured)")
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None:
            raise BadRequest("capture saves each token once, as the model's cache keeps it; a forward pass that keeps "
                             "no cache (use_cache=False) makes the next one process the same tokens again: call the "
                             "model, or generate, with use_cache=True")
        self._cache = weakref.ref(cache)
        try:
            contexts = self._contexts(t)
        except HCacheError as e:  # hcached down, a context of another model...: the generation goes on
            self._failed = e
            return
        self._unhook_unneeded(contexts, cache)
        # Nothing here waits for the device (a read of ids or mask would stall a GPU's queue every step): ids and
        # masks travel with the pass, and rows are picked on the host by the sender.
        tensors: dict[Key, torch.Tensor] = {"ids": ids.clone()}
        if self._mask is not None:
            tensors["mask"] = self._mask[:, -t:].bool()
        if (generating := self._generating) is not None and generating.shape == (b,):
            going = generating.bool()[:, None].expand(b, t)
            tensors["mask"] = tensors["mask"] & going if "mask" in tensors else going
        staged: list[torch.Tensor] = []
        kv_stacked: dict[tuple[int, ...], Key | None] = {}  # per layer set: K/V of every row in one stack
        rows, nbytes = [], 0
        for row, (ctx, stored) in enumerate(zip(self.ctxs, contexts, strict=True)):
            select: dict[str, Key] = {}
            if layers := stored.hidden:
                key = ("hidden", layers)
                if key not in tensors:
                    tensors[key] = _stack([hidden[i] for i in layers], staged)  # a layer's input holds the t tokens
                select["hidden"] = key
            if layers := stored.kv:
                if layers not in kv_stacked:
                    kv_stacked[layers] = self._stack_kv(tensors, cache, layers, t, staged)
                key = kv_stacked[layers]
                select["kv"] = key if key is not None else self._row_kv(tensors, cache, hidden, layers, row, t)
            rows.append(_Row(ctx, row, select))
            nbytes += t * stored.token_bytes
        self._kept += tensors["mask"].sum(1) if "mask" in tensors else t
        self._held = _Held(_Pass(tensors, rows, nbytes, staged), cache, self._past)
        self.stats.passes += 1

    def _unhook_unneeded(self, contexts: list[_Stored], cache: object) -> None:
        """Stop taking the inputs of layers that no context stores as hidden states, once the contexts are known:
        each hooked layer costs its call a Python hook (30 of them are 1% of a small model's decode step). A
        sliding-window layer keeps its hook: its K/V may have to be projected from its input."""
        sliding = getattr(cache, "is_sliding", None) or [True] * len(self.layers)
        needed = {i for c in contexts for i in c.hidden} | {i for i, s in enumerate(sliding) if s}
        for i in [i for i in self._layer_hooks if i not in needed]:
            self._layer_hooks.pop(i).remove()

    @staticmethod
    def _stack_kv(tensors: dict[Key, torch.Tensor], cache: object, layers: tuple[int, ...], t: int,
                  staged: list[torch.Tensor]) -> Key | None:
        """Stack this step's keys and values of these layers for all rows, [2 * layers, B, n_kv, t, head_dim] (each
        layer's keys, then its values), from the model's own cache; None where a sliding-window layer's cache no
        longer holds them all."""
        entries = [cache.layers[i] if cache is not None and len(cache.layers) > i else None for i in layers]
        if not all(e is not None and e.keys.shape[2] >= t for e in entries):
            return None
        key = ("kv", layers)
        tensors[key] = _stack([x for e in entries for x in (e.keys.narrow(2, -t, t), e.values.narrow(2, -t, t))],
                              staged)
        return key

    def _row_kv(self, tensors: dict[Key, torch.Tensor], cache: object, hidden: list[torch.Tensor],
                layers: tuple[int, ...], row: int, t: int) -> Key:
        """Put the K/V of one row's tokens among the pass's tensors as [layers, t, 2, n_kv, head_dim], under the key
        returned: from the cache where it holds them, else projected from the layer's input (bit-identical)."""
        per_layer = []
        for i in layers:
            entry = cache.layers[i] if cache is not None and len(cache.layers) > i else None
            if entry is not None and entry.keys.shape[2] >= t:
                k, v = entry.keys[row, :, -t:], entry.values[row, :, -t:]  # [n_kv, t, hd]
            else:
                first = self._start[row] + int(self._kept[row])  # waits for the device: rare
                positions = torch.arange(first, first + t, device=hidden[i].device)[None]
                k, v = (x[0] for x in self.project(i, hidden[i][row : row + 1, -t:], positions))
            per_layer.append(torch.stack([k, v]).permute(2, 0, 1, 3))
        key = ("kv", layers, row)
        tensors[key] = torch.stack(per_layer)
        return key

    def _contexts(self, t: int) -> list[_Stored]:
        """Each row's context. At a segment's start they are opened (the block's first pass) or looked up again once
        what the block captured so far is appended, and met with the model's cache."""
        if not self._segment:
            return [self.stored[ctx] for ctx in self.ctxs]
        if not self.client.connected:  # a forward pass does not wait connect_timeout for a daemon that is down
            raise DaemonUnreachable(f"capture could not save {self.ctxs}: hcached is not connected (down, or "
                                    "restarting)")
        if self.stored:
            self.sender.drain()
            if self.sender.error is not None:
                raise HCacheError(f"capture stopped saving {self.ctxs}: {self.sender.error}")
        for row, ctx in enumerate(self.ctxs):
            if ctx in self.stored:
                self._meet(ctx, row, self.client.stat(ctx).n_tokens)
            else:
                self.stored[ctx] = self._open(ctx, row, t)
        return [self.stored[ctx] for ctx in self.ctxs]

    def _open(self, ctx: str, row: int, t: int) -> _Stored:
        """Open the context of batch row `row`, and meet it with the model's cache. A new context whose cache came
        from restore() starts as a fork of what was restored: the restored chunks are referenced, not saved again."""
        cached = self._start[row]
        try:
            info = self.client.open(ctx, model=self.fingerprint, geometry=self.geometry,
                                    layers=self._layers_to_store(t), create=cached == 0, share=self.share)
        except UnknownContext:
            info = self._fork_origin(ctx, row)
        self._meet(ctx, row, info.n_tokens)
        return _Stored.of(info)

    def _fork_origin(self, ctx: str, row: int) -> ContextInfo:
        cached, origin = self._start[row], self._origin
        if (origin is not None and len(self.ctxs) == 1 and origin.n_tokens == cached
                and origin.namespace == self.client.namespace):
            try:
                # not waited for here, on the forward pass's path: the block's end waits until all is durable
                return self.client.fork(origin.ctx, ctx, cached, share=self.share, wait=False)
            except UnknownContext:
                pass  # the restored context is gone: nothing to reference
        raise ContextChanged(f"the model's cache held {cached} tokens of row {row}'s conversation when capture began, "
                             f"and hcached has no context {ctx!r} (evicted, or deleted?) nor the one the cache was "
                             "restored from: the tokens before the block cannot be saved; capture the conversation "
                             "from an empty cache") from None

    def _meet(self, ctx: str, row: int, n: int) -> None:
        """At a segment's start, the context of row `row` holds `n` tokens and the model's cache `self._start[row]`
        of its conversation: the context must hold those; the model processing some of its tokens again is allowed
        (they are checked, and not saved twice)."""
        cached = self._start[row]
        if n < cached:
            raise ContextChanged(f"the model's cache held {cached} tokens of row {row}'s conversation, context {ctx!r} "
                                 f"holds {n}: the tokens between were never saved (or were lost with an eviction or a "
                                 "restart of hcached); restore the context before generating, or delete "
                                 f"{ctx!r} and capture the conversation from an empty cache")
        self.sender.overlaps.pop(ctx, None)
        if n > cached:
            self.sender.overlaps[ctx] = _Overlap(cached, n)

    def _layers_to_store(self, t: int) -> dict[str, list[int]]:
        every = list(range(self.geometry.num_layers))
        if self.store == "hidden":
            return {"hidden": every}
        if self.store == "kv":
            return {"kv": every}
        if self.store == "both":
            return {"hidden": every, "kv": every}
        from hcache.client.planner import save_plan

        return save_plan(self.geometry, t)


@contextlib.contextmanager
def capture(model: torch.nn.Module, client: HCacheClient, ctx: str | list[str], store: str = "plan",
            model_id: str | None = None, share: bool = True) -> Iterator[CaptureStats]:
    """Save the input hidden states (and/or K/V) of every token `model` processes inside the block into
    context `ctx` (one id, or one per batch row), appending if it exists (from where the model's cache ends; tokens
    the context holds already are checked, not saved again; at the first that differs, an edited turn, the context
    is cut back to the common prefix); the block's end waits until it is durable. A new context whose cache came
    from restore() references the restored chunks and saves only the new tokens.
    `store`: "plan" (what the planner keeps per layer), "hidden", "kv" or "both". `share`: a new context shares
    its full chunks with others of the same model and namespace that start alike (the first writer's bits), and
    lookup() finds it; share=False keeps its own bits.
    Yields the block's CaptureStats (what it has cost so far, on the forward passes' path and off it)."""
    if store not in STORE_CHOICES:
        raise BadRequest(f"store={store!r}: use one of {STORE_CHOICES}")
    ctxs = [ctx] if isinstance(ctx, str) else list(ctx)
    if len(set(ctxs)) != len(ctxs):
        twice = sorted({c for c in ctxs if ctxs.count(c) > 1})
        raise BadRequest(f"capture got context ids {twice} for more than one batch row: each row is a conversation "
                         "of its own, give each its own id")
    with _Capture(model, client, ctxs, store, model_id, share) as c:
        yield c.stats
