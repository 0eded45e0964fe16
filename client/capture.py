"""capture(): stream the input hidden states (and K/V) of every token a model processes into a context."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

from hcache.client.errors import BadRequest
from hcache.client.layout import ContextInfo
from hcache.client.sync import HCacheClient
from hcache.layout.geometry import Rep

STORE_CHOICES = ("plan", "hidden", "kv", "both")


# Held-back steps are bounded in host memory and in age; leaving the block sends the rest.
_BATCH_BYTES = 32 << 20
_MAX_DELAY_S = 5.0
_DUE = object()  # the sender's wake-up when held-back steps have waited long enough
Key = str | tuple  # of a pass's tensors: "ids", "mask", ("hidden", layers), ("kv", layers, "k"|"v"|row)
Pick = Callable[[dict[Key, torch.Tensor]], torch.Tensor]  # one row's data out of a pass's tensors on the host


class _Pass:
    """The tensors one forward pass captured for all batch rows, left on the model's device until the sender copies
    them to the host: a decode step never waits for a copy, nor allocates page-locked memory."""

    def __init__(self, tensors: dict[Key, torch.Tensor]) -> None:
        self.tensors = tensors
        first = next(iter(tensors.values()))
        self.ready = torch.cuda.current_stream(first.device).record_event() if first.is_cuda else None
        self._host: dict[Key, torch.Tensor] | None = None

    def host(self, stream: torch.cuda.Stream | None) -> dict[Key, torch.Tensor]:
        """The tensors on the host; from a GPU copied on `stream` (the sender's), after the pass's kernels."""
        if self._host is None:
            if self.ready is None:
                self._host = self.tensors
            else:
                with torch.cuda.stream(stream):
                    stream.wait_event(self.ready)
                    self._host = {k: v.to("cpu") for k, v in self.tensors.items()}
            self.tensors = {}  # device memory goes back once every row's step has been copied
        return self._host


def _rows(key: Key, row: int, host: dict[Key, torch.Tensor]) -> torch.Tensor:
    return host[key][:, row]


def _kv_rows(key: Key, row: int, host: dict[Key, torch.Tensor]) -> torch.Tensor:
    """[layers, t, 2, n_kv, head_dim] of one row from keys and values stacked as [layers, B, n_kv, t, head_dim]."""
    return torch.stack([host[key + ("k",)][:, row], host[key + ("v",)][:, row]], 1).permute(0, 3, 1, 2, 4)


def _whole(key: Key, host: dict[Key, torch.Tensor]) -> torch.Tensor:
    return host[key]


@dataclass
class _Step:
    """One forward pass of one batch row: how to pick its token ids and each stored layer's data for them
    ([layers, t, ...]) out of its pass's tensors, without the tokens its attention mask marks as padding."""

    ctx: str
    row: int
    pass_: _Pass
    select: dict[str, Pick]
    nbytes: int  # at most; padding is dropped only on the host

    def tokens_and_data(self, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        host = self.pass_.host(stream)
        mask = host.get("mask")
        keep = mask[self.row] if mask is not None and not bool(mask[self.row].all()) else slice(None)
        return host["ids"][self.row, keep], {name: pick(host)[:, keep] for name, pick in self.select.items()}


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
class _Sender:
    """Appends captured steps from a thread of its own, so a decode step never waits on the daemon."""

    client: HCacheClient
    device: torch.device
    steps: queue.Queue = field(default_factory=queue.Queue)
    error: BaseException | None = None
    thread: threading.Thread | None = None
    stream: torch.cuda.Stream | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        self.thread = threading.Thread(target=self._run, name="hcache-capture", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # Steps are held back until they are worth an append (or have waited long enough): one append per
        # decode step kept the daemon and this thread busy on the cores the model decodes on.
        pending: list[_Step] = []
        size, deadline = 0, 0.0
        while True:
            try:  # a forward pass's steps, one per batch row, come as one list
                item = self.steps.get(timeout=max(0.0, deadline - time.monotonic()) if pending else None)
            except queue.Empty:
                item = _DUE
            if isinstance(item, list):
                if not pending:
                    deadline = time.monotonic() + _MAX_DELAY_S
                pending += item
                size += sum(step.nbytes for step in item)
            if pending and (item is None or item is _DUE or size >= _BATCH_BYTES):
                self._send(pending)
                pending, size = [], 0
            if item is None:
                return

    def _send(self, steps: list[_Step]) -> None:
        if self.error is None:
            try:
                self._append(steps)
            except BaseException as e:  # raised to the caller when the capture block ends
                self.error = e

    def _append(self, steps: list[_Step]) -> None:
        by_ctx: dict[str, list[_Step]] = {}
        for s in steps:
            by_ctx.setdefault(s.ctx, []).append(s)
        for ctx, items in by_ctx.items():
            kept = [(ids, data) for ids, data in (s.tokens_and_data(self.stream) for s in items) if len(ids)]
            if kept:  # rows of padding only add nothing
                data = {k: torch.cat([d[k] for _, d in kept], dim=1) for k in kept[0][1]}
                self.client.append(ctx, torch.cat([ids for ids, _ in kept]), data, passes=[len(i) for i, _ in kept])

    def close(self) -> None:
        self.steps.put(None)
        if self.thread is not None:
            self.thread.join()


class _Capture:
    """Hooks on a model's decoder layers collecting each forward's layer inputs."""

    def __init__(self, model: torch.nn.Module, client: HCacheClient, ctxs: list[str], store: str,
                 model_id: str | None) -> None:
        from hcache.client.projection import decoder_layers, fingerprint, geometry_of

        self.model = model
        self.client = client
        self.ctxs = ctxs
        self.store = store
        self.layers = decoder_layers(model)
        self.geometry = geometry_of(model)
        self.fingerprint = fingerprint(model, model_id)
        self.stored: dict[str, _Stored] = {}
        self._kept = torch.zeros(len(ctxs), dtype=torch.long, device=next(model.parameters()).device)  # in the block
        self.sender = _Sender(client, next(model.parameters()).device)
        self._hidden: list[torch.Tensor | None] = [None] * len(self.layers)
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> _Capture:
        self.sender.start()
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_model_output, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self.sender.close()
        if self.sender.error is not None:
            raise self.sender.error
        if exc[0] is None:
            for ctx in self.stored:
                self.client.flush(ctx)

    def _on_model_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise BadRequest("capture needs input_ids: call the model (or generate) with token ids, not embeddings")
        self._ids = ids
        self._mask = kwargs.get("attention_mask")

    def _layer_hook(self, i: int):  # noqa: ANN202 - a forward pre-hook
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            # The layer input is never modified in place by the layer: keep a reference, copy later.
            self._hidden[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def _on_model_output(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        ids, hidden = self._ids, self._hidden
        self._hidden = [None] * len(self.layers)
        if ids is None or any(h is None for h in hidden):
            return
        b, t = ids.shape
        if b != len(self.ctxs):
            raise BadRequest(f"capture got {len(self.ctxs)} context ids for a batch of {b} rows: give one id per row")
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        # Nothing here waits for the device (a read of ids or mask would stall a GPU's queue every step): ids and
        # masks travel with the pass, and rows are picked on the host by the sender.
        tensors: dict[Key, torch.Tensor] = {"ids": ids.clone()}
        if self._mask is not None:
            tensors["mask"] = self._mask[:, -t:].bool()
        kv_stacked: dict[tuple[int, ...], Key | None] = {}  # per layer set: K/V of every row in one stack
        steps = []
        for row, ctx in enumerate(self.ctxs):
            stored = self.stored.get(ctx) or self._open(ctx, t)
            select: dict[str, Pick] = {}
            if layers := stored.hidden:
                key = ("hidden", layers)
                if key not in tensors:
                    tensors[key] = torch.stack([hidden[i] for i in layers])  # a layer's input holds the t tokens
                select["hidden"] = partial(_rows, key, row)
            if layers := stored.kv:
                if layers not in kv_stacked:
                    kv_stacked[layers] = self._stack_kv(tensors, cache, layers, t)
                key = kv_stacked[layers]
                select["kv"] = (partial(_kv_rows, key, row) if key is not None
                                else self._row_kv(tensors, cache, hidden, layers, row, t))
            steps.append((ctx, row, select, t * stored.token_bytes))
        self._kept += tensors["mask"].sum(1) if "mask" in tensors else t
        pass_ = _Pass(tensors)
        self.sender.steps.put([_Step(ctx, row, pass_, select, nbytes) for ctx, row, select, nbytes in steps])

    @staticmethod
    def _stack_kv(tensors: dict[Key, torch.Tensor], cache: object, layers: tuple[int, ...], t: int) -> Key | None:
        """Stack this step's keys and values of these layers for all rows, each [layers, B, n_kv, t, head_dim], from
        the model's own cache; None where a sliding-window layer's cache no longer holds them all."""
        entries = [cache.layers[i] if cache is not None and len(cache.layers) > i else None for i in layers]
        if not all(e is not None and e.keys.shape[2] >= t for e in entries):
            return None
        key = ("kv", layers)
        tensors[key + ("k",)] = torch.stack([e.keys[:, :, -t:] for e in entries])
        tensors[key + ("v",)] = torch.stack([e.values[:, :, -t:] for e in entries])
        return key

    def _row_kv(self, tensors: dict[Key, torch.Tensor], cache: object, hidden: list[torch.Tensor],
                layers: tuple[int, ...], row: int, t: int) -> Pick:
        """K/V of one row's tokens as [layers, t, 2, n_kv, head_dim]: from the cache where it holds them, else
        projected from the layer's input (bit-identical)."""
        from hcache.client.projection import project_kv

        per_layer = []
        for i in layers:
            entry = cache.layers[i] if cache is not None and len(cache.layers) > i else None
            if entry is not None and entry.keys.shape[2] >= t:
                k, v = entry.keys[row, :, -t:], entry.values[row, :, -t:]  # [n_kv, t, hd]
            else:
                first = self.stored[self.ctxs[row]].info.n_tokens + int(self._kept[row])  # waits for the device: rare
                positions = torch.arange(first, first + t, device=hidden[i].device)[None]
                k, v = (x[0] for x in project_kv(self.model, i, hidden[i][row : row + 1, -t:], positions))
            per_layer.append(torch.stack([k, v]).detach().permute(2, 0, 1, 3))
        key = ("kv", layers, row)
        tensors[key] = torch.stack(per_layer)
        return partial(_whole, key)

    def _open(self, ctx: str, t: int) -> _Stored:
        info = self.client.open(ctx, model=self.fingerprint, geometry=self.geometry, layers=self._layers_to_store(t))
        self.stored[ctx] = _Stored.of(info)
        return self.stored[ctx]

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
            model_id: str | None = None) -> Iterator[None]:
    """Save the input hidden states (and/or K/V) of every token `model` processes inside the block into
    context `ctx` (one id, or one per batch row), appending if it exists; the block's end waits until
    it is durable. `store`: "plan" (what the planner keeps per layer), "hidden", "kv" or "both"."""
    if store not in STORE_CHOICES:
        raise BadRequest(f"store={store!r}: use one of {STORE_CHOICES}")
    ctxs = [ctx] if isinstance(ctx, str) else list(ctx)
    with _Capture(model, client, ctxs, store, model_id):
        yield
